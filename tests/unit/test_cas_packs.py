"""Pack files on the filesystem backend: round trip, deduplication without requests, damage
detected on every read, and nothing visible before a writer's index segment."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest

from memoplane.cas import FilesystemBackend, b3
from memoplane.cas.backend import Backend, ObjectInfo
from memoplane.cas.cached import CachingBackend
from memoplane.cas.chunking import ChunkParams, Pools, encode_chunk, ingest_buffer
from memoplane.cas.digests import object_name
from memoplane.cas.packs import (
    AMPLIFICATION,
    INDEX,
    PACKS,
    Location,
    PackDamaged,
    PackIndex,
    PackWriter,
    build_segment,
    index_pack,
    parse_pack,
    plan_reads,
    read_chunk,
    read_chunks,
)
from memoplane.errors import NotFound

KiB = 1 << 10


def chunks(n: int, seed: int = 0, size: int = 20 * KiB) -> list[bytes]:
    rng = random.Random(seed)
    # half compressible, half random: both stored forms (zstd and raw) go through packs
    return [rng.randbytes(size) if i % 2 else bytes([i % 251]) * size for i in range(n)]


def add_all(writer: PackWriter, plains: list[bytes]) -> list[bool]:
    return [writer.add(b3(p), partial(encode_chunk, p), len(p)) for p in plains]


@pytest.fixture
def backend(tmp_path: Path) -> FilesystemBackend:
    return FilesystemBackend(tmp_path / "store", durability="none")


def eventually(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait (up to `timeout` seconds) until `condition()` holds: a writer's upload thread PUTs
    sealed packs in the background."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)


def loaded(backend: Backend) -> PackIndex:
    index = PackIndex()
    index.refresh(backend)
    return index


def names(backend: Backend, prefix: str) -> list[str]:
    return [info.name for info in backend.list(prefix)]


def test_round_trip_through_a_fresh_index(backend: FilesystemBackend) -> None:
    plains = chunks(40)
    writer = PackWriter(backend, PackIndex(), target=256 * KiB)
    assert all(add_all(writer, plains))
    writer.flush()

    index = loaded(backend)
    assert len(index) == len(plains)
    assert [read_chunk(backend, index, b3(p)) for p in plains] == plains
    assert len(names(backend, PACKS)) > 1  # the target rolled packs over
    assert len(names(backend, INDEX)) == 1  # one segment per flush, whatever the number of packs


def test_a_pack_describes_itself(backend: FilesystemBackend) -> None:
    plains = chunks(6)
    writer = PackWriter(backend, PackIndex())
    add_all(writer, plains)
    writer.flush()
    (pack,) = names(backend, PACKS)
    data = backend.get(pack)
    assert object_name("packs", b3(data)) == pack
    trailer = parse_pack(data)
    assert [digest for digest, *_ in trailer] == [b3(p) for p in plains]
    index = loaded(backend)
    for digest, offset, length, plain in trailer:
        (loc,) = index.locations(digest)
        assert (loc.offset, loc.length, loc.plain) == (offset, length, plain)


def test_deduplication_asks_the_index_not_the_backend(backend: FilesystemBackend) -> None:
    plains = chunks(10)
    first = PackWriter(backend, PackIndex())
    add_all(first, plains)
    assert add_all(first, plains) == [False] * len(plains)  # still in the open pack
    first.flush()

    def never(*_: object) -> bytes:
        raise AssertionError("a known chunk was encoded again")

    counting = _CountingBackend(backend)
    second = PackWriter(counting, loaded(backend))
    assert [second.add(b3(p), never, len(p)) for p in plains] == [False] * len(plains)
    second.flush()
    assert counting.requests == 0


def test_damaged_chunk_bytes_are_never_served(backend: FilesystemBackend) -> None:
    plains = chunks(4)
    writer = PackWriter(backend, PackIndex())
    add_all(writer, plains)
    writer.flush()
    index = loaded(backend)
    (pack,) = names(backend, PACKS)
    loc = index.locations(b3(plains[1]))[0]
    path = backend.root / pack
    data = bytearray(path.read_bytes())
    data[loc.offset + loc.length // 2] ^= 0x01
    path.write_bytes(bytes(data))

    with pytest.raises(PackDamaged):
        read_chunk(backend, index, b3(plains[1]))
    assert read_chunk(backend, index, b3(plains[0])) == plains[0]  # its neighbours still read


def test_a_forged_segment_cannot_substitute_content(backend: FilesystemBackend) -> None:
    good, wanted = chunks(2)
    writer = PackWriter(backend, PackIndex())
    add_all(writer, [good])
    writer.flush()
    real = loaded(backend).locations(b3(good))[0]
    forged = build_segment([(b3(wanted), real)])  # `wanted` "is" where `good` is
    backend.put(object_name("index", b3(forged)), forged)

    index = loaded(backend)
    with pytest.raises(PackDamaged, match="does not hash"):
        read_chunk(backend, index, b3(wanted))


def test_a_damaged_segment_adds_nothing(backend: FilesystemBackend) -> None:
    plains = chunks(3)
    writer = PackWriter(backend, PackIndex())
    add_all(writer, plains)
    writer.flush()
    (segment,) = names(backend, INDEX)
    path = backend.root / segment
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))

    index = loaded(backend)
    assert len(index) == 0
    assert index.damaged == [segment]
    with pytest.raises(NotFound):
        read_chunk(backend, index, b3(plains[0]))


def test_a_writer_killed_before_its_segment_leaves_nothing_visible(backend: FilesystemBackend) -> None:
    plains = chunks(30)
    writer = PackWriter(backend, PackIndex(), target=128 * KiB)
    add_all(writer, plains)  # packs are PUT as they fill; the writer dies without flush()
    eventually(lambda: bool(names(backend, PACKS)))

    index = loaded(backend)
    assert len(index) == 0 and names(backend, INDEX) == []
    with pytest.raises(NotFound):
        read_chunk(backend, index, b3(plains[0]))
    # and a later writer packs those chunks again rather than trusting the orphaned packs
    assert all(add_all(PackWriter(backend, index), plains))


def test_an_unindexed_pack_is_indexed_from_its_trailer_only_when_it_verifies(backend: FilesystemBackend) -> None:
    plains = chunks(6)
    writer = PackWriter(backend, PackIndex(), target=1)  # every chunk a pack of its own
    add_all(writer, plains)  # and the writer dies before its segment
    eventually(lambda: len(names(backend, PACKS)) == len(plains))
    packs = names(backend, PACKS)
    damaged, *good = packs
    path = backend.root / damaged
    data = bytearray(path.read_bytes())
    data[3] ^= 0x01
    path.write_bytes(bytes(data))

    index = PackIndex()
    with pytest.raises(PackDamaged):
        index_pack(backend, index, damaged)
    assert sum(index_pack(backend, index, pack) for pack in good) == len(good)
    fresh = loaded(backend)
    readable = [p for p in plains if b3(p) in fresh]
    assert len(readable) == len(good) and len(fresh) == len(good)
    assert [read_chunk(backend, fresh, b3(p)) for p in readable] == readable


def test_a_pack_missing_behind_its_segment_is_reported(backend: FilesystemBackend) -> None:
    plains = chunks(2)
    writer = PackWriter(backend, PackIndex())
    add_all(writer, plains)
    writer.flush()
    for pack in names(backend, PACKS):
        backend.delete(pack)
    with pytest.raises(PackDamaged, match="not in the store"):
        read_chunk(backend, loaded(backend), b3(plains[0]))


def test_concurrent_writers_lose_nothing(backend: FilesystemBackend) -> None:
    shared = chunks(20, seed=1)
    own = [chunks(20, seed=10 + i) for i in range(3)]
    errors: list[BaseException] = []

    def write(plains: list[bytes]) -> None:
        try:
            writer = PackWriter(backend, PackIndex(), target=128 * KiB)
            add_all(writer, shared + plains)
            writer.flush()
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(plains,)) for plains in own]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    index = loaded(backend)
    for plain in shared + [p for plains in own for p in plains]:
        assert read_chunk(backend, index, b3(plain)) == plain
    # Writers that packed the same chunks in the same order wrote the same pack (same name);
    # others keep a duplicate, which the index lists as a second location and GC's repack drops.


def test_an_ingest_writes_through_packs_in_few_requests(backend: FilesystemBackend) -> None:
    MiB = 1 << 20
    data = random.Random(5).randbytes(8 * MiB)
    counting = _CountingBackend(backend)
    writer = PackWriter(counting, PackIndex(), target=2 * MiB)
    pools = Pools(2)
    try:
        ingested = ingest_buffer(data, ChunkParams(), pools, writer.add)
    finally:
        pools.close()
    writer.flush()
    packs = names(backend, PACKS)
    assert len(packs) == 4 and counting.requests == len(packs) + 1  # a PUT per pack, one per segment
    assert ingested.new_chunks == len(ingested.chunks) > 300  # ~24 KiB chunks, not ~300 requests

    counting.requests = 0
    got = read_chunks(counting, loaded(backend), [d for d, _ in ingested.chunks])
    assert b"".join(got[d] for d, _ in ingested.chunks) == data
    assert counting.requests == len(packs)


def test_a_node_cache_reads_packs_by_range(backend: FilesystemBackend, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    plains = chunks(8)
    writer = PackWriter(backend, PackIndex())
    add_all(writer, plains)
    writer.flush()
    index = loaded(backend)

    def whole(name: str) -> bytes:
        raise AssertionError(f"{name} was read whole")

    monkeypatch.setattr(backend, "get", whole)
    cache = CachingBackend(backend, FilesystemBackend(tmp_path / "cache", durability="none"))
    assert [read_chunk(cache, index, b3(p)) for p in plains] == plains


def test_plans_merge_neighbours_and_bound_amplification() -> None:
    rng = random.Random(3)
    wanted = []
    for p in range(3):
        offset = 0
        for _ in range(200):
            length = rng.randrange(1, 40 * KiB)
            if rng.random() < 0.6:
                wanted.append((f"b3:{p}-{offset}", Location(f"pack{p}", offset, length, length)))
            offset += length
    spans = plan_reads(wanted, max_gap=64 * KiB, max_span=1 << 20)
    assert sorted(c for s in spans for c in s.chunks) == sorted(wanted)  # each chunk in exactly one span
    assert len(spans) < len(wanted) / 4  # neighbours were merged
    for s in spans:
        assert {loc.pack for _, loc in s.chunks} == {s.pack}
        assert len(s.chunks) == 1 or (s.length <= AMPLIFICATION * s.wanted() and s.length <= 1 << 20)
        assert all(s.offset <= loc.offset and loc.offset + loc.length <= s.offset + s.length for _, loc in s.chunks)


def test_a_far_chunk_is_a_read_of_its_own() -> None:
    near = [("b3:a", Location("p", 0, 100, 100)), ("b3:b", Location("p", 100, 100, 100))]
    far = ("b3:c", Location("p", 10_000, 100, 100))
    assert [len(s.chunks) for s in plan_reads([*near, far])] == [2, 1]


def test_coalesced_reads_cost_one_request_per_pack(backend: FilesystemBackend) -> None:
    plains = chunks(40)
    writer = PackWriter(backend, PackIndex(), target=256 * KiB)
    add_all(writer, plains)
    writer.flush()
    index = loaded(backend)
    counting = _CountingBackend(backend)
    with ThreadPoolExecutor(2) as pool:
        got = read_chunks(counting, index, [b3(p) for p in plains], executor=pool)
    assert [got[b3(p)] for p in plains] == plains
    assert counting.requests == len(names(backend, PACKS))


def test_a_damaged_copy_falls_back_to_another_location(backend: FilesystemBackend) -> None:
    plains = chunks(4)
    for order in (plains, plains[::-1]):  # two packs holding every chunk, at different offsets
        writer = PackWriter(backend, PackIndex())
        add_all(writer, order)
        writer.flush()
    index = loaded(backend)
    assert len(index.locations(b3(plains[1]))) == 2
    first = index.locations(b3(plains[1]))[0]
    path = backend.root / object_name("packs", first.pack)
    data = bytearray(path.read_bytes())
    data[first.offset + 1] ^= 0xFF
    path.write_bytes(bytes(data))

    got = read_chunks(backend, index, [b3(p) for p in plains])
    assert [got[b3(p)] for p in plains] == plains
    for loc in index.locations(b3(plains[1]))[1:]:  # with every copy damaged, nothing is served
        path = backend.root / object_name("packs", loc.pack)
        data = bytearray(path.read_bytes())
        data[loc.offset + 1] ^= 0xFF
        path.write_bytes(bytes(data))
    with pytest.raises(PackDamaged):
        read_chunks(backend, index, [b3(p) for p in plains])


class _HeldPuts(FilesystemBackend):
    """Pack PUTs wait for `release`; the first `failures` of them fail instead."""

    def __init__(self, root: Path, failures: int = 0) -> None:
        super().__init__(root, durability="none")
        self.release = threading.Event()
        self.failures = failures

    def _hold(self, name: str) -> None:
        if name.startswith(PACKS):
            self.release.wait()
            if self.failures:
                self.failures -= 1
                raise OSError("the object store went away")

    def put(self, name: str, data: bytes) -> None:
        self._hold(name)
        super().put(name, data)

    def put_if_absent(self, name: str, data: bytes | Callable[[], bytes]) -> bool:
        self._hold(name)
        return super().put_if_absent(name, data)


def test_packs_upload_while_chunks_keep_coming(tmp_path: Path) -> None:
    held = _HeldPuts(tmp_path / "store")
    plains = chunks(40)
    writer = PackWriter(held, PackIndex(), target=256 * KiB)  # a pack sealed, its PUT held
    adding = threading.Thread(target=add_all, args=(writer, plains))
    adding.start()
    try:
        adding.join(timeout=30)
        assert not adding.is_alive()  # every add returned while no pack PUT could finish
        assert names(held, PACKS) == []
    finally:
        held.release.set()
    writer.flush()
    index = loaded(held)
    assert [read_chunk(held, index, b3(p)) for p in plains] == plains


def test_a_failed_pack_upload_loses_no_chunk(tmp_path: Path) -> None:
    held = _HeldPuts(tmp_path / "store", failures=1)
    held.release.set()
    plains = chunks(40)
    writer = PackWriter(held, PackIndex(), target=256 * KiB)
    added = 0
    with pytest.raises(OSError, match="went away"):  # from the add after the failure, or from flush
        for plain in plains:
            added += 1
            add_all(writer, [plain])
        writer.flush()
    assert names(held, INDEX) == []  # nothing names the chunks of the pack that failed
    writer.flush()  # the writer kept them: this flush packs them again
    index = loaded(held)
    assert [read_chunk(held, index, b3(p)) for p in plains[:added]] == plains[:added]
def test_a_forked_child_writes_what_its_parent_had_in_flight(tmp_path: Path) -> None:
    held = _HeldPuts(tmp_path / "store")
    plains = chunks(40)
    writer = PackWriter(held, PackIndex(), target=256 * KiB)
    add_all(writer, plains)  # a pack sealed, its PUT held in the parent's upload thread
    try:
        child = os.fork()
        if child == 0:  # the parent's upload thread does not exist here
            held.release.set()
            try:
                writer.flush()
            finally:
                os._exit(0 if names(held, INDEX) else 1)
        deadline = time.monotonic() + 30
        while (status := os.waitpid(child, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        if status[0] == 0:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        assert status[0] == child and os.waitstatus_to_exitcode(status[1]) == 0
    finally:
        held.release.set()
    index = loaded(held)
    assert [read_chunk(held, index, b3(p)) for p in plains] == plains


class _CountingBackend:
    """The filesystem backend, counting every request a writer makes."""

    def __init__(self, inner: FilesystemBackend) -> None:
        self.inner = inner
        self.requests = 0

    def _count(self) -> None:
        self.requests += 1

    def put(self, name: str, data: bytes) -> None:
        self._count()
        self.inner.put(name, data)

    def put_if_absent(self, name: str, data: bytes | Callable[[], bytes]) -> bool:
        self._count()
        return self.inner.put_if_absent(name, data)

    def create(self, name: str, data: bytes) -> bool:
        self._count()
        return self.inner.create(name, data)

    def get(self, name: str) -> bytes:
        self._count()
        return self.inner.get(name)

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        self._count()
        return self.inner.get_range(name, offset, length)

    def exists(self, name: str) -> bool:
        self._count()
        return self.inner.exists(name)

    def delete(self, name: str) -> None:
        self._count()
        self.inner.delete(name)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self._count()
        return self.inner.list(prefix)

    def flush(self) -> None:
        self.inner.flush()

    def describe(self) -> str:
        return self.inner.describe()
