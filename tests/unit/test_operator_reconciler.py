"""The operator's orchestration over a fake of memoplane.cluster.kube.Kube (dicts, resourceVersions,
409s) and a real store in a directory: what a miss and a hit cost, and what each writes."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from memoplane_operator.context import Conflict
from memoplane_operator.reconciler import Reconciler

from memoplane.cas import BlobRef, Hit, Provenance, ResultManifest, Store
from memoplane.cluster import protocol as p
from memoplane.cluster.stores import Stores, StoreSettings
from memoplane.cluster.views import job
from memoplane.settings import OperatorSettings

RUNTIME = "b3:" + "11" * 32
Objects = list[dict[str, Any]]   # outside FakeKube: there `list` is FakeKube.list
SOURCE = "def main(x):\n    return x + 1\n"


class FakeKube:
    """memoplane.cluster.kube.Kube's calls over dicts: resourceVersions, preconditions (409), merge patches."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.writes: list[tuple[str, str, str]] = []     # (verb, plural, name)
        self.events: list[tuple[str, str]] = []
        self._rv = itertools.count(1)
        self.leases = [{"metadata": {"name": p.lease_name("node-a"), "resourceVersion": "1",
                                     "annotations": {p.CAPACITY_ANNOTATION: "2", p.PROFILES_ANNOTATION: "python",
                                                     p.runtime_annotation("python"): RUNTIME}},
                        "spec": {"leaseDurationSeconds": 10}}]

    def _stamp(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj["metadata"]["resourceVersion"] = str(next(self._rv))
        return copy.deepcopy(obj)

    def _current(self, plural: str, namespace: str, name: str, rv: str | None) -> dict[str, Any]:
        obj = self.objects.get((plural, namespace, name))
        if obj is None:
            raise ApiException(status=404)
        if rv is not None and rv != obj["metadata"]["resourceVersion"]:
            raise ApiException(status=409)
        return obj

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        obj = self.objects.get((plural, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list(self, plural: str, namespace: str | None = None, label_selector: str | None = None
             ) -> tuple[Objects, str]:
        label, _, value = (label_selector or "").partition("=")
        return [copy.deepcopy(o) for (pl, ns, _), o in self.objects.items()
                if pl == plural and namespace in (None, ns)
                and (not label or (o["metadata"].get("labels") or {}).get(label) == value)], "1"

    def create(self, plural: str, namespace: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        name = body["metadata"]["name"]
        if (plural, namespace, name) in self.objects:
            return None
        obj = copy.deepcopy(dict(body))
        obj["metadata"].update(namespace=namespace, uid=f"uid-{name}", generation=1,
                               creationTimestamp=f"2026-01-02T03:04:{len(self.objects):02d}Z")
        self.objects[(plural, namespace, name)] = obj
        self.writes.append(("create", plural, name))
        return self._stamp(obj)

    def patch_meta(self, plural: str, namespace: str, name: str, labels: Mapping[str, str | None] | None = None,
                   annotations: Mapping[str, str | None] | None = None,
                   resource_version: str | None = None) -> dict[str, Any]:
        obj = self._current(plural, namespace, name, resource_version)
        for field, values in (("labels", labels), ("annotations", annotations)):
            current = obj["metadata"].setdefault(field, {})
            for k, v in (values or {}).items():
                if v is None:
                    current.pop(k, None)
                else:
                    current[k] = v
        self.writes.append(("meta", plural, name))
        return self._stamp(obj)

    def patch_status(self, plural: str, namespace: str, name: str, patch: Mapping[str, Any],
                     resource_version: str | None = None) -> dict[str, Any]:
        obj = self._current(plural, namespace, name, resource_version)
        status = obj.setdefault("status", {})
        for k, v in patch.items():
            if v is None:
                status.pop(k, None)
            else:
                status[k] = copy.deepcopy(v)
        self.writes.append(("status", plural, name))
        return self._stamp(obj)

    def event(self, obj: Mapping[str, Any], reason: str, message: str, *, warning: bool = False) -> None:
        self.events.append((obj["metadata"]["name"], reason))

    def list_leases(self, namespace: str) -> Objects:
        return copy.deepcopy(self.leases)

    def ensure_namespace(self, name: str) -> None:
        pass

    def flush_events(self, timeout: float = 5.0) -> None:
        pass


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Reconciler, FakeKube, list[str]]]:
    kube = FakeKube()
    stores = Stores(StoreSettings(root=str(tmp_path / "s3")))
    lookups: list[str] = []
    get_ref = Store.get_ref

    def counted(self: Store, key: str) -> Hit | None:
        lookups.append(key)
        return get_ref(self, key)

    monkeypatch.setattr(Store, "get_ref", counted)
    r = Reconciler(OperatorSettings(resolvers=0), kube, stores)  # type: ignore[arg-type]
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
    assert ("b", p.REASON_CACHE_HIT) in kube.events


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
    assert ("a", p.REASON_REASSIGNED) in kube.events


def test_a_stale_body_is_a_conflict(world: tuple[Reconciler, FakeKube, list[str]]) -> None:
    r, kube, _ = world
    created = kube.create(p.COMPUTEJOBS, "ml", {"metadata": {"name": "a"},
                                                "spec": {"python": {"source": SOURCE},
                                                         "inputs": [{"name": "x", "value": 1}]}})
    assert created is not None
    kube.patch_meta(p.COMPUTEJOBS, "ml", "a", labels={"touched": "yes"})
    with pytest.raises(Conflict):
        r.reconcile(created)
