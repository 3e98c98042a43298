"""The cold tier (cas/tiers.py) with two filesystem backends: demotion, read-through, marks, crashes."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes import DelegatingBackend

from memoplane.cas import FilesystemBackend, Provenance, ResultManifest, Store, StoredValue, open_store
from memoplane.cas.backend import Backend
from memoplane.cas.cached import CachingBackend
from memoplane.cas.chunking import encode_chunk
from memoplane.cas.digests import b3, object_name
from memoplane.cas.packs import PACKS, parse_pack
from memoplane.cas.tiers import DEMOTABLE, MARKS, TieredBackend, demote, last_reads
from memoplane.errors import InputError, NotFound, StoreCorrupted

KEY = "b3:" + "7" * 64
DAY = 86400.0
AFTER = 30 * DAY


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Setup:
    def __init__(self, tmp: Path, hot: Backend | None = None, cold: Backend | None = None) -> None:
        self.hot_fs = FilesystemBackend(tmp / "hot", durability="none")
        self.cold_fs = FilesystemBackend(tmp / "cold", durability="none")
        self.clock = Clock(1_000_000.0)
        self.tiered = TieredBackend(hot or self.hot_fs, cold or self.cold_fs, after=AFTER, clock=self.clock,
                                    node="node-a")
        self.store = Store(self.tiered, workers=2)

    def commit(self, data: bytes) -> str:
        """A result whose value is `data`; returns the value's blob digest."""
        value = StoredValue("bytes", blob=self.store.put_bytes(data))
        assert value.blob is not None
        self.store.commit(ResultManifest(value=value, stdout=self.store.put_bytes(b"out"),
                                         stderr=self.store.put_bytes(b""),
                                         provenance=Provenance(KEY, {}, "b3:" + "2" * 64, "n", 0.0, 1.0, 1.0)))
        return value.blob.digest

    def names(self, backend: FilesystemBackend, prefix: str = PACKS) -> set[str]:
        return {i.name for i in backend.list(prefix)}

    def packs_of(self, blob: str) -> set[str]:
        """The packs holding the chunks of `blob` (what reading it reads)."""
        index = self.store.chunks.index
        return {object_name("packs", loc.pack) for c, _ in self.store.blob_manifest(blob).chunks
                for loc in index.locations(c)}

    def later(self, seconds: float) -> float:
        """Move the clock on; returns the new now. Objects' mtimes stay real (long ago by then)."""
        self.clock.now += seconds
        return self.clock.now


@pytest.fixture
def s(tmp_path: Path) -> Iterator[Setup]:
    setup = Setup(tmp_path)
    yield setup
    setup.store.close()


