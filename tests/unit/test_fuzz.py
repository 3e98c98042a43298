"""Fuzzing the host side where a job's bytes are parsed or written back (issue 9).

1. The sandbox control-channel parser (memoplane/sandbox/protocol.py): any bytes either
   give frames whose headers are dicts, or ProtocolError (EOFError when the peer closed
   the stream mid-frame) — never another exception.
2. Trees: hostile tree manifests ('..', absolute paths, NUL, very deep paths, a path that
   is both a file and a directory) never make Store.materialize write outside its
   directory; ordinary trees round-trip through put_tree and materialize exactly.

Bounded: a fixed number of examples each (a few seconds in all), no deadline (the
machine may be busy: no timing assertion), no example database written to the tree.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import tempfile
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memoplane.canonical import canonical_json
from memoplane.cas import FilesystemBackend, Store, b3
from memoplane.cas.digests import object_name
from memoplane.cas.records import seal
from memoplane.errors import InputError, StoreCorrupted
from memoplane.sandbox import protocol
from memoplane.sandbox.protocol import MAX_PAYLOAD, FrameReader, ProtocolError

FUZZ = settings(max_examples=200, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TREES = settings(FUZZ, max_examples=60)  # each example writes, stores and re-reads a directory
HEAD = struct.Struct("!II")

# -- the control-channel parser -------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    """Header bytes that are often almost right: JSON values, deep nesting, mutations."""
    kind = draw(st.sampled_from(["json", "deep", "mutated", "raw"]))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "deep":
        depth = draw(st.integers(0, 5000))
        opener = draw(st.sampled_from(["[", '{"a":']))
        closer = "]" if opener == "[" else "}"
        return ('{"a":' + opener * depth + "1" + closer * depth + "}").encode()
    if kind == "mutated":
        body = bytearray(json.dumps(draw(json_values)).encode())
        for _ in range(draw(st.integers(1, 3))):
            if body:
                body[draw(st.integers(0, len(body) - 1))] = draw(st.integers(0, 255))
        return bytes(body)
    return draw(st.binary(max_size=64))


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    header = draw(headers())
    payload = draw(st.binary(max_size=32))
    lie = draw(st.sampled_from(["none", "hlen", "plen"]))
    hlen, plen = len(header), len(payload)
    if lie == "hlen":
        hlen = draw(st.integers(0, 2**32 - 1))
    elif lie == "plen":
        plen = draw(st.integers(0, 2**32 - 1))
    return HEAD.pack(hlen, plen) + header + payload


streams = st.one_of(st.binary(max_size=256), st.lists(frames(), max_size=4).map(b"".join))


def check_frames(got: list[tuple[Any, bytes]]) -> None:
    for header, payload in got:
        assert isinstance(header, dict) and isinstance(payload, bytes) and len(payload) <= MAX_PAYLOAD


@FUZZ
@given(body=st.one_of(headers(), st.binary(max_size=128)))
def test_parse_gives_a_dict_or_protocol_error(body: bytes) -> None:
    try:
        header = protocol._parse(body)
    except ProtocolError:
        return
    assert isinstance(header, dict)


@FUZZ
@given(data=streams, cuts=st.lists(st.integers(0, 256), max_size=6))
def test_frame_reader_gives_dict_frames_or_protocol_error(data: bytes, cuts: list[int]) -> None:
    reader = FrameReader()
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    try:
        for start, end in pairwise(bounds):
            check_frames(reader.feed(data[start:end]))
    except ProtocolError:
        pass


@FUZZ
@given(values=st.lists(st.dictionaries(st.text(max_size=8), json_values, max_size=4), max_size=4),
       payloads=st.lists(st.binary(max_size=32), min_size=4, max_size=4), split=st.integers(0, 10_000))
def test_frame_reader_returns_what_was_encoded(values: list[dict[str, Any]], payloads: list[bytes],
                                               split: int) -> None:
    data = b"".join(protocol.encode(v, p) for v, p in zip(values, payloads, strict=False))
    cut = split % (len(data) + 1)
    reader = FrameReader()
    got = reader.feed(data[:cut]) + reader.feed(data[cut:])
    assert got == [(json.loads(json.dumps(v)), p) for v, p in zip(values, payloads, strict=False)]


def _stream_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


@FUZZ
@given(data=streams)
def test_recv_gives_dict_frames_then_protocol_error_or_eof(data: bytes) -> None:
    ours, theirs = _stream_pair()
    with ours, theirs:
        theirs.sendall(data)
        theirs.shutdown(socket.SHUT_WR)
        try:
            while True:
                check_frames([protocol.recv(ours)])
        except (ProtocolError, EOFError):
            pass


@FUZZ
@given(data=streams)
def test_recv_stream_with_fds_gives_a_dict_frame_or_protocol_error_or_eof(data: bytes) -> None:
    ours, theirs = _stream_pair()
    with ours, theirs:
        theirs.sendall(data)
        theirs.shutdown(socket.SHUT_WR)
        try:
            header, payload, fds = protocol.recv_stream_with_fds(ours)
        except (ProtocolError, EOFError):
            return
        assert fds == []
        check_frames([(header, payload)])


@FUZZ
@given(packet=st.one_of(frames(), st.binary(min_size=HEAD.size, max_size=256)))
def test_recv_with_fds_gives_a_dict_or_protocol_error(packet: bytes) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        theirs.send(packet)
        try:
            header, fds = protocol.recv_with_fds(ours)
        except ProtocolError:
            return
        assert isinstance(header, dict) and fds == []


def test_recv_with_fds_refuses_a_packet_shorter_than_its_head() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        theirs.send(b"\x00\x01")
        with pytest.raises(ProtocolError):
            protocol.recv_with_fds(ours)


# -- trees --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    s = Store(FilesystemBackend(tmp_path_factory.mktemp("fuzz-store"), durability="none"))
    yield s
    s.close()


segments = st.one_of(
    st.sampled_from(["..", ".", "", "a", "b", "return.json", "..a", "a..", "...", " ", "\0", "a\0b", "\\", "~"]),
    st.text(min_size=1, max_size=12),
    st.just("n" * 256),
)


@st.composite
def hostile_paths(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["segments", "absolute", "deep", "dotdot"]))
    if kind == "deep":
        return "d/" * draw(st.integers(100, 300)) + "f"
    if kind == "dotdot":
        return "/".join([".."] * draw(st.integers(1, 8)) + [draw(st.sampled_from(["outside", "outside/victim"]))])
    path = "/".join(draw(st.lists(segments, min_size=1, max_size=6)))
    return "/" + path if kind == "absolute" else path


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file and link under `root` (not following links), with content or target."""
    found: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st_ = path.lstat()
            key = path.relative_to(root).as_posix()
            if stat.S_ISLNK(st_.st_mode):
                found[key] = b"-> " + os.fsencode(os.readlink(path))
            elif stat.S_ISREG(st_.st_mode):
                found[key] = path.read_bytes()
    return found


