"""Stored trees hold regular files only, walked without following links and within fixed
bounds; materialising creates every file new under the target directory, never through a
link; `memoplane result -o DIR` never overwrites a file. Messages are asserted whole."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from memoplane.canonical import canonical_json
from memoplane.cas import FilesystemBackend, Hit, Provenance, ResultManifest, Store, b3
from memoplane.cas import store as store_module
from memoplane.cas.digests import object_name
from memoplane.cas.records import TreeManifest, seal
from memoplane.commands.store import materialize_result
from memoplane.errors import InputError, NotFound, StoreCorrupted
from memoplane.tree_limits import MAX_TREE_DEPTH

NOT_A_LINK = "write regular files and directories only; stored trees never hold links"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(FilesystemBackend(tmp_path / "store", durability="none"))
    yield s
    s.close()


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def put_raw_tree(store: Store, entries: dict[str, Any]) -> str:
    """A tree as an attacker with write access to the store could write it (sealed, at its address)."""
    body = {"v": 1, "entries": entries}
    digest = b3(canonical_json(body))
    store.backend.put(object_name("trees", digest), seal(body))
    return digest


def entry(store: Store, data: bytes) -> dict[str, Any]:
    blob = store.put_bytes(data)
    return {"digest": blob.digest, "size": blob.size, "exec": False}


# -- put_tree ---------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["file", "dir", "/etc/passwd", "dangling"])
def test_put_tree_refuses_links(store: Store, tmp_path: Path, target: str) -> None:
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    (src / "file").write_bytes(b"x")
    (src / "dir" / "link").symlink_to(target)
    with pytest.raises(InputError) as caught:
        store.put_tree(src)
    assert str(caught.value) == f"output 'dir/link' is a symbolic link — {NOT_A_LINK}"


def test_put_tree_refuses_fifos_and_a_linked_root(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "pipe")
    with pytest.raises(InputError) as caught:
        store.put_tree(src)  # a FIFO would block a reader: it is refused, not opened
    assert str(caught.value) == f"output 'pipe' is not a regular file — {NOT_A_LINK}"
    (tmp_path / "real").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    with pytest.raises(InputError) as caught:
        store.put_tree(tmp_path / "linked")
    assert str(caught.value) == (f"output tree {tmp_path / 'linked'} is not a directory (Not a directory)"
                                 " — pass an existing directory, not a link to one")


def test_put_tree_refuses_trees_deeper_than_the_cap(store: Store, tmp_path: Path) -> None:
    ok, deep = tmp_path / "ok", tmp_path / "deep"
    (ok / Path(*["d"] * (MAX_TREE_DEPTH - 1))).mkdir(parents=True)
    (ok / Path(*["d"] * (MAX_TREE_DEPTH - 1)) / "f").write_bytes(b"f")
    tree = store.get_tree(store.put_tree(ok).digest)
    assert list(tree.entries) == ["d/" * (MAX_TREE_DEPTH - 1) + "f"]
    (deep / Path(*["d"] * MAX_TREE_DEPTH)).mkdir(parents=True)
    (deep / Path(*["d"] * MAX_TREE_DEPTH) / "f").write_bytes(b"f")
    with pytest.raises(InputError) as caught:
        store.put_tree(deep)
    rel = repr("d/" * MAX_TREE_DEPTH + "f")
    assert str(caught.value) == (f"output {rel[:60]}...{rel[-60:]} is nested more than {MAX_TREE_DEPTH} directories"
                                 f" deep — keep output files at most {MAX_TREE_DEPTH} directories deep")


def test_put_tree_refuses_too_many_entries(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "MAX_TREE_ENTRIES", 5)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}").write_bytes(b"x")
    assert len(store.get_tree(store.put_tree(src).digest).entries) == 5
    (src / "one-more").mkdir()  # directories count too: a walk over empty ones is work as well
    with pytest.raises(InputError) as caught:
        store.put_tree(src)
    assert str(caught.value) == ("the output tree has more than 5 files and directories"
                                 " — write fewer, larger files (e.g. one archive)")


def test_put_tree_refuses_names_that_are_not_utf8(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(os.path.join(os.fsencode(src), b"caf\xe9.txt"), "wb") as f:
        f.write(b"x")
    with pytest.raises(InputError) as caught:
        store.put_tree(src)
    assert str(caught.value) == "output file name 'caf\\udce9.txt' is not UTF-8 — name output files in UTF-8"


# -- loading trees ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rel", "problem"),
    [
        ("../up", "has an empty, '.' or '..' component"),
        ("a/./b", "has an empty, '.' or '..' component"),
        ("a//b", "has an empty, '.' or '..' component"),
        ("/etc/passwd", "is not a relative path"),
        ("", "is not a relative path"),
        ("a\0b", "contains a NUL character"),
        ("a/" * MAX_TREE_DEPTH + "f", f"is nested more than {MAX_TREE_DEPTH} directories deep"),
        ("n" * 256, "has a name longer than 255 bytes"),
    ],
)
def test_trees_with_bad_paths_do_not_load(rel: str, problem: str) -> None:
    digest = "b3:" + "00" * 32
    with pytest.raises(InputError) as caught:
        TreeManifest.from_dict({"v": 1, "entries": {rel: {"digest": digest, "size": 0, "exec": False}}})
    shown = repr(rel) if len(repr(rel)) <= 120 else f"{repr(rel)[:60]}...{repr(rel)[-60:]}"
    assert str(caught.value) == f"tree entry {shown} {problem} — the tree was tampered with"


def test_a_path_that_is_both_a_file_and_a_directory_does_not_load() -> None:
    e = {"digest": "b3:" + "00" * 32, "size": 0, "exec": False}
    with pytest.raises(InputError) as caught:
        TreeManifest.from_dict({"v": 1, "entries": {"a": e, "a-b": e, "a/c": e}})
    assert str(caught.value) == "tree entry 'a' is both a file and a directory — the tree was tampered with"
    assert sorted(TreeManifest.from_dict({"v": 1, "entries": {"a": e, "a-b/c": e, "ab/c": e}}).entries) == \
        ["a", "a-b/c", "ab/c"]


def test_an_old_tree_with_a_link_is_refused_not_skipped(store: Store, tmp_path: Path) -> None:
    digest = put_raw_tree(store, {"data.txt": entry(store, b"data"), "return.json": {"link": "/etc/passwd"}})
    with pytest.raises(StoreCorrupted) as caught:
        store.materialize(digest, tmp_path / "out")
    assert "tree.entries['return.json'] is a symbolic link, which a stored tree may not hold" in str(caught.value)
    assert "it was quarantined" in str(caught.value)
    assert list((tmp_path / "out").iterdir()) == []


# -- materialize ----------------------------------------------------------------------------------


def test_materialize_writes_new_files_with_exact_modes(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "tool").write_bytes(b"#!/bin/sh\n")
    (src / "bin" / "tool").chmod(0o700)
    (src / "notes.txt").write_bytes(b"notes")
    (src / "notes.txt").chmod(0o600)
    old = os.umask(0o077)
    try:
        store.materialize(store.put_tree(src).digest, tmp_path / "dst")
    finally:
        os.umask(old)
    assert files_under(tmp_path / "dst") == {"bin/tool": b"#!/bin/sh\n", "notes.txt": b"notes"}
    assert stat.S_IMODE(os.stat(tmp_path / "dst/bin/tool").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "dst/notes.txt").st_mode) == 0o644


def test_materialize_into_a_linked_directory_writes_inside_its_target(store: Store, tmp_path: Path) -> None:
    # The caller's own -o path may be a link (their choice); nothing below it is followed.
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"f")
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    store.materialize(store.put_tree(src).digest, tmp_path / "alias")
    assert files_under(tmp_path / "real") == {"f": b"f"}


def test_materialize_into_a_file_is_one_clear_error(store: Store, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"f")
    (tmp_path / "taken").write_bytes(b"")
    with pytest.raises(InputError) as caught:
        store.materialize(store.put_tree(tmp_path / "src").digest, tmp_path / "taken")
    assert str(caught.value) == (f"cannot use {tmp_path / 'taken'} as the output directory: File exists"
                                 " — pass a new or empty directory")


def test_a_failed_blob_leaves_no_partial_file(store: Store, tmp_path: Path) -> None:
    missing = {"digest": b3(b"never stored"), "size": 12, "exec": False}
    digest = put_raw_tree(store, {"a.txt": entry(store, b"a"), "b.txt": missing})
    with pytest.raises(NotFound):
        store.materialize(digest, tmp_path / "out")  # b.txt is created, then its blob is not found
    assert files_under(tmp_path / "out") == {"a.txt": b"a"}


def test_write_blob_keeps_replacing_its_target(store: Store, tmp_path: Path) -> None:
    # execute.materialize_inputs writes inputs with it: same signature, same behaviour.
    blob = store.put_bytes(b"v2")
    (tmp_path / "input").write_bytes(b"v1")
    store.write_blob(blob.digest, tmp_path / "input", executable=True)
    assert (tmp_path / "input").read_bytes() == b"v2"
    assert stat.S_IMODE(os.stat(tmp_path / "input").st_mode) == 0o755
    assert sorted(os.listdir(tmp_path)) == ["input", "store"]  # no temporary file left


# -- memoplane result -o DIR ----------------------------------------------------------------------


def _hit(store: Store, value: Any, outputs: dict[str, bytes] | None, tmp_path: Path) -> Hit:
    tree = None
    if outputs is not None:
        src = tmp_path / "job-out"
        src.mkdir()
        for rel, data in outputs.items():
            (src / rel).write_bytes(data)
        tree = store.put_tree(src)
    empty = store.put_bytes(b"")
    key = b3(repr(value).encode())
    result = ResultManifest(value=store.put_value(value), stdout=empty, stderr=empty,
                            provenance=Provenance(key, {}, b3(b"rt"), "n1", 1.0, 2.0, 1.0), output_tree=tree)
    return Hit(key, store.put_result(result), result)


def test_result_with_outputs_and_a_value(store: Store, tmp_path: Path) -> None:
    hit = _hit(store, {"total": 60}, {"count": b"3\n"}, tmp_path)
    written = materialize_result(store, hit, {"total": 60}, tmp_path / "o")
    assert written == [str(tmp_path / "o" / "count"), str(tmp_path / "o" / "return.json")]
    assert files_under(tmp_path / "o") == {"count": b"3\n", "return.json": b'{"total": 60}'}


def test_result_never_overwrites_an_output_named_like_the_value(store: Store, tmp_path: Path) -> None:
    hit = _hit(store, {"total": 60}, {"return.json": b"the job's own file"}, tmp_path)
    with pytest.raises(InputError) as caught:
        materialize_result(store, hit, {"total": 60}, tmp_path / "o")
    assert str(caught.value) == ("the job wrote an output file named return.json, the name of the return value's"
                                 f" file; the output files are in {tmp_path / 'o'} — print the return value without -o")
    assert (tmp_path / "o" / "return.json").read_bytes() == b"the job's own file"


def test_result_never_writes_through_a_link_in_dir(store: Store, tmp_path: Path) -> None:
    hit = _hit(store, {"total": 60}, None, tmp_path)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "return.json").symlink_to(victim)
    with pytest.raises(InputError) as caught:
        materialize_result(store, hit, {"total": 60}, tmp_path / "o")
    assert str(caught.value) == f"{tmp_path / 'o' / 'return.json'} already exists — pass a new directory to -o"
    assert victim.read_bytes() == b"precious"
