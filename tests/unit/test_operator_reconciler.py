"""The operator's orchestration over a fake of memoplane.cluster.kube.Kube (dicts, resourceVersions,
409s) and a real store in a directory: what a miss and a hit cost, and what each writes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeKube
from memoplane_operator.context import Conflict
from memoplane_operator.reconciler import Reconciler

from memoplane.cas import BlobRef, Hit, Provenance, ResultManifest, Store
from memoplane.cluster import protocol as p
from memoplane.cluster.stores import Stores, StoreSettings
from memoplane.cluster.views import job
from memoplane.settings import OperatorSettings

RUNTIME = "b3:" + "11" * 32
SOURCE = "def main(x):\n    return x + 1\n"


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Reconciler, FakeKube, list[str]]]:
    kube = FakeKube()
    kube.leases = [{"metadata": {"name": p.lease_name("node-a"), "resourceVersion": "1",
                                 "annotations": {p.CAPACITY_ANNOTATION: "2", p.PROFILES_ANNOTATION: "python",
                                                 p.runtime_annotation("python"): RUNTIME}},
                    "spec": {"leaseDurationSeconds": 10}}]
    stores = Stores(StoreSettings(root=str(tmp_path / "s3")))
    lookups: list[str] = []
    get_ref = Store.get_ref

    def counted(self: Store, key: str) -> Hit | None:
        lookups.append(key)
        return get_ref(self, key)

    monkeypatch.setattr(Store, "get_ref", counted)
    r = Reconciler(OperatorSettings(resolvers=0), kube, stores)
    try:
        yield r, kube, lookups
    finally:
        r.stop()
        stores.close()


def submit(r: Reconciler, kube: FakeKube, name: str, x: int = 1) -> dict[str, Any]:
    body = {"apiVersion": p.API_VERSION, "kind": "ComputeJob", "metadata": {"name": name},
            "spec": {"python": {"source": SOURCE}, "inputs": [{"name": "x", "value": x}]}}
    created = kube.create(p.COMPUTEJOBS, "ml", body)
    assert created is not None
    kube.writes.clear()
    r.reconcile(created)
    job = kube.get(p.COMPUTEJOBS, "ml", name)
    assert job is not None
    return job


def store_result(r: Reconciler, key: str, value: Any) -> None:
    store = r.stores.get(p.DEFAULT_BUCKET, "ml")
    empty = store.put_bytes(b"")
    result = ResultManifest(store.put_value(value), BlobRef(empty.digest, 0), BlobRef(empty.digest, 0),
                            Provenance(key, {}, RUNTIME, "node-a", 0.0, 1.5, 1.5))
    store.set_ref(key, store.put_result(result))


def test_a_miss_is_looked_up_once_and_scheduled(world: tuple[Reconciler, FakeKube, list[str]]) -> None:
    r, kube, lookups = world
    job = submit(r, kube, "a")
    status = job["status"]
    assert (status["phase"], status["attempts"], job["metadata"]["labels"][p.NODE_LABEL]) == ("Scheduled", 1, "node-a")
    assert lookups == [status["cacheKey"]]
    assert [w[0] for w in kube.writes if w[1] == p.COMPUTEJOBS] == ["meta", "status", "meta", "status"]
    assert ("ml", "default") in {(ns, n) for pl, ns, n in kube.objects if pl == p.RESULTCACHES}


def test_a_hit_costs_one_lookup_and_is_served_at_resolution(world: tuple[Reconciler, FakeKube, list[str]]) -> None:
    r, kube, lookups = world
    key = submit(r, kube, "a")["status"]["cacheKey"]
    store_result(r, key, 2)
    lookups.clear()
    job_ = submit(r, kube, "b")
    status = job_["status"]
    assert (status["phase"], status["cached"], status["result"]["value"]) == ("Succeeded", True, 2)
    assert lookups == [key]
    assert [w[0] for w in kube.writes if w[1] == p.COMPUTEJOBS] == ["status"]
    assert status["result"]["store"] == p.store_url(p.DEFAULT_BUCKET, "ml")
    assert not job(job_).assigned.present
    assert ("b", p.REASON_CACHE_HIT) in {(e.name, e.reason) for e in kube.events}


def test_a_hit_after_a_spec_edit_removes_the_earlier_assignment(
        world: tuple[Reconciler, FakeKube, list[str]]) -> None:
    r, kube, _ = world
    assert job(submit(r, kube, "a", x=1)).assigned.node == "node-a"
    key = submit(r, kube, "b", x=2)["status"]["cacheKey"]
    store_result(r, key, 5)
    edited = kube.objects[(p.COMPUTEJOBS, "ml", "a")]
    edited["spec"]["inputs"] = [{"name": "x", "value": 2}]
    edited["metadata"]["generation"] = 2
    kube.writes.clear()
    r.reconcile(kube._stamp(edited))
    served = kube.get(p.COMPUTEJOBS, "ml", "a")
    assert served is not None
    assert [w[0] for w in kube.writes if w[1] == p.COMPUTEJOBS] == ["meta", "status"]
    assert (served["status"]["phase"], served["status"]["result"]["value"]) == ("Succeeded", 5)
    assert not job(served).assigned.present


def test_a_second_job_on_the_key_waits_for_the_first(world: tuple[Reconciler, FakeKube, list[str]]) -> None:
    r, kube, lookups = world
    submit(r, kube, "a")
    job = submit(r, kube, "b")
    assert (job["status"]["phase"], job["status"]["reason"]) == ("Waiting", p.REASON_IN_FLIGHT)
    assert p.NODE_LABEL not in job["metadata"]["labels"] and len(lookups) == 2


def test_a_lost_node_reschedules_then_fails_past_the_backoff_limit(
        world: tuple[Reconciler, FakeKube, list[str]]) -> None:
    r, kube, _ = world
    job = submit(r, kube, "a")
    kube.leases = []
    r.refresh_nodes(force=True)
    r.reconcile(job)
    after = kube.get(p.COMPUTEJOBS, "ml", "a")
    assert after is not None and (after["status"]["phase"], after["status"]["reason"]) == ("Waiting", p.REASON_NO_NODE)
    assert ("a", p.REASON_REASSIGNED) in {(e.name, e.reason) for e in kube.events}


def test_a_stale_body_is_a_conflict(world: tuple[Reconciler, FakeKube, list[str]]) -> None:
    r, kube, _ = world
    created = kube.create(p.COMPUTEJOBS, "ml", {"metadata": {"name": "a"},
                                                "spec": {"python": {"source": SOURCE},
                                                         "inputs": [{"name": "x", "value": 1}]}})
    assert created is not None
    kube.patch_meta(p.COMPUTEJOBS, "ml", "a", labels={"touched": "yes"})
    with pytest.raises(Conflict):
        r.reconcile(created)
