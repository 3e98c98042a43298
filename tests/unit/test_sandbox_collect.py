"""The host-side output walker (sandbox/collect.py), fuzzed with hostile trees.

Whatever a job leaves in /out, collect() either copies exactly its regular
files and directories into the destination or refuses with a Failure: never
another exception, never a link, never a byte outside the destination."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memoplane.sandbox import Limits
from memoplane.sandbox.collect import Refused, collect, read_return_file
from memoplane.sandbox.types import RETURN_FILE
from memoplane.tree_limits import MAX_TREE_DEPTH

NAMES = st.one_of(
    st.sampled_from(["a", "b", "return.json", "return.npy", RETURN_FILE, "..a", " ", "x" * 200]),
    st.binary(min_size=1, max_size=12).filter(lambda b: b"/" not in b and b"\0" not in b
                                              and b not in (b".", b"..")),
)
KINDS = st.sampled_from(["file", "dir", "symlink", "fifo", "setuid", "exec"])
TREES = st.recursive(
    st.tuples(KINDS, st.binary(max_size=64)),
    lambda children: st.dictionaries(NAMES, children, max_size=4),
    max_leaves=12,
)


def _build(root: Path, tree: object, outside: Path) -> None:
    """Make `tree` under root: dicts are directories, (kind, data) leaves."""
    if isinstance(tree, dict):
        for raw, sub in tree.items():
            name = raw if isinstance(raw, bytes) else os.fsencode(raw)
            path = os.path.join(os.fsencode(root), name)
            if isinstance(sub, dict):
                os.mkdir(path)
                _build(Path(os.fsdecode(path)), sub, outside)
            else:
                _leaf(path, sub, outside)


def _leaf(path: bytes, leaf: object, outside: Path) -> None:
    kind, data = leaf  # type: ignore[misc]
    if kind == "symlink":
        os.symlink(os.fsencode(outside), path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        os.mkdir(path)
    else:
        with open(path, "wb") as f:
            f.write(data)
        if kind == "setuid":
            os.chmod(path, 0o4755)
        elif kind == "exec":
            os.chmod(path, 0o755)


def _snapshot(root: Path) -> dict[bytes, tuple[int, bytes]]:
    out: dict[bytes, tuple[int, bytes]] = {}
    broot = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(broot):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st_ = os.lstat(p)
            data = b""
            if stat.S_ISREG(st_.st_mode):
                with open(p, "rb") as f:
                    data = f.read()
            out[os.path.relpath(p, broot)] = (stat.S_IFMT(st_.st_mode), data)
    return out


@settings(max_examples=150, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(tree=TREES, kind=st.sampled_from(["json", "bytes", "none"]), cap=st.sampled_from([40, 1 << 20]))
def test_collect_copies_plain_files_or_refuses(tree: object, kind: str, cap: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, dest, outside = Path(tmp, "src"), Path(tmp, "dest"), Path(tmp, "outside")
        for d in (src, dest, outside):
            d.mkdir()
        (outside / "secret").write_bytes(b"SECRET")
        _build(src, tree, outside)
        before_outside = _snapshot(outside)
        fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
        try:
            collect(fd, str(dest), Limits(max_output_bytes=cap), kind)
            refused = False
        except Refused as e:
            refused = True
            assert e.failure.reason in ("forbidden", "output-too-large") and e.failure.message
        finally:
            os.close(fd)
        assert _snapshot(outside) == before_outside
        got = _snapshot(dest)
        assert all(mode in (stat.S_IFREG, stat.S_IFDIR) for mode, _ in got.values()), got
        if refused:
            assert got == {}, "a refused tree left copies behind"
        else:
            want = {rel: v for rel, v in _snapshot(src).items()
                    if rel.split(b"/")[0] != os.fsencode(RETURN_FILE)}
            assert got == want


def test_depth_is_capped_before_the_walk_goes_deep(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    dest.mkdir()
    deep = src
    for _ in range(MAX_TREE_DEPTH + 5):
        deep = deep / "d"
    deep.mkdir(parents=True)
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(Refused, match="levels deep"):
            collect(fd, str(dest), Limits(), "none")
    finally:
        os.close(fd)


def test_return_file_must_be_a_plain_file_within_the_cap(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").write_bytes(b"not the job's")
    os.symlink(tmp_path / "elsewhere", tmp_path / RETURN_FILE)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(Refused, match="not a plain file"):
            read_return_file(fd, Limits())
        os.unlink(tmp_path / RETURN_FILE)
        (tmp_path / RETURN_FILE).write_bytes(b"x" * 100)
        with pytest.raises(Refused, match="max_output_bytes=10"):
            read_return_file(fd, Limits(max_output_bytes=10))
        assert read_return_file(fd, Limits()) == b"x" * 100
    finally:
        os.close(fd)
