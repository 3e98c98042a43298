"""Repacking GC on the filesystem backend: two passes a grace period apart, concurrent writers,
a writer and a GC killed (SIGKILL) mid-way; every live chunk stays readable and verified, and
dead bytes are gone after pass 2. Time is injected (tests/repack_scenarios.py)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from repack_scenarios import (
    GRACE,
    POLICY,
    WRITE,
    Crash,
    Dying,
    Scenario,
    later,
    loaded,
    next_second,
    plain,
    run_killed,
    seeded,
    spec_of,
    wait_for,
)

from memoplane.cas import BlobRef, FilesystemBackend, Provenance, ResultManifest, Store, b3
from memoplane.cas.gc import gc, live_chunks
from memoplane.cas.packs import INDEX, PACKS, TOMBSTONES, PackIndex
from memoplane.cas.repack import MAX_SEGMENTS, Policy, decide, load_layout, usage, worth_repacking
from memoplane.errors import InputError, NotFound


@pytest.fixture
def backend(tmp_path: Path) -> FilesystemBackend:
    return FilesystemBackend(tmp_path / "store", durability="none")


def test_decisions_condemn_dead_and_mostly_dead_packs_once_old(backend: FilesystemBackend) -> None:
    s = seeded(backend)
    layout = load_layout(backend)
    assert decide(layout, s.mark(), POLICY, time.time()).condemn == frozenset()  # all too young
    shares = usage(layout, s.mark())
    condemned = decide(layout, s.mark(), POLICY, later()).condemn
    assert condemned == worth_repacking(shares, POLICY)
    assert {u.dead_share for p, u in shares.items() if p not in condemned} == {0.0}  # the all-live write
    assert any(0 < shares[p].dead_share < 1 for p in condemned) and any(shares[p].live == 0 for p in condemned)


def test_a_duplicate_counts_in_its_youngest_pack_only(backend: FilesystemBackend) -> None:
    s = Scenario(backend)
    first = s.write(range(4))
    again = s.write([3, 2, 1, 0], index=PackIndex())  # a writer that had not seen the first: another pack
    assert sorted(first) == sorted(again)
    shares = usage(load_layout(backend), s.mark())
    assert sorted(u.live for u in shares.values())[0] == 0 and len(shares) == 2  # the older copy is dead


def test_policy_rejects_bad_values() -> None:
    with pytest.raises(InputError, match="dead_share"):
        Policy(grace=1, min_pack_age=1, dead_share=0)
    with pytest.raises(InputError, match="grace"):
        Policy(grace=-1, min_pack_age=1)


def test_two_passes_reclaim_dead_bytes_and_keep_every_live_chunk(backend: FilesystemBackend) -> None:
    s = seeded(backend)
    stale = loaded(backend)  # a reader that never refreshes on its own
    before = s.pack_bytes()
    dead = s.dead_in_packs()

    first = s.gc(later())
    assert first.packs_condemned > 0 and first.packs_deleted == 0 and first.chunks_repacked > 0
    assert s.tombstones() == 1
    fresh = loaded(backend)
    assert not any(d in fresh for d in dead)  # condemned copies are absent for deduplication
    s.check_live()
    early = s.gc(time.time() + GRACE - 60)  # the tombstone is not a grace period old yet
    assert early.packs_deleted == early.packs_condemned == 0 and s.tombstones() == 1

    second = s.gc(later())
    assert second.packs_deleted == first.packs_condemned and s.tombstones() == 0
    assert s.dead_in_packs() == set() and s.unindexed() == set()
    assert s.pack_bytes() < before and second.bytes_deleted > 0
    s.check_live()
    s.check_live(stale)  # falls back to an index refresh for the chunks that moved


def test_a_chunk_revived_from_a_condemned_pack_is_repacked_in_pass_2(backend: FilesystemBackend) -> None:
    s = seeded(backend)
    unaware = loaded(backend)  # a writer's index, loaded before the tombstone
    s.gc(later())
    packs = s.pack_infos()
    revived = s.write([0, 1, 2], index=unaware)  # deduplicated against condemned copies: nothing written
    assert s.pack_infos() == packs
    aware = s.write([3], index=loaded(backend), commit=False)  # a writer that saw the tombstone packs it again
    assert aware[0] in loaded(backend)

    second = s.gc(later())
    assert second.chunks_repacked >= len(revived)
    assert s.dead_in_packs() == {aware[0]}  # its new pack, dead, is condemned now and deleted a pass later
    s.check_live()
    s.check_live(unaware)


def test_concurrent_writers_lose_nothing_across_both_passes(backend: FilesystemBackend) -> None:
    s = seeded(backend)
    t0 = next_second()  # packs written from here on are younger than the GC's "old"
    stop = threading.Event()
    cycles = [0, 0, 0]
    errors: list[Exception] = []

    def writer(n: int) -> None:
        rng = random.Random(n)
        try:
            while not stop.is_set():
                keys = [rng.randrange(90) for _ in range(6)] + [f"new-{n}-{cycles[n]}-{i}" for i in range(4)]
                s.write(keys)  # reloads its index each cycle, deduplicating against old chunks, dead ones too
                cycles[n] += 1
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: min(cycles) >= 2, "the writers to get going")
        first = s.gc(t0 + GRACE)
        assert first.packs_condemned > 0
        t1 = next_second()
        seen = list(cycles)  # each writer's in-flight cycle ends, then one that loaded the tombstone
        wait_for(lambda: all(c >= n + 2 for c, n in zip(cycles, seen, strict=True)), "two cycles per writer")
        second = s.gc(t1 + GRACE)
        assert second.packs_deleted >= first.packs_condemned
        wait_for(lambda: all(c >= n + 4 for c, n in zip(cycles, seen, strict=True)), "more writes after pass 2")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    s.check_live()
    s.gc(later())
    s.gc(later())
    assert s.worth_repacking() == set() and s.unindexed() == set() and s.tombstones() == 0
    s.check_live()


def test_a_writer_killed_before_its_segment_leaves_a_pack_deleted_after_grace(backend: FilesystemBackend) -> None:
    s = seeded(backend)
    run_killed("write", json.dumps(spec_of(backend)), "1", "12")
    orphans = s.unindexed()
    assert orphans
    assert s.gc(time.time()).packs_deleted == 0 and s.unindexed() == orphans  # young: kept
    s.gc(later())
    assert s.unindexed() == set()
    s.check_live()


def test_an_unindexed_pack_holding_a_live_chunk_is_indexed_not_deleted(backend: FilesystemBackend) -> None:
    s = Scenario(backend)
    run_killed("write", json.dumps(spec_of(backend)), "2", "12")
    orphans = s.unindexed()
    assert len(orphans) > 1
    data = plain("w2-0")  # a ref names a chunk only an unindexed pack holds: what the salvage is for
    s.plains[b3(data)] = data
    s.commit([b3(data)])
    report = s.gc(later())
    assert report.unindexed_indexed == 1 and report.packs_deleted == len(orphans) - 1 and s.unindexed() == set()
    s.check_live()


KILL_POINTS = [  # (pass, op, prefix, nth): the GC stops before that backend call
    (1, WRITE, PACKS, 2),  # mid-repack: one new pack written
    (1, WRITE, INDEX, 1),  # repacked packs written, their segment not
    (1, WRITE, TOMBSTONES, 1),  # repack segment written, the tombstone not
    (2, WRITE, INDEX, 1),  # pass 2 before its consolidated segment
    (2, "delete", INDEX, 1),  # consolidated segment written, nothing deleted
    (2, "delete", PACKS, 2),  # one condemned pack deleted
]


@pytest.mark.parametrize(("at_pass", "op", "prefix", "nth"), KILL_POINTS)
def test_a_gc_stopped_mid_run_is_finished_by_the_next(backend: FilesystemBackend, at_pass: int, op: str,
                                                      prefix: str, nth: int) -> None:
    s = seeded(backend)
    before = s.pack_bytes()
    if at_pass == 2:
        s.gc(later())
    with pytest.raises(Crash):
        s.gc(later(), Dying(backend, op, prefix, nth))
    s.check_live()
    s.gc(later())
    s.gc(later())
    assert s.dead_in_packs() == set() and s.unindexed() == set() and s.tombstones() == 0
    assert s.pack_bytes() < before
    s.check_live()


def test_a_gc_process_killed_mid_repack_is_finished_by_the_next(backend: FilesystemBackend, tmp_path: Path) -> None:
    s = seeded(backend)
    live = tmp_path / "live.json"
    live.write_text(json.dumps(sorted(s.mark())))
    run_killed("gc", json.dumps(spec_of(backend)), str(live), WRITE, PACKS, "2", str(later()))
    assert s.unindexed()  # the repacked pack it wrote, without a segment
    s.check_live()
    s.gc(later())
    s.gc(later())
    assert s.dead_in_packs() == set() and s.unindexed() == set() and s.tombstones() == 0
    s.check_live()


def test_store_gc_runs_the_repack_and_reports_it(backend: FilesystemBackend) -> None:
    store = Store(backend)
    kept = store.put_bytes(b"kept " * 5000)  # the Store packs it too: its pack is all live
    s = Scenario(backend)
    dead = s.write(range(20), commit=False)
    report = gc(backend, 0.0, blobs=[kept.digest], clock=later)
    assert report.packs.packs_condemned > 0 and report.to_dict()["packs"]["bytes_reclaimed"] <= 0
    report = gc(backend, 0.0, blobs=[kept.digest], clock=later)
    assert report.packs.packs_deleted > 0 and report.to_dict()["packs"]["bytes_reclaimed"] > 0
    live, index = live_chunks(backend, blobs=[kept.digest]), loaded(backend)
    assert live and not any(d in index for d in dead)
    assert {p for p, _ in s.pack_infos()} == {loc.pack for d in live for loc in index.locations(d)}
    assert Store(backend).get_bytes(kept.digest) == b"kept " * 5000


def committed(store: Store, name: str, stdout: BlobRef, stderr: BlobRef) -> str:
    """Commit a result naming `stdout` and `stderr` under key b3(`name`); the key."""
    key = b3(name.encode())
    store.commit(ResultManifest(value=store.put_value({"name": name}), stdout=stdout, stderr=stderr,
                                provenance=Provenance(key, {}, b3(b"rt"), "n1", 1.0, 2.0, 1.0)))
    return key


def test_store_refs_survive_both_gc_passes_and_read_back_verified(backend: FilesystemBackend, tmp_path: Path) -> None:
    """End to end with the Store writing packs: one pack (a tree's) holds live and dead blobs,
    others are all live or all dead; gc() runs both passes (injected clock) and every blob a
    ref reaches reads back verified, from a fresh Store and from the writer's stale index."""
    store = Store(backend)
    data = {f"f{i}": random.Random(i).randbytes(300 * 1024) for i in range(6)}  # above INLINE_RESULT_MAX
    tree = tmp_path / "out"
    tree.mkdir()
    for name in ("f0", "f1", "f2", "f3"):
        (tree / name).write_bytes(data[name])
    store.put_tree(tree)  # one pack for the four files; no result names the tree: f2, f3 are dead
    blob = {name: BlobRef(b3(d), len(d)) for name, d in data.items()}
    live = {committed(store, "mixed", blob["f0"], blob["f1"]): ("f0", "f1"),
            committed(store, "own", store.put_bytes(data["f4"]), blob["f0"]): ("f4", "f0")}
    gone = committed(store, "gone", store.put_bytes(data["f5"]), blob["f2"])
    store.delete_ref(gone)

    first = gc(backend, GRACE, clock=later)
    assert first.packs.packs_condemned >= 2 and first.packs.chunks_repacked > 0 and first.packs.packs_deleted == 0
    second = gc(backend, GRACE, clock=later)
    assert second.packs.packs_deleted == first.packs.packs_condemned and second.packs.bytes_reclaimed > 0

    s = Scenario(backend)
    s.commit(live_chunks(backend))
    assert s.dead_in_packs() == set() and s.unindexed() == set() and s.tombstones() == 0
    for reader in (Store(backend), store):
        for key, names in live.items():
            assert reader.get_ref(key, deep=True) is not None
            assert all(reader.get_bytes(blob[n].digest) == data[n] for n in names)
    fresh = Store(backend)
    for name in ("f2", "f3", "f5"):
        with pytest.raises(NotFound):
            fresh.get_bytes(blob[name].digest)
    assert fresh.verify().ok


def test_a_live_chunk_no_copy_of_which_verifies_keeps_its_pack(backend: FilesystemBackend) -> None:
    s = seeded(backend)
    index = loaded(backend)
    condemned = decide(load_layout(backend), s.mark(), POLICY, later()).condemn
    victim = next(d for d in sorted(s.mark()) if index.locations(d)[0].pack in condemned)
    loc = index.locations(victim)[0]
    path = backend.root / f"{PACKS}{loc.pack[3:5]}/{loc.pack[3:]}"
    data = bytearray(path.read_bytes())
    data[loc.offset + loc.length // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    assert s.gc(later()).unreadable == 1
    second = s.gc(later())
    assert second.unreadable == 1 and second.packs_deleted == len(condemned) - 1
    assert path.exists() and s.tombstones() == 1  # kept, and still condemned
    s.live.discard(victim)
    s.check_live()


def test_many_small_segments_are_merged_into_one(backend: FilesystemBackend) -> None:
    s = Scenario(backend)
    for i in range(MAX_SEGMENTS + 8):
        s.write([i])  # one segment per flush
    stale = loaded(backend)
    assert len(s.segments()) == MAX_SEGMENTS + 8
    assert s.gc(time.time()).segments_replaced == 0  # too young to merge
    report = s.gc(later())
    assert report.segments_replaced == MAX_SEGMENTS + 8 and len(s.segments()) == 1
    assert report.packs_deleted == report.packs_condemned == 0
    s.check_live()
    s.check_live(stale)


def test_memoplane_gc_runs_both_passes_and_prints_them(backend: FilesystemBackend) -> None:
    seeded(backend)  # no ref names any of it: every pack is dead to `memoplane gc`

    def memoplane_gc(*flags: str) -> str:
        return subprocess.run([sys.executable, "-m", "memoplane.cli", "gc", "--grace", "0", "--store",
                               str(backend.root), *flags], capture_output=True, text=True, check=True,
                              timeout=300).stdout

    first = json.loads(memoplane_gc("--json"))["gc"]["packs"]
    assert first["packs_condemned"] > 0 and first["packs_deleted"] == 0
    assert f"packs: {first['packs_condemned']} deleted, 0 condemned" in memoplane_gc()
    assert list(backend.list(PACKS)) == [] and list(backend.list(TOMBSTONES)) == []
