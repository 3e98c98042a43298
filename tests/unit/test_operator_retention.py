"""The operator's retention worker over a real store and a fake API server: hits and writes go
to the usage log, a pass evicts least recently used first (never a live job's result), the cache's
status counts what is left (no store scan), an Event says what went, and a cache with no index
is indexed from its refs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeKube, computed_result, history_record
from memoplane_operator.retention import RetentionWorker, UsageRecorder

from memoplane.cas import Store, b3
from memoplane.cas.usage import LOG
from memoplane.cluster import mapping as mp
from memoplane.cluster import protocol as p
from memoplane.cluster.decide import default_cache
from memoplane.cluster.sharing import Access
from memoplane.cluster.stores import Stores, StoreSettings
from memoplane.errors import NotFound
from memoplane.history import RunRecord
from memoplane.settings import OperatorSettings

RUNTIME = "b3:" + "11" * 32
NS = "ml"
OWNED = Access(read=True, write=True, owner=NS)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[RetentionWorker, FakeKube, Store]]:
    kube = FakeKube()
    stores = Stores(StoreSettings(root=str(tmp_path / "s3")))
    settings = OperatorSettings(retention_grace_seconds=0.0, gc_grace_seconds=0.0)
    recorder = UsageRecorder(stores, settings.usage_flush_seconds)
    worker = RetentionWorker(settings, kube, stores, recorder, lambda _ns: True, lambda _rc: OWNED)
    kube.create(p.RESULTCACHES, NS, default_cache(NS))
    try:
        yield worker, kube, stores.get(p.DEFAULT_BUCKET, p.default_store_prefix(NS))
    finally:
        stores.close()


def write(worker: RetentionWorker, kube: FakeKube, store: Store, name: str, size: int, *, live: bool = False) -> str:
    """A job computed `name` (a result of `size` bytes); `live`: the job still exists."""
    key = b3(name.encode())
    digest = store.commit(computed_result(store, key, "x" * size, "node-a", 1.0, RUNTIME))
    body = {"metadata": {"name": name, "namespace": NS},
            "status": {"phase": p.SUCCEEDED, "cacheKey": key, "completionTime": "2026-01-02T03:04:05Z",
                       "result": {"digest": digest, "size": store.get_result(digest).logical_size,
                                  "store": p.store_url(p.DEFAULT_BUCKET, p.default_store_prefix(NS))}}}
    worker.recorder.written(body)
    if live:
        kube.create(p.COMPUTEJOBS, NS, body)
    return key


def set_retention(kube: FakeKube, retention: dict[str, Any]) -> None:
    kube.objects[(p.RESULTCACHES, NS, p.DEFAULT_RESULT_CACHE)]["spec"]["retention"] = retention


def status(kube: FakeKube) -> dict[str, Any]:
    return dict(kube.objects[(p.RESULTCACHES, NS, p.DEFAULT_RESULT_CACHE)].get("status") or {})


def test_a_pass_evicts_least_recently_used_first_and_never_a_live_jobs_result(
        world: tuple[RetentionWorker, FakeKube, Store]) -> None:
    worker, kube, store = world
    old_root = write(worker, kube, store, "root", 5000, live=True)
    a, b, c = (write(worker, kube, store, n, 5000) for n in ("a", "b", "c"))
    hit = store.get_ref(a)
    assert hit is not None
    worker.recorder.hit(store, a, hit.result.logical_size)   # a: written first, used last
    worker.run_pass()
    before = status(kube)
    assert before["entries"] == 4 and before["logicalBytes"] > 0 and before["evictedEntries"] == 0
    each = before["logicalBytes"] // 4
    set_retention(kube, {"maxBytes": 2 * each})
    worker.run_pass()
    after = status(kube)
    assert [k for k in (old_root, a, b, c) if store.read_ref(k) is not None] == [old_root, a]
    assert after["entries"] == 2 and after["evictedEntries"] == 2 and after["lastEvictionTime"]
    assert after["logicalBytes"] == before["logicalBytes"] - 2 * each
    assert [e.reason for e in kube.events] == [p.REASON_EVICTED] and "evicted 2 entries" in kube.events[0].message
    assert after["storedBytes"] > 0   # measured by the sweep that followed


def test_max_age_keeps_a_recently_hit_entry(world: tuple[RetentionWorker, FakeKube, Store]) -> None:
    worker, kube, store = world
    old_hit, unused = write(worker, kube, store, "old-hit", 10), write(worker, kube, store, "unused", 10)
    worker.recorder.hit(store, old_hit, 10)   # both written 2026-01-02; one used now
    set_retention(kube, {"maxAge": "24h"})
    worker.run_pass()
    assert store.read_ref(old_hit) is not None and store.read_ref(unused) is None


def test_a_cache_without_an_index_is_indexed_from_its_refs(world: tuple[RetentionWorker, FakeKube, Store]) -> None:
    worker, kube, store = world
    keys = [store.commit(computed_result(store, b3(f"k{n}".encode()), n, "node-a", 1.0, RUNTIME)) for n in range(3)]
    worker.run_pass()
    assert status(kube)["entries"] == len(keys) and status(kube)["storedBytes"] > 0
    assert store.usage().refs_indexed


def test_usage_is_flushed_on_stop(world: tuple[RetentionWorker, FakeKube, Store]) -> None:
    worker, _kube, store = world
    recorder = UsageRecorder(worker.stores, interval=3600.0)
    recorder.start()
    recorder.hit(store, b3(b"k"), 3)
    recorder.stop()
    entry = store.usage().entries[b3(b"k")]
    assert entry.size == 3 and entry.last_used <= time.time()


def test_refs_written_by_others_are_counted_when_the_index_is_checked_again(
        world: tuple[RetentionWorker, FakeKube, Store]) -> None:
    worker, kube, store = world
    worker.run_pass()   # an empty store: indexed at once
    assert status(kube)["entries"] == 0
    store.commit(computed_result(store, b3(b"by the CLI"), 1, "node-a", 1.0, RUNTIME))  # no use recorded
    worker.run_pass()
    assert status(kube)["entries"] == 0   # until the next check against the refs
    worker.cfg = replace(worker.cfg, reindex_seconds=0.0)
    worker.run_pass()
    assert status(kube)["entries"] == 1


def test_a_restarted_worker_loses_no_flushed_use(world: tuple[RetentionWorker, FakeKube, Store]) -> None:
    worker, kube, store = world
    key = write(worker, kube, store, "k", 10)
    worker.run_pass()   # compacted into the snapshot (the first save)
    worker.recorder.hit(store, key, 10)
    worker.run_pass()   # flushed to the log, not compacted yet (compact_seconds)
    assert len(list(store.backend.list(LOG))) == 1
    restarted = RetentionWorker(worker.cfg, kube, worker.stores, UsageRecorder(worker.stores, 3600.0),
                                lambda _ns: True, lambda _rc: OWNED)
    restarted.run_pass()   # reads the snapshot and the log afresh
    assert restarted.recorder is not worker.recorder
    assert store.usage().entries[key].last_used > 1767323045.0 + 3600  # the hit's time, not the write's


def test_a_job_naming_no_usable_store_records_nothing(world: tuple[RetentionWorker, FakeKube, Store]) -> None:
    worker, _kube, store = world
    body = {"metadata": {"name": "odd", "namespace": NS},
            "status": {"phase": p.SUCCEEDED, "cacheKey": b3(b"odd"), "result": {"digest": b3(b"r"), "size": 1,
                                                                                "store": "http://not-a-store"}}}
    worker.recorder.written(body)   # no exception on the watch's thread
    worker.recorder.flush()
    assert store.usage().entries == {}


@pytest.mark.parametrize("access", [Access(read=True, write=True, owner="team-a", guest=True),
                                    Access(read=False, write=False, owner="team-a", guest=True)],
                         ids=["granted-guest", "denied"])
def test_only_the_owner_of_a_location_evicts_there_and_only_a_reader_is_told_its_size(
        world: tuple[RetentionWorker, FakeKube, Store], access: Access) -> None:
    """A cache in another namespace's location (sharing) never evicts the owner's entries, whatever its
    retention says; one that may not read the location gets no figures about it."""
    worker, kube, store = world
    keys = [write(worker, kube, store, n, 5000) for n in ("a", "b")]
    set_retention(kube, {"maxBytes": 0})
    worker.access = lambda _rc: access
    worker.run_pass()
    assert all(store.read_ref(k) is not None for k in keys)
    assert kube.events == []
    assert ("entries" in status(kube)) == access.read
    worker.access = lambda _rc: OWNED
    worker.run_pass()
    assert all(store.read_ref(k) is None for k in keys), "the owner's retention evicts them"


def test_records_within_max_age_keep_their_results_and_older_ones_are_dropped_so_theirs_go(
        world: tuple[RetentionWorker, FakeKube, Store]) -> None:
    worker, kube, store = world
    kept_key, gone_key = write(worker, kube, store, "kept", 10), write(worker, kube, store, "gone", 10)
    kept, gone = (store.read_ref(k) for k in (kept_key, gone_key))
    assert kept is not None and gone is not None
    now_ns = time.time_ns()
    for result, at in ((kept, now_ns), (gone, now_ns - 48 * 3600 * 10**9)):
        record = history_record("ml/job", at, result)
        store.put_run_record(record.run_id, record.to_json())
    set_retention(kube, {"maxAge": "24h"})   # both refs were last used 2026-01-02: evicted
    worker.run_pass()
    assert store.read_ref(kept_key) is None and store.read_ref(gone_key) is None
    assert store.get_result(kept).value.inline == "x" * 10, "a kept record's result stays readable"
    with pytest.raises(NotFound):
        store.get_result(gone)
    assert [RunRecord.from_json(store.run_record(i) or b"").result for i in store.run_record_ids()] == [kept]


def test_a_map_batch_records_each_element_it_computed(
        world: tuple[RetentionWorker, FakeKube, Store]) -> None:
    worker, _kube, store = world
    keys = [b3(f"element{n}".encode()) for n in range(3)]
    digests = [store.commit(computed_result(store, k, "x" * (10 * n + 1), "node-a", 1.0, RUNTIME))
               for n, k in enumerate(keys)]
    sizes = [store.get_result(d).logical_size for d in digests]
    body = {"metadata": {"name": "m-batch", "namespace": NS,
                         "annotations": {mp.BATCH_ANNOTATION: "x", mp.KEYS_ANNOTATION: json.dumps(keys),
                                         p.STORE_ANNOTATION: p.store_url(p.DEFAULT_BUCKET,
                                                                         p.default_store_prefix(NS))}},
            "status": {"phase": p.SUCCEEDED, "cacheKey": mp.batch_key("x", keys),
                       "completionTime": "2026-01-02T03:04:05Z", "map": {"results": digests, "sizes": sizes}}}
    worker.recorder.written(body)
    worker.recorder.flush()
    entries = store.usage().entries   # no pass, no reindex: the log alone
    assert {k: (e.size, e.written) for k, e in entries.items()} == {k: (s, 1767323045.0)
                                                                      for k, s in zip(keys, sizes, strict=True)}


def test_a_cache_with_a_cold_tier_has_unread_content_moved_there_and_read_back(tmp_path: Path) -> None:
    kube, now = FakeKube(), [time.time()]
    stores = Stores(StoreSettings(root=str(tmp_path / "s3")))
    settings = OperatorSettings(retention_grace_seconds=0.0, gc_grace_seconds=0.0, demote_seconds=0.0)
    worker = RetentionWorker(settings, kube, stores, UsageRecorder(stores, settings.usage_flush_seconds),
                             lambda _ns: True, lambda _rc: OWNED, clock=lambda: now[0])
    rc = default_cache(NS)
    rc["spec"]["tiers"] = [{"after": "720h", "store": {"bucket": "memoplane-cold", "prefix": NS}}]
    kube.create(p.RESULTCACHES, NS, rc)
    hot, cold = tmp_path / "s3" / p.DEFAULT_BUCKET / NS, tmp_path / "s3" / "memoplane-cold" / NS
    try:
        worker.run_pass()   # the owner's pass opens the location with its tier
        store = stores.get(p.DEFAULT_BUCKET, p.default_store_prefix(NS))
        key = write(worker, kube, store, "big", 200_000)
        packs = {f.name for f in (hot / "packs").rglob("*") if f.is_file()}
        worker.run_pass()   # within `after`: nothing moves
        assert not (cold / "packs").exists() and not kube.events
        now[0] += 720 * 3600 + 60
        worker.run_pass()
        assert {f.name for f in (cold / "packs").rglob("*") if f.is_file()} == packs and packs
        assert not any(f.is_file() for f in (hot / "packs").rglob("*"))
        assert any(f.is_file() for f in (hot / "index").rglob("*"))   # index segments stay hot
        assert [e.reason for e in kube.events] == [p.REASON_DEMOTED]
        assert f"moved {len(packs)} objects" in kube.events[0].message
        hit = store.get_ref(key)
        assert hit is not None and len(store.load_value(hit.result.value)) == 200_000   # read through, verified
        assert any(f.is_file() for f in (hot / "packs").rglob("*"))   # and re-warmed
    finally:
        stores.close()