def data(n: int = 300_000, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def test_demote_moves_unread_packs_and_a_hit_reads_through_and_rewarms(s: Setup) -> None:
    payload = data()
    blob = s.commit(payload)
    packs = s.names(s.hot_fs)
    assert len(packs) > 1 and not s.names(s.cold_fs)  # the value's pack and stdout's

    report = demote(s.tiered, now=s.later(AFTER + DAY) + 2e9)  # far past every mtime
    assert report.moved == len(packs) and report.bytes_moved == sum(i.size for i in s.cold_fs.list(PACKS))
    assert not s.names(s.hot_fs) and s.names(s.cold_fs) == packs
    # manifests, results, refs and index segments stay hot
    assert s.names(s.hot_fs, "blobs/") and s.names(s.hot_fs, "results/") and s.names(s.hot_fs, "refs/")
    assert s.names(s.hot_fs, "index/") and not s.names(s.cold_fs, "index/")
    assert not s.names(s.cold_fs, "blobs/") and not s.names(s.cold_fs, "refs/")

    fresh = Store(s.tiered, workers=2)  # another process: nothing of the value in memory
    assert fresh.get_ref(KEY) is not None
    assert fresh.get_bytes(blob) == payload
    read = s.packs_of(blob)
    assert s.names(s.hot_fs) == read and len(read) < len(packs)  # re-warmed: what was read, no more
    assert s.tiered.counters.cold_reads == len(read)  # each pack fetched once, whatever its ranges
    assert all(s.hot_fs.get(n) == s.cold_fs.get(n) for n in read)
    fresh.close()


def test_objects_read_or_written_within_after_stay_hot(s: Setup) -> None:
    blob = s.commit(data())
    written_at = max(i.mtime for i in s.hot_fs.list(PACKS))
    s.clock.now = written_at
    # Not read since the write: demoted once `after` has passed, not before.
    assert demote(s.tiered, now=written_at + AFTER - 60).moved == 0
    s.clock.now = written_at + AFTER - 30
    s.store.get_bytes(blob)  # a read late in the period: noted, then written as one mark
    read = s.packs_of(blob)
    s.tiered.flush_marks()
    assert set(last_reads(s.hot_fs)[0]) == read
    report = demote(s.tiered, now=written_at + AFTER + 60)
    assert s.names(s.hot_fs) == read and report.kept_hot == len(read) and report.moved == 1  # stdout's pack
    assert demote(s.tiered, now=written_at + 2 * AFTER).moved == len(read)


def marked(s: Setup) -> list[str]:
    """Every name in every mark object, once per mark (after flushing what this process noted)."""
    s.tiered.flush_marks()
    return sorted(n for i in s.hot_fs.list(MARKS) for n in s.hot_fs.get(i.name).decode().splitlines())


def test_an_object_is_noted_once_a_day_and_old_marks_are_dropped(s: Setup) -> None:
    blob = s.commit(data(200_000))  # past what a Store keeps of the small blobs it wrote: reads go to packs
    read = sorted(s.packs_of(blob))
    for _ in range(3):
        s.store.get_bytes(blob)
    assert marked(s) == read
    s.store.get_bytes(blob)  # the same day: not noted again
    assert marked(s) == read
    s.later(DAY)
    s.store.get_bytes(blob)  # the next day: noted again
    assert marked(s) == sorted(read * 2)
    marks = len(list(s.hot_fs.list(MARKS)))
    report = demote(s.tiered, now=s.clock.now + AFTER + 1)
    assert report.marks_dropped == marks >= 2 and not list(s.hot_fs.list(MARKS))


def forge(backend: FilesystemBackend, pack: str) -> bytes:
    """Replace the first chunk of `pack` with other bytes of the same stored length; returns them."""
    body = backend.get(pack)
    _, offset, length, _ = parse_pack(body)[0]
    forged = encode_chunk(random.Random(7).randbytes(length * 2))[:length]
    backend.put(pack, body[:offset] + forged + body[offset + length:])
    return forged


def test_a_forged_pack_in_the_cold_tier_is_never_served_nor_rewarmed(s: Setup) -> None:
    payload = data()
    blob = s.commit(payload)
    demote(s.tiered, now=s.later(AFTER) + 2e9)
    (victim,) = s.packs_of(blob)
    forged = forge(s.cold_fs, victim)
    fresh = Store(s.tiered, workers=2)
    with pytest.raises(StoreCorrupted):
        fresh.get_bytes(blob)
    # the damaged copy is quarantined (the bytes read kept aside for inspection); the forged pack
    # never entered hot, and no Store serves the ref with a chunk gone
    assert any(s.hot_fs.get(i.name) == forged for i in s.hot_fs.list("quarantine/"))
    assert not s.hot_fs.exists(victim) and s.tiered.counters.cold_reads == 0
    assert fresh.get_ref(KEY) is None
    with Store(s.tiered, workers=1) as later:
        assert later.get_ref(KEY) is None
    fresh.close()


class Crashing(DelegatingBackend):
    """Raises on the first call of `op` (a process killed at that point of a demotion)."""

    def __init__(self, inner: Backend, op: str) -> None:
        super().__init__(inner)
        self.op, self.armed = op, True

    def before(self, op: str, name: str) -> None:
        if op == self.op and self.armed and name.startswith(DEMOTABLE):
            self.armed = False
            raise OSError(f"killed during {op} of {name}")


@pytest.mark.parametrize(("side", "op"), [("cold", "put"), ("cold", "get"), ("hot", "delete")])
def test_a_crash_at_any_point_of_a_demotion_loses_nothing(tmp_path: Path, side: str, op: str) -> None:
    hot = FilesystemBackend(tmp_path / "hot", durability="none")
    cold = FilesystemBackend(tmp_path / "cold", durability="none")
    s = Setup(tmp_path, hot=Crashing(hot, op) if side == "hot" else hot,
              cold=Crashing(cold, op) if side == "cold" else cold)
    payload = data()
    blob = s.commit(payload)
    packs = s.names(s.hot_fs)
    with pytest.raises(OSError, match="killed"):
        demote(s.tiered, now=s.later(AFTER) + 2e9)
    # every pack is somewhere, and the store still serves the whole result
    assert all(s.hot_fs.exists(p) or s.cold_fs.exists(p) for p in packs)
    left_hot = {p for p in packs if s.hot_fs.exists(p)}
    fresh = Setup(tmp_path)  # the next process, no crash
    assert fresh.store.get_ref(KEY) is not None
    report = demote(fresh.tiered, now=fresh.later(AFTER) + 2e9)
    assert fresh.names(fresh.cold_fs) == packs and not fresh.names(fresh.hot_fs)
    assert report.moved == len(left_hot)
    assert fresh.store.get_bytes(blob) == payload
    fresh.store.close()
    s.store.close()


def test_a_damaged_range_in_the_node_cache_under_the_tier_is_dropped_and_read_again(tmp_path: Path) -> None:
    """An agent's stack (cluster/stores.py): the tier over a node cache over the hot remote."""
    local = FilesystemBackend(tmp_path / "node", durability="none")
    cache = CachingBackend(FilesystemBackend(tmp_path / "hot", durability="none"), local)
    s = Setup(tmp_path, hot=cache)
    payload = data()
    blob = s.commit(payload)
    for info in list(local.list(PACKS)):   # a node that did not write the packs: it keeps ranges
        local.delete(info.name)
    with Store(s.tiered, workers=2) as reader:
        assert reader.get_bytes(blob) == payload
    kept = sorted(local.list("ranges/"), key=lambda i: i.size)[-1].name
    body = bytearray(local.get(kept))
    body[len(body) // 2] ^= 0xFF
    local.put(kept, bytes(body))
    with Store(s.tiered, workers=2) as again:
        assert again.get_bytes(blob) == payload   # re-read from the remote, not taken for remote damage
    assert cache.counters.dropped_damaged >= 1 and not list(s.hot_fs.list("quarantine/"))
    s.store.close()


def test_a_demotion_through_a_node_cache_reads_each_pack_once_and_caches_none(tmp_path: Path) -> None:
    remote = Recording(FilesystemBackend(tmp_path / "hot", durability="none"))
    local = FilesystemBackend(tmp_path / "node", durability="none")
    s = Setup(tmp_path, hot=CachingBackend(remote, local))
    s.commit(data())
    for info in list(local.list(PACKS)):   # as on a node that did not write them
        local.delete(info.name)
    packs = s.names(s.hot_fs)
    remote.calls.clear()
    assert demote(s.tiered, now=s.later(AFTER) + 2e9).moved == len(packs)
    assert sorted(n for op, n in remote.calls if op == "get") == sorted(packs)
    assert not list(local.list(PACKS)) and not list(local.list("ranges/"))
    s.store.close()


def test_a_copy_that_does_not_read_back_equal_stays_hot(tmp_path: Path) -> None:
    class Lossy(DelegatingBackend):
        def put(self, name: str, data: bytes) -> None:
            super().put(name, data[:-1])

    s = Setup(tmp_path, cold=Lossy(FilesystemBackend(tmp_path / "cold", durability="none")))
    s.commit(data())
    packs = s.names(s.hot_fs)
    report = demote(s.tiered, now=s.later(AFTER) + 2e9)
    assert report.failed == len(packs) > 0 and report.moved == 0 and s.names(s.hot_fs) == packs
    s.store.close()


def test_a_ranged_read_from_cold_rewarms_the_whole_object_once(s: Setup) -> None:
    pack = bytes(range(256)) * 4096
    name = object_name("packs", b3(pack))
    s.cold_fs.put(name, pack)
    got: list[bytes] = []
    barrier = threading.Barrier(8)

    def read(i: int) -> None:
        barrier.wait()
        got.append(s.tiered.get_range(name, i * 1000, 500))

    threads = [threading.Thread(target=read, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(pack[i * 1000:i * 1000 + 500] for i in range(8))
    assert s.tiered.counters.cold_reads == 1 and s.hot_fs.get(name) == pack


def test_list_is_the_union_and_gc_deletes_from_both_tiers(s: Setup) -> None:
    s.commit(data())
    demote(s.tiered, now=s.later(AFTER) + 2e9)
    orphan = s.store.put_bytes(data(100_000, seed=9))  # no ref reaches it
    hot_only = s.names(s.hot_fs)
    listed = {i.name for i in s.tiered.list(PACKS)}
    assert listed == hot_only | s.names(s.cold_fs) and len(listed) == len(list(s.tiered.list(PACKS)))
    assert not list(s.tiered.list("refs/x"))  # names cold never holds are listed from hot only
    live_cold = s.names(s.cold_fs)
    demote(s.tiered, now=s.clock.now + 2e9)  # the orphan's pack goes cold too
    (orphan_pack,) = s.names(s.cold_fs) - live_cold
    first = s.store.gc(grace_seconds=0)  # repack's pass 1 condemns the dead pack, pass 2 deletes it
    assert first.deleted > 0 and first.packs.packs_condemned == 1
    assert not s.hot_fs.exists(object_name("blobs", orphan.digest))
    second = s.store.gc(grace_seconds=0)
    assert second.packs.packs_deleted == 1 and not s.cold_fs.exists(orphan_pack)
    assert not s.names(s.hot_fs) and s.names(s.cold_fs) == live_cold  # the live packs stay cold
    assert s.store.get_ref(KEY) is not None


def test_a_repack_of_a_cold_pack_neither_rewarms_it_nor_keeps_it_hot(s: Setup) -> None:
    live = data(200_000)
    s.store.put_bytes(live + data(400_000, seed=5))   # no ref reaches it; its pack holds most of `live` too
    blob = s.commit(live)
    demote(s.tiered, now=s.later(AFTER) + 2e9)
    cold = s.names(s.cold_fs)
    first = s.store.gc(grace_seconds=0)   # pass 1 copies the live chunks out of the mostly dead pack
    assert first.packs.packs_condemned == 1 and first.packs.chunks_repacked > 0
    assert s.tiered.counters.cold_reads == 0 and s.names(s.hot_fs).isdisjoint(cold)   # read from cold in place
    assert s.tiered.flush_marks() == 0   # and not noted as a use
    assert s.store.gc(grace_seconds=0).packs.packs_deleted == 1 and len(s.names(s.cold_fs)) == len(cold) - 1
    with Store(s.tiered, workers=1) as reader:
        assert reader.get_bytes(blob) == live


def test_not_demotable_names_never_go_to_cold(s: Setup) -> None:
    s.hot_fs.put("refs/" + "a" * 64, b"x")
    with pytest.raises(NotFound):
        s.tiered.get("refs/" + "b" * 64)
    s.cold_fs.put("blobs/aa/" + "a" * 64, b"x")
    with pytest.raises(NotFound):
        s.tiered.get("blobs/aa/" + "a" * 64)  # cold is asked only for demotable names
    with pytest.raises(InputError, match="after"):
        TieredBackend(s.hot_fs, s.cold_fs, after=0)


def test_marks_older_than_a_day_are_merged_into_one_per_day_and_keep_what_they_kept(s: Setup) -> None:
    blob = s.commit(data(200_000))
    written_at = max(i.mtime for i in s.hot_fs.list(PACKS))
    read = s.packs_of(blob)
    for hour in range(0, 48, 6):   # two days of reads, each noted by a process of its own
        s.clock.now = written_at + 20 * DAY + hour * 3600
        reader = TieredBackend(s.hot_fs, s.cold_fs, after=AFTER, clock=s.clock, node=f"n{hour}")
        with Store(reader, workers=1) as store:
            store.get_bytes(blob)
        reader.flush_marks()
    assert len(list(s.hot_fs.list(MARKS))) == 8
    newest_before = last_reads(s.hot_fs)[0]
    report = demote(s.tiered, now=written_at + 22 * DAY + 3600)
    merged_into = len(list(s.hot_fs.list(MARKS))) - (8 - report.marks_merged)
    assert report.marks_merged >= 4 and 1 <= merged_into <= 2   # those older than a day: one per day
    newest_after = last_reads(s.hot_fs)[0]
    assert set(newest_after) == read
    assert all(newest_before[n] <= newest_after[n] < newest_before[n] + DAY for n in read)
    # the merged marks still keep the read chunks hot until `after` past their last read, then let them go
    demote(s.tiered, now=written_at + 21 * DAY + AFTER)
    assert s.names(s.hot_fs) == read   # the pack never read (stdout's) went
    assert demote(s.tiered, now=written_at + 23 * DAY + AFTER).moved == len(read)


def test_open_store_builds_the_tier_from_an_argument_or_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEMOPLANE_COLD_STORE", raising=False)
    with open_store(tmp_path / "a") as plain:
        assert not isinstance(plain.backend, TieredBackend)
    with open_store(tmp_path / "a", cold=(str(tmp_path / "c"), 60.0)) as given:
        assert isinstance(given.backend, TieredBackend) and given.backend.after == 60.0
    monkeypatch.setenv("MEMOPLANE_COLD_STORE", str(tmp_path / "c"))
    with open_store(tmp_path / "a") as from_env:
        assert isinstance(from_env.backend, TieredBackend) and from_env.backend.after == 30 * DAY
    monkeypatch.setenv("MEMOPLANE_COLD_AFTER_SECONDS", "-5")
    with pytest.raises(InputError, match="MEMOPLANE_COLD_AFTER_SECONDS"):
        open_store(tmp_path / "a")


class Recording(DelegatingBackend):
    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.calls: list[tuple[str, str]] = []

    def before(self, op: str, name: str) -> None:
        self.calls.append((op, name))


def test_verify_reads_every_tier_without_rewarming_or_keeping_anything_hot(tmp_path: Path) -> None:
    recording = Recording(FilesystemBackend(tmp_path / "cold", durability="none"))
    s = Setup(tmp_path, cold=recording)
    blob = s.commit(data())
    demote(s.tiered, now=s.later(AFTER) + 2e9)
    cold = s.names(s.cold_fs)
    recording.calls.clear()
    assert s.store.verify().ok
    assert not s.names(s.hot_fs) and s.names(s.cold_fs) == cold and s.tiered.counters.cold_reads == 0
    # each chunk copy by its own ranged read: a scrub never fetches a whole pack per chunk
    assert {n for op, n in recording.calls if op == "get_range"} == cold
    assert not [n for op, n in recording.calls if op == "get" and n.startswith(PACKS)]
    (victim,) = s.packs_of(blob)
    forged = forge(s.cold_fs, victim)
    report = s.store.verify()   # a forged cold copy is found (and quarantined) all the same
    assert not report.ok and any(d.name.startswith(victim + ".") for d in report.damaged)
    assert any(s.hot_fs.get(i.name) == forged for i in s.hot_fs.list("quarantine/"))
    assert not s.names(s.hot_fs) and s.tiered.counters.cold_reads == 0
    assert s.tiered.flush_marks() == 0 and not list(s.hot_fs.list(MARKS))   # nothing noted as read
    with pytest.raises(StoreCorrupted):
        s.store.get_bytes(blob)
    s.store.close()


def test_a_limited_demotion_leaves_the_rest_for_the_next_call(s: Setup) -> None:
    s.commit(data())
    s.commit(data(seed=2))
    total = len(s.names(s.hot_fs))
    assert total >= 3
    first = demote(s.tiered, now=s.later(AFTER) + 2e9, limit=2)
    assert (first.moved, first.left) == (2, total - 2) and len(s.names(s.cold_fs)) == 2
    rest = demote(s.tiered, now=s.clock.now + 2e9)
    assert (rest.moved, rest.left) == (total - 2, 0) and not s.names(s.hot_fs)
