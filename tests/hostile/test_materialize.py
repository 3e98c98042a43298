"""`memoplane result -o DIR` / Store.materialize against an attacker who controls the tree
(write access to the store) and can plant links in DIR while it is being written: nothing
is ever written, created or changed outside DIR (issue 9, finding 2)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes import DelegatingBackend

from memoplane.canonical import canonical_json
from memoplane.cas import BlobRef, FilesystemBackend, Hit, Provenance, ResultManifest, Store, b3
from memoplane.cas.digests import object_name
from memoplane.cas.records import seal
from memoplane.commands.store import materialize_result
from memoplane.errors import InputError, StoreCorrupted

pytestmark = pytest.mark.hostile


class PlantingBackend(DelegatingBackend):
    """A real filesystem backend that runs `plant` just before serving `trigger`: the
    attacker's move lands after materialize checked DIR and before it writes there."""

    planted_on = "get_range"   # the call on `trigger` that plants (chunks are ranges of packs)

    def __init__(self, root: Path) -> None:
        super().__init__(FilesystemBackend(root, durability="none"))
        self.trigger = ""
        self.plant: Callable[[], None] = lambda: None

    def before(self, op: str, name: str) -> None:
        if op == self.planted_on and name == self.trigger:
            self.trigger = ""  # once
            self.plant()


@pytest.fixture
def backend(tmp_path: Path) -> PlantingBackend:
    return PlantingBackend(tmp_path / "store")


@pytest.fixture
def store(backend: PlantingBackend) -> Iterator[Store]:
    s = Store(backend)
    yield s
    s.close()


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """A host directory with a file the attack aims at; it must end exactly as it began."""
    root = tmp_path / "outside"
    root.mkdir()
    (root / "victim").write_bytes(b"precious")
    before = snapshot(root)
    yield root
    assert snapshot(root) == before, "something was written outside DIR"


def snapshot(root: Path) -> dict[str, Any]:
    return {p.relative_to(root).as_posix(): (p.read_bytes(), os.stat(p).st_mode)
            for p in sorted(root.rglob("*")) if p.is_file()} | {"": sorted(os.listdir(root))}


def raw_tree(store: Store, entries: dict[str, bytes]) -> str:
    body: dict[str, Any] = {"v": 1, "entries": {}}
    for rel, data in entries.items():
        blob = store.put_bytes(data)
        body["entries"][rel] = {"digest": blob.digest, "size": blob.size, "exec": False}
    digest = b3(canonical_json(body))
    store.backend.put(object_name("trees", digest), seal(body))
    return digest


def chunk_of(store: Store, data: bytes) -> str:
    """The pack holding `data`'s first chunk: materializing `data` reads a range of it."""
    chunk = store.blob_manifest(store.put_bytes(data).digest).chunks[0][0]
    return object_name("packs", store.chunks.index.locations(chunk)[0].pack)


@pytest.mark.parametrize(("rel", "problem"), [
    ("../outside/victim", "has an empty, '.' or '..' component"),
    ("a/../../outside/victim", "has an empty, '.' or '..' component"),
    ("/outside/victim", "is not a relative path"),
    (str(Path("/tmp").resolve()) + "/victim", "is not a relative path"),
])
def test_a_tampered_tree_cannot_name_a_path_outside(store: Store, tmp_path: Path, outside: Path, rel: str,
                                                    problem: str) -> None:
    digest = raw_tree(store, {rel: b"pwned"})
    with pytest.raises(StoreCorrupted) as caught:
        store.materialize(digest, tmp_path / "dir")
    assert f"tree entry {rel!r} {problem} — the tree was tampered with; it was quarantined" in str(caught.value)
    assert os.listdir(tmp_path / "dir") == []


def test_a_file_link_planted_during_the_write_is_not_followed(
        store: Store, backend: PlantingBackend, tmp_path: Path, outside: Path) -> None:
    digest = raw_tree(store, {"a.txt": b"first", "b.txt": b"pwned"})
    dest = tmp_path / "dir"
    backend.trigger = chunk_of(store, b"first")
    backend.plant = lambda: (dest / "b.txt").symlink_to(outside / "victim")
    with pytest.raises(InputError) as caught:
        store.materialize(digest, dest)
    assert str(caught.value) == (f"cannot write 'b.txt' under {dest}: File exists"
                                 " — materialize into a new directory that nothing else writes to")
    assert os.readlink(dest / "b.txt") == str(outside / "victim")  # the link stays a link