@TREES
@given(paths=st.lists(hostile_paths(), min_size=1, max_size=5),
       safe=st.lists(st.sampled_from(["x", "y/z"]), max_size=2), link=st.booleans())
def test_hostile_trees_never_write_outside_dest(store: Store, paths: list[str], safe: list[str], link: bool) -> None:
    blob = store.put_bytes(b"pwned")
    entries: dict[str, Any] = {rel: {"digest": blob.digest, "size": blob.size, "exec": False}
                               for rel in [*paths, *safe]}
    if link:  # as trees written before links were refused held them
        entries["y/link"] = {"link": "../../../outside/victim"}
    body = {"v": 1, "entries": entries}
    try:
        digest = b3(canonical_json(body))
    except InputError:
        return  # not even encodable (a lone surrogate): it cannot be a stored tree
    store.backend.put(object_name("trees", digest), seal(body))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "outside").mkdir()
        (root / "outside" / "victim").write_bytes(b"precious")
        dest = root / "a" / "b" / "dest"  # '..' from here still lands inside root
        before = snapshot(root)
        refused = False
        try:
            store.materialize(digest, dest)
        except (StoreCorrupted, InputError):
            refused = True  # possibly after some files were written, all of them inside dest
        after = snapshot(root)
        assert {k: v for k, v in after.items() if not k.startswith("a/b/dest/")} == before
        assert refused or not link
        if not refused:
            written = {k.removeprefix("a/b/dest/"): v for k, v in after.items() if k.startswith("a/b/dest/")}
            assert written == {rel: b"pwned" for rel in entries}


names = st.text(st.characters(codec="utf-8", exclude_characters="/\0"), min_size=1, max_size=16).filter(
    lambda n: n not in (".", "..") and len(n.encode()) <= 255)


@st.composite
def trees(draw: st.DrawFn) -> dict[str, tuple[bytes, bool]]:
    paths = draw(st.lists(st.lists(names, min_size=1, max_size=4).map("/".join), min_size=1, max_size=8,
                          unique=True))
    # A path that is also a directory of another path is a directory: drop it as a file.
    files = [p for p in paths if not any(q.startswith(p + "/") for q in paths)]
    return {p: (draw(st.binary(max_size=64)), draw(st.booleans())) for p in files}


@TREES
@given(tree=trees())
def test_trees_round_trip_exactly(store: Store, tree: dict[str, tuple[bytes, bool]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "dst"
        src.mkdir()
        for rel, (data, executable) in tree.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(data)
            (src / rel).chmod(0o755 if executable else 0o644)
        ref = store.put_tree(src)
        assert sorted(store.get_tree(ref.digest).entries) == sorted(tree)
        store.materialize(ref.digest, dst)
        assert snapshot(dst) == {rel: data for rel, (data, _) in tree.items()}
        for rel, (_, executable) in tree.items():
            assert stat.S_IMODE(os.stat(dst / rel).st_mode) == (0o755 if executable else 0o644)
        assert store.put_tree(dst) == ref

