"""The node-local read-through cache (cas/cached.py) with filesystem backends on both sides."""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes import DelegatingBackend

from memoplane.cas import CachingBackend, FilesystemBackend, Provenance, ResultManifest, Store, StoredValue, b3
from memoplane.cas.digests import object_name
from memoplane.cas.packs import Location
from memoplane.errors import InputError, NotFound, StoreCorrupted

KEY = "b3:" + "1" * 64


class Counting(DelegatingBackend):
    """Counts the calls that name an object, per (method, kind): proves where reads go."""

    def __init__(self, inner: FilesystemBackend) -> None:
        super().__init__(inner)
        self.calls: Counter[tuple[str, str]] = Counter()

    def before(self, op: str, name: str) -> None:
        self.calls[(op, name.split("/", 1)[0])] += 1


def rand(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def result_for(store: Store, data: bytes, key: str = KEY) -> ResultManifest:
    return ResultManifest(value=StoredValue("bytes", blob=store.put_bytes(data)),
                          stdout=store.put_bytes(b"out"), stderr=store.put_bytes(b""),
                          provenance=Provenance(key, {}, "b3:" + "2" * 64, "node-a", 0.0, 1.0, 1.0))


class Setup:
    def __init__(self, tmp: Path, **kw: object) -> None:
        self.remote_fs = FilesystemBackend(tmp / "remote", durability="none")
        self.local = FilesystemBackend(tmp / "local", durability="none")
        self.remote = Counting(self.remote_fs)
        self.cache = CachingBackend(self.remote, self.local, **kw)  # type: ignore[arg-type]
        self.store = Store(self.cache, workers=2)
        # A second node: same remote, its own empty cache.
        self.local2 = FilesystemBackend(tmp / "local2", durability="none")
        self.cache2 = CachingBackend(self.remote, self.local2)
        self.store2 = Store(self.cache2, workers=2)

    def names(self, backend: FilesystemBackend, prefix: str = "") -> set[str]:
        return {i.name for i in backend.list(prefix)}


@pytest.fixture
def s(tmp_path: Path) -> Iterator[Setup]:
    setup = Setup(tmp_path)
    yield setup
    setup.store.close()
    setup.store2.close()


def test_round_trip_and_second_read_is_local(s: Setup) -> None:
    data = rand(300_000)
    s.store.commit(result_for(s.store, data))
    # Node 2 reads: first from the remote, filling its cache ...
    hit = s.store2.get_ref(KEY)
    assert hit is not None and s.store2.load_value(hit.result.value) == data
    first = s.remote.calls.copy()
    assert first[("get_range", "packs")] > 0
    # ... then entirely from the cache: no content object or range is fetched again.
    hit = s.store2.get_ref(KEY)
    assert hit is not None and s.store2.load_value(hit.result.value) == data
    new = s.remote.calls - first
    assert {kind for (op, kind) in new if op in ("get", "get_range")} == {"refs"}  # refs are never cached
    assert s.cache2.counters.hits > 0
    assert not s.names(s.local2, "refs/")
    blob = hit.result.value.blob
    assert blob is not None
    kept = kept_ranges(s.local2)
    for chunk, _ in s.store2.blob_manifest(blob.digest).chunks:  # every chunk read is inside a kept range
        loc = s.store2.chunks.index.locations(chunk)[0]
        assert any(start <= loc.offset and loc.offset + loc.length <= start + size
                   for start, size in kept[loc.pack[3:]])


def test_writes_go_remote_and_populate_local(s: Setup) -> None:
    s.store.commit(result_for(s.store, rand(200_000)))
    for prefix in ("packs/", "blobs/", "results/"):
        assert s.names(s.local, prefix) == s.names(s.remote_fs, prefix) != set()
    assert s.names(s.remote_fs, "refs/") and not s.names(s.local, "refs/")


def test_put_if_absent_always_asks_the_remote(s: Setup) -> None:
    ref = s.store.put_bytes(rand(100_000))
    for info in list(s.remote_fs.list("blobs/")):  # the remote lost them (gc) but this node has copies
        s.remote_fs.delete(info.name)
    s.store.put_bytes(rand(100_000))
    assert s.names(s.remote_fs, "blobs/") == s.names(s.local, "blobs/") != set()
    assert s.store2.get_bytes(ref.digest) == rand(100_000)


def test_refs_cannot_be_cached(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="refs"):
        CachingBackend(FilesystemBackend(tmp_path / "r"), FilesystemBackend(tmp_path / "l"), ("refs/",))


def _corrupt(backend: FilesystemBackend, name: str) -> bytes:
    path = backend.root / name
    good = path.read_bytes()
    path.write_bytes(good[:-3] + bytes(b ^ 0xFF for b in good[-3:]))
    return good


def kept_ranges(local: FilesystemBackend) -> dict[str, list[tuple[int, int]]]:
    """Pack hex -> (offset, length) of the ranges a cache keeps."""
    kept: dict[str, list[tuple[int, int]]] = {}
    for info in local.list("ranges/"):
        _, _, pack, span = info.name.split("/")
        start, size = span.split("-")
        kept.setdefault(pack, []).append((int(start), int(size)))
    return kept


def _corrupt_chunk(backend: FilesystemBackend, store: Store, chunk: str) -> tuple[str, Location, bytes]:
    """Flip a byte inside `chunk`'s packed copy as `backend` holds it; (pack name, where, good bytes)."""
    loc = store.chunks.index.locations(chunk)[0]
    name = object_name("packs", loc.pack)
    path = backend.root / name
    good = path.read_bytes()
    data = bytearray(good)
    data[loc.offset + loc.length // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return name, loc, good


def _value_chunk(store: Store, data: bytes) -> str:
    return store.blob_manifest(b3(data)).chunks[0][0]


def test_corrupt_local_chunk_is_refetched_and_remote_untouched(s: Setup) -> None:
    data = rand(300_000, 1)
    s.store.commit(result_for(s.store, data))
    name, _, good = _corrupt_chunk(s.local, s.store, _value_chunk(s.store, data))  # the pack this node wrote
    hit = s.store.get_ref(KEY)
    assert hit is not None and s.store.load_value(hit.result.value) == data  # served, correctly
    assert s.remote_fs.get(name) == good  # the remote copy is untouched ...
    assert not s.names(s.remote_fs, "quarantine/")  # ... and nothing was quarantined
    assert not s.local.exists(name) and s.names(s.local, "ranges/")  # the local copy gave way to remote ranges
    assert s.cache.counters.dropped_damaged == 1
    assert s.store.load_value(hit.result.value) == data


@pytest.mark.parametrize("kind", ["results", "blobs"])
def test_corrupt_local_manifest_is_refetched(s: Setup, kind: str) -> None:
    data = rand(100_000, 2)
    s.store.commit(result_for(s.store, data))
    name = sorted(s.names(s.local, f"{kind}/"))[0]
    good = _corrupt(s.local, name)
    hit = s.store.get_ref(KEY)
    assert hit is not None and s.store.load_value(hit.result.value) == data
    assert s.remote_fs.get(name) == good and not s.names(s.remote_fs, "quarantine/")


def test_corrupt_remote_chunk_is_quarantined_and_not_cached(s: Setup) -> None:
    data = rand(300_000, 3)
    s.store.commit(result_for(s.store, data))
    chunk = _value_chunk(s.store, data)
    _, loc, _ = _corrupt_chunk(s.remote_fs, s.store, chunk)
    hit = s.store2.get_ref(KEY)  # node 2 has no copies: it reads the damaged remote one
    assert hit is not None
    with pytest.raises(StoreCorrupted):
        s.store2.load_value(hit.result.value)
    assert not any(start < loc.offset + loc.length and loc.offset < start + size  # no damaged byte kept
                   for start, size in kept_ranges(s.local2).get(loc.pack[3:], []))
    assert any(chunk[3:] in name for name in s.names(s.remote_fs, "quarantine/"))
    assert s.store2.get_ref(KEY) is None  # a ref with a missing chunk is never served


def test_corrupt_everywhere_is_quarantined_everywhere(s: Setup) -> None:
    data = rand(300_000, 4)
    s.store.commit(result_for(s.store, data))
    chunk = _value_chunk(s.store, data)
    name, loc, _ = _corrupt_chunk(s.remote_fs, s.store, chunk)
    _corrupt_chunk(s.local, s.store, chunk)
    hit = s.store.get_ref(KEY)
    assert hit is not None
    with pytest.raises(StoreCorrupted):
        s.store.load_value(hit.result.value)
    assert not s.local.exists(name)  # nothing damaged is kept here: not the pack, no range over the chunk
    assert not any(start < loc.offset + loc.length and loc.offset < start + size
                   for start, size in kept_ranges(s.local).get(loc.pack[3:], []))
    assert any(chunk[3:] in q for q in s.names(s.remote_fs, "quarantine/"))  # the remote copy is on record
    assert s.store.get_ref(KEY) is None and s.store2.get_ref(KEY) is None  # so no node serves it


def test_delete_keeps_a_remote_copy_that_differs_from_the_local_one(s: Setup) -> None:
    ref = s.store.put_bytes(rand(50_000, 5))
    name = object_name("blobs", ref.digest)
    good = _corrupt(s.local, name)
    s.cache.delete(name)  # e.g. a Store without the drop_cached hook quarantining the local copy
    assert s.remote_fs.get(name) == good and not s.local.exists(name)
    s.cache.get(name)  # refilled
    s.cache.delete(name)  # same bytes on both sides: a real delete
    assert not s.remote_fs.exists(name) and not s.local.exists(name)
    s.cache.delete(name)  # idempotent


def test_lru_eviction_keeps_recently_used(tmp_path: Path) -> None:
    remote = FilesystemBackend(tmp_path / "r", durability="none")
    local = FilesystemBackend(tmp_path / "l", durability="none")
    names = [f"chunks/00/{i:064x}" for i in range(10)]
    for n in names:
        remote.put(n, b"x" * 1000)
    cache = CachingBackend(remote, local, max_bytes=5000)
    for i, n in enumerate(names[:5]):
        cache.get(n)
        os.utime(local.root / n, (1000 + i, 1000 + i))  # distinct ages without sleeping
    cache.get(names[0])  # a hit makes the oldest the most recently used
    assert os.stat(local.root / names[0]).st_mtime > 2000
    cache.get(names[5])  # over the cap: evict down to 90 % (4500 bytes)
    kept = {i.name for i in local.list("chunks/")}
    assert kept == {names[0], names[3], names[4], names[5]}
    assert cache.cached_bytes() <= 4500 and cache.counters.evicted == 2
    assert all(cache.get(n) == b"x" * 1000 for n in names)  # evicted copies refill from the remote


def test_oversized_objects_are_not_cached(tmp_path: Path) -> None:
    remote = FilesystemBackend(tmp_path / "r", durability="none")
    cache = CachingBackend(remote, FilesystemBackend(tmp_path / "l"), max_bytes=10)
    remote.put("chunks/00/" + "0" * 64, b"y" * 100)
    assert cache.get("chunks/00/" + "0" * 64) == b"y" * 100
    assert cache.cached_bytes() == 0


def test_exists_and_get_of_absent_objects(s: Setup) -> None:
    name = "chunks/aa/" + "a" * 64
    assert not s.cache.exists(name)
    with pytest.raises(NotFound):
        s.cache.get(name)
    assert not s.local.exists(name)


def test_gc_through_the_cache_keeps_live_data(s: Setup) -> None:
    live = rand(200_000, 6)
    s.store.commit(result_for(s.store, live))
    s.store.put_bytes(rand(200_000, 7))  # unreferenced
    report = s.store.gc(grace_seconds=0)
    assert report.deleted > 0
    hit = s.store2.get_ref(KEY)
    assert hit is not None and s.store2.load_value(hit.result.value) == live
    assert s.store.verify().ok
