"""The usage index in the store: batches of uses round trip, compaction into a snapshot, the refs
indexed once (bounded), retention's ref eviction in the audit log, and the sweep's extra roots."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes import computed_result

from memoplane.cas import FilesystemBackend, Store, b3
from memoplane.cas import audit as audit_log
from memoplane.cas.digests import object_name
from memoplane.cas.usage import EVICT, HIT, LOG, SNAPSHOT, WRITE, Use

RUNTIME = "b3:" + "11" * 32


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(FilesystemBackend(tmp_path / "store", durability="none"), audit=True)
    yield s
    s.close()


def key(n: int) -> str:
    return b3(f"key-{n}".encode())


def commit(store: Store, n: int, value: object = None) -> str:
    store.commit(computed_result(store, key(n), value if value is not None else f"value {n}", "node-a", 1.0,
                                 RUNTIME))
    return key(n)


def batches(store: Store) -> list[str]:
    return sorted(i.name for i in store.backend.list(LOG))


def test_uses_round_trip_and_compact_into_a_snapshot(store: Store) -> None:
    store.record_uses([Use(key(1), WRITE, 100.0, 10), Use(key(2), WRITE, 110.0, 20)])
    store.record_uses([Use(key(1), HIT, 200.0, 10)])
    index = store.usage()
    assert {k: (e.written, e.last_used, e.size) for k, e in index.entries.items()} == \
        {key(1): (100.0, 200.0, 10), key(2): (110.0, 110.0, 20)}
    assert index.logical_bytes == 30 and len(batches(store)) == 2
    store.save_usage(index)
    assert batches(store) == []  # merged into the snapshot, then deleted
    store.record_uses([Use(key(3), WRITE, 300.0, 5)])
    again = store.usage()
    assert set(again.entries) == {key(1), key(2), key(3)} and again.entries[key(1)].last_used == 200.0
    assert store.usage(again).entries == again.entries  # a kept index only takes what is new


def test_an_eviction_holds_unless_the_key_was_used_after_it(store: Store) -> None:
    store.record_uses([Use(key(1), WRITE, 100.0, 10), Use(key(2), WRITE, 100.0, 10),
                       Use(key(1), EVICT, 150.0), Use(key(2), HIT, 160.0, 10), Use(key(2), EVICT, 150.0)])
    index = store.usage()
    assert set(index.entries) == {key(2)} and index.evicted == 1 and index.last_eviction == 150.0


def test_a_crash_between_snapshot_and_deletion_merges_nothing_twice(store: Store) -> None:
    store.record_uses([Use(key(1), WRITE, 100.0, 10)])
    store.record_uses([Use(key(1), EVICT, 150.0)])
    index = store.usage()
    store.backend.put(SNAPSHOT, index.to_bytes())  # the snapshot is written; the batches are not deleted
    assert len(batches(store)) == 2
    reloaded = store.usage()
    assert reloaded.entries == {} and reloaded.evicted == 1


def test_refs_are_indexed_a_bounded_number_per_call(store: Store) -> None:
    keys = [commit(store, n) for n in range(5)]
    index = store.usage()
    missing = store.refs_to_index(index)
    assert set(missing) == set(keys) and not index.refs_indexed
    assert store.index_refs(index, missing, limit=2) == 3 and len(index.entries) == 2 and not index.refs_indexed
    assert store.index_refs(index, missing, limit=2) == 1
    assert store.index_refs(index, missing, limit=2) == 0 and index.refs_indexed and set(index.entries) == set(keys)
    size = store.get_result(store.read_ref(keys[0]) or "").logical_size
    assert index.entries[keys[0]].size == size > 0
    store.delete_ref(keys[0])  # gone by another hand: the next check drops it
    assert store.refs_to_index(index) == {} and keys[0] not in index.entries


def test_evicting_a_ref_is_audited_and_its_data_goes_at_the_sweep(store: Store) -> None:
    k = commit(store, 1, "x" * 10_000)
    result = store.read_ref(k)
    assert store.evict_ref(k) == result and store.read_ref(k) is None
    kinds = [json.loads(data)["kind"] for _, data in store.audit_log.read()]
    assert audit_log.EVICTION in kinds
    assert store.evict_ref(k) is None
    report = store.gc(0.0)
    assert report.deleted > 0 and result is not None and not store.backend.exists(object_name("results", result))


def test_the_sweep_keeps_roots_no_ref_reaches(store: Store) -> None:
    overlay = store.put_bytes(b"overlay " * 5000)   # a GMemSeed's overlay blob: no ref names it
    kept_result = store.put_result(computed_result(store, key(7), "a live job's result", "node-a", 1.0, RUNTIME))
    report = store.gc(0.0, results=[kept_result], blobs=[overlay.digest])
    assert report.deleted == 0 and report.kept_bytes > 0
    assert store.get_bytes(overlay.digest) == b"overlay " * 5000 and store.get_result(kept_result).key == key(7)
    assert store.gc(0.0).deleted > 0  # without the roots they go


@pytest.mark.parametrize("garbage", [b"not json", b'{"v": 1}', b'[["k", "hit"]]', b'{"entries": {"k": 3}}'])
def test_usage_objects_someone_else_wrote_never_stop_the_index(store: Store, garbage: bytes) -> None:
    """Whoever can write the store can write its usage objects: a malformed snapshot is started over
    (the refs are indexed again) and a malformed batch skipped, so one tenant's store cannot stop the
    operator's retention pass for every cache."""
    store.backend.put(SNAPSHOT, garbage)
    store.backend.put(f"{LOG}{'0' * 20}-00000000", garbage)
    store.record_uses([Use(key(1), HIT, 5.0, 7)])
    index = store.usage()
    assert not index.refs_indexed and list(index.entries) == [key(1)] and index.entries[key(1)].size == 7
    store.save_usage(index)
    assert batches(store) == [] and store.usage().entries.keys() == {key(1)}