def test_a_directory_link_planted_during_the_write_is_not_followed(
        store: Store, backend: PlantingBackend, tmp_path: Path, outside: Path) -> None:
    digest = raw_tree(store, {"a.txt": b"first", "sub/victim": b"pwned", "sub/new": b"pwned"})
    dest = tmp_path / "dir"
    backend.trigger = chunk_of(store, b"first")
    backend.plant = lambda: (dest / "sub").symlink_to(outside)
    with pytest.raises(InputError) as caught:
        store.materialize(digest, dest)
    assert str(caught.value) == (f"cannot write 'sub/new' under {dest}: Not a directory"
                                 " — materialize into a new directory that nothing else writes to")


def test_a_link_swapped_in_for_a_made_directory_is_not_followed(
        store: Store, backend: PlantingBackend, tmp_path: Path, outside: Path) -> None:
    # sub/ is made and opened for sub/a; the attacker then swaps it for a link. Files of
    # sub/ still go through the descriptor of the directory made, which never moved outside.
    digest = raw_tree(store, {"sub/a": b"first", "sub/b": b"second"})
    dest = tmp_path / "dir"

    def swap() -> None:
        os.rename(dest / "sub", tmp_path / "moved")
        (dest / "sub").symlink_to(outside)

    backend.trigger = chunk_of(store, b"second")
    backend.plant = swap
    store.materialize(digest, dest)
    assert sorted(os.listdir(tmp_path / "moved")) == ["a", "b"]


def test_result_value_file_never_goes_through_a_planted_link(
        store: Store, backend: PlantingBackend, tmp_path: Path, outside: Path) -> None:
    tree = raw_tree(store, {"count": b"3\n"})
    empty = store.put_bytes(b"")
    key = b3(b"job")
    result = ResultManifest(value=store.put_value({"total": 60}), stdout=empty, stderr=empty,
                            provenance=Provenance(key, {}, b3(b"rt"), "n1", 1.0, 2.0, 1.0),
                            output_tree=BlobRef(tree, 2))
    hit = Hit(key, store.put_result(result), result)
    dest = tmp_path / "dir"
    backend.trigger = chunk_of(store, b"3\n")
    backend.plant = lambda: (dest / "return.json").symlink_to(outside / "victim")
    with pytest.raises(InputError) as caught:
        materialize_result(store, hit, {"total": 60}, dest)
    assert str(caught.value) == f"{dest / 'return.json'} already exists — pass a new directory to -o"


# -- put_tree: a job's output directory changed while the host stores it -----------------------


def plant_when_stored(store: Store, data: bytes, plant: Callable[[], None]) -> None:
    """Run `plant` once, when the store takes the chunk of `data` (while its file is being stored)."""
    put = store.chunks.put

    def planting(digest: str, encode: Callable[[], bytes], plain_length: int) -> bool:
        if digest == b3(data):
            store.chunks.put = put  # type: ignore[method-assign]  # once
            plant()
        return put(digest, encode, plain_length)

    store.chunks.put = planting  # type: ignore[method-assign]


def test_put_tree_never_reads_through_a_link_swapped_in(tmp_path: Path, outside: Path) -> None:
    secret = outside / "victim"
    store = Store(FilesystemBackend(tmp_path / "store", durability="none"))
    src = tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"first")
    (src / "sub" / "victim").write_bytes(b"job's own")

    def swap() -> None:  # a.txt is being stored; sub/ has not been opened yet
        os.rename(src / "sub", tmp_path / "moved")
        (src / "sub").symlink_to(outside)

    plant_when_stored(store, b"first", swap)
    with pytest.raises(InputError) as caught:
        store.put_tree(src)
    assert str(caught.value) == ("output 'sub' is a symbolic link"
                                 " — write regular files and directories only; stored trees never hold links")
    assert not store.backend.exists(object_name("blobs", b3(secret.read_bytes())))
    store.close()


def test_put_tree_keeps_reading_the_directory_it_opened(tmp_path: Path, outside: Path) -> None:
    store = Store(FilesystemBackend(tmp_path / "store", durability="none"))
    src = tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.txt").write_bytes(b"first")
    (src / "sub" / "victim").write_bytes(b"job's own")

    def swap() -> None:  # sub/ is open and half read: the rest still comes from it
        os.rename(src / "sub", tmp_path / "moved")
        (src / "sub").symlink_to(outside)

    plant_when_stored(store, b"first", swap)
    tree = store.get_tree(store.put_tree(src).digest)
    assert {rel: store.get_bytes(e.digest) for rel, e in tree.entries.items()} == \
        {"sub/a.txt": b"first", "sub/victim": b"job's own"}
    store.close()
