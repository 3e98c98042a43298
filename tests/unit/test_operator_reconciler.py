"""The operator's orchestration over a fake of memoplane.cluster.kube.Kube (dicts, resourceVersions,
409s) and a real store in a directory: what a miss and a hit cost, and what each writes."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeKube
from memoplane_operator.context import Conflict
from memoplane_operator.reconciler import Reconciler

from memoplane.api.conditions import kstatus, mark_ready
from memoplane.cas import BlobRef, Hit, Provenance, ResultManifest, Store
from memoplane.cas import audit as audit_log
from memoplane.cas.tiers import TieredBackend
from memoplane.cluster import protocol as p
from memoplane.cluster.stores import Stores, StoreSettings
from memoplane.cluster.views import job
from memoplane.settings import OperatorSettings
from memoplane.trust import SigningKey
from memoplane.trust.attestation import attest
from memoplane.trust.audit import verify as verify_audit

RUNTIME = "b3:" + "11" * 32
AGENTS = SigningKey.generate("test-agents-1")   # the cluster agents' key, trusted by the default cache
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

    def counted(self: Store, key: str, deep: bool = False) -> Hit | None:
        lookups.append(key)
        return get_ref(self, key, deep=deep)

    monkeypatch.setattr(Store, "get_ref", counted)
    r = Reconciler(OperatorSettings(resolvers=0), kube, stores, AGENTS)
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


def store_result(r: Reconciler, job_: dict[str, Any], value: Any, signer: SigningKey | None = AGENTS) -> str:
    """What an agent does after computing `job_` (None: what a store writer without a key can do)."""
    store = r.stores.get(p.DEFAULT_BUCKET, "ml")
    key = job_["status"]["cacheKey"]
    empty = store.put_bytes(b"")
    result = ResultManifest(store.put_value(value), BlobRef(empty.digest, 0), BlobRef(empty.digest, 0),
                            Provenance(key, {}, RUNTIME, "node-a", 0.0, 1.5, 1.5))
    parts = r.ctx.manifests.job_of(job_, store).key_parts()
    envelopes = [attest(key, parts.components(), result.digest, signer, "node-a", 0.0, 1.5)] if signer else []
    store.commit(result, envelopes)
    return key


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
    key = store_result(r, submit(r, kube, "a"), 2)
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
    store_result(r, submit(r, kube, "b", x=2), 5)
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


@pytest.mark.parametrize("signer", [None, SigningKey.generate("stranger-1")], ids=["unsigned", "stranger"])
def test_a_result_the_cache_does_not_trust_is_recomputed_and_announced(
        world: tuple[Reconciler, FakeKube, list[str]], signer: SigningKey | None) -> None:
    r, kube, _ = world
    store_result(r, submit(r, kube, "a"), 5, signer)
    job_ = submit(r, kube, "b")
    assert job_["status"]["phase"] != "Succeeded" and not job_["status"].get("cached")
    untrusted = [e for e in kube.events if e.name == "b" and e.reason == p.REASON_UNTRUSTED]
    assert len(untrusted) == 1 and ("unsigned" in untrusted[0].message if signer is None
                                    else "unknown-key (stranger-1)" in untrusted[0].message)


def test_trusted_keys_from_a_secret_and_a_missing_one(world: tuple[Reconciler, FakeKube, list[str]]) -> None:
    r, kube, _ = world
    team = SigningKey.generate("team-ml-1")
    kube.objects[(p.RESULTCACHES, "ml", "team")] = {
        "apiVersion": p.API_VERSION, "kind": "ResultCache", "metadata": {"name": "team", "namespace": "ml"},
        "spec": {"store": {"bucket": p.DEFAULT_BUCKET, "prefix": "ml"},
                 "trust": {"clusterAgents": False, "keys": [{"secretRef": {"name": "team-keys"}}]}}}

    def submit_to_team(name: str) -> dict[str, Any]:
        body = {"metadata": {"name": name}, "spec": {"python": {"source": SOURCE}, "inputs": [{"name": "x",
                                                                                              "value": 1}],
                                                     "cache": {"resultCache": "team"}}}
        created = kube.create(p.COMPUTEJOBS, "ml", body)
        assert created is not None
        r.reconcile(created)
        found = kube.get(p.COMPUTEJOBS, "ml", name)
        assert found is not None
        return found

    waiting = submit_to_team("a")
    assert (waiting["status"]["phase"], waiting["status"]["reason"]) == ("Waiting", p.REASON_TRUST_KEYS)
    assert "Secret 'team-keys' does not exist" in waiting["status"]["message"]
    pem = base64.b64encode(team.public.pem().encode()).decode()
    kube.objects[("secrets", "ml", "team-keys")] = {"metadata": {"name": "team-keys"}, "data": {"team-ml-1.pub": pem}}
    r.reconcile(waiting)  # the keys are read again on the waiting job's next visit
    scheduled = kube.get(p.COMPUTEJOBS, "ml", "a")
    assert scheduled is not None and scheduled["status"]["phase"] == "Scheduled"
    store_result(r, scheduled, 7, AGENTS)  # the agents' key is not trusted by this cache
    assert submit_to_team("b")["status"]["phase"] != "Succeeded"
    store_result(r, scheduled, 7, team)
    served = submit_to_team("c")["status"]
    assert (served["phase"], served["cached"], served["result"]["value"]) == ("Succeeded", True, 7)


def test_the_operator_signs_the_head_of_every_audit_log_it_writes(
        world: tuple[Reconciler, FakeKube, list[str]]) -> None:
    r, kube, _ = world
    computed = submit(r, kube, "a")
    store = r.stores.get(p.DEFAULT_BUCKET, "ml")
    store.audit_log.append(audit_log.START, {})  # `memoplane audit start`: the store writes its log from now on
    store_result(r, computed, 2)
    r._sign_audit_heads()
    report = verify_audit(store.audit_log, {AGENTS.keyid: AGENTS.public})
    assert report.ok and report.newest_checkpoint == report.chain.last and report.chain.last >= 2


def test_a_revocation_in_a_cache_is_recorded_once_in_its_store_audit_log(
        world: tuple[Reconciler, FakeKube, list[str]]) -> None:
    r, kube, _ = world
    submit(r, kube, "a")  # the namespace's default cache exists from here on
    store = r.stores.get(p.DEFAULT_BUCKET, "ml")
    store.audit_log.append(audit_log.START, {})
    kube.objects[(p.RESULTCACHES, "ml", "default")]["spec"]["trust"] = {"revoked": ["old-node-1"]}
    for _ in range(2):  # a second pass (or a restarted operator) reads the status and records nothing more
        r.caches.reconcile("ml", "default")
    kinds = [(rec["kind"], rec.get("keyid")) for _, data in store.audit_log.read() for rec in [json.loads(data)]]
    assert kinds.count(("revocation", "old-node-1")) == 1
    rc = kube.get(p.RESULTCACHES, "ml", "default")
    assert rc is not None and rc["status"]["revocationsRecorded"] == ["old-node-1"]


# -- sharing: team "ops" points a cache at the home of "ml" --------------------------------------------


def put_cache(r: Reconciler, kube: FakeKube, namespace: str, name: str, prefix: str,
              sharing: dict[str, Any] | None = None, tiers: list[dict[str, Any]] | None = None) -> None:
    """A ResultCache created (or changed) as the watch delivers it."""
    spec: dict[str, Any] = {"store": {"bucket": p.DEFAULT_BUCKET, "prefix": prefix}}
    if sharing is not None:
        spec["sharing"] = sharing
    if tiers is not None:
        spec["tiers"] = tiers
    existing = kube.objects.get((p.RESULTCACHES, namespace, name))
    if existing is None:
        body = kube.create(p.RESULTCACHES, namespace, {"apiVersion": p.API_VERSION, "kind": "ResultCache",
                                                       "metadata": {"name": name}, "spec": spec})
    else:
        existing["spec"] = spec
        body = kube._stamp(existing)
    assert body is not None
    r.caches.changed(namespace, name, body)


def submit_to(r: Reconciler, kube: FakeKube, namespace: str, name: str, cache: str, x: int = 1) -> dict[str, Any]:
    body = {"apiVersion": p.API_VERSION, "kind": "ComputeJob", "metadata": {"name": name},
            "spec": {"python": {"source": SOURCE}, "inputs": [{"name": "x", "value": x}],
                     "cache": {"resultCache": cache}}}
    created = kube.create(p.COMPUTEJOBS, namespace, body)
    assert created is not None
    r.reconcile(created)
    found = kube.get(p.COMPUTEJOBS, namespace, name)
    assert found is not None
    return found


def ready_condition(r: Reconciler, kube: FakeKube, namespace: str, name: str) -> dict[str, Any]:
    r.caches.reconcile(namespace, name)
    rc = kube.get(p.RESULTCACHES, namespace, name)
    assert rc is not None
    return next(c for c in rc["status"]["conditions"] if c["type"] == "Ready")


def test_a_cache_at_another_namespaces_home_is_not_read_and_not_written(
        world: tuple[Reconciler, FakeKube, list[str]]) -> None:
    r, kube, lookups = world
    put_cache(r, kube, "ml", "default", "ml/")
    store_result(r, submit(r, kube, "secret"), 42)
    put_cache(r, kube, "ops", "steal", "ml/")
    lookups.clear()
    job_ = submit_to(r, kube, "ops", "try", "steal")
    assert lookups == [] and job_["status"]["phase"] == "Scheduled"
    assert job(job_).assigned.store_url == p.store_url(p.DEFAULT_BUCKET, "ops")
    assert "ResultCache ml/default" in job_["status"]["message"]
    [denied] = [e for e in kube.events if e.name == "try" and e.reason == p.REASON_SHARING_DENIED]
    assert denied.warning and "list ops in ResultCache ml/default spec.sharing.readers" in denied.message
    stalled = ready_condition(r, kube, "ops", "steal")
    assert (stalled["status"], stalled["reason"]) == ("False", p.REASON_LOCATION_OWNED)
    assert "ResultCache ml/default" in stalled["message"]
    assert "entries" not in (kube.get(p.RESULTCACHES, "ops", "steal") or {})["status"], "no stats of ml's store"


def test_a_granted_read_is_a_hit_audited_in_the_owners_log_until_revoked(
        world: tuple[Reconciler, FakeKube, list[str]]) -> None:
    r, kube, _ = world
    put_cache(r, kube, "ml", "default", "ml/", sharing={"readers": {"namespaces": ["ops"]}})
    store_result(r, submit(r, kube, "secret"), 42)
    owners = r.stores.get(p.DEFAULT_BUCKET, "ml")
    owners.audit_log.append(audit_log.START, {})
    put_cache(r, kube, "ops", "shared", "ml/")
    assert ready_condition(r, kube, "ops", "shared")["status"] == "True"
    served = submit_to(r, kube, "ops", "granted", "shared")["status"]
    assert (served["phase"], served["cached"], served["result"]["value"]) == ("Succeeded", True, 42)
    assert served["result"]["store"] == p.store_url(p.DEFAULT_BUCKET, "ml")
    reads = [rec for _, data in owners.audit_log.read() for rec in [json.loads(data)] if rec["kind"] == "shared-read"]
    assert [(rec["reader"], rec["cache"]) for rec in reads] == [("ops", "ops/shared")]

    put_cache(r, kube, "ml", "default", "ml/")   # the grant is removed
    assert ready_condition(r, kube, "ops", "shared")["reason"] == p.REASON_LOCATION_OWNED
    assert submit_to(r, kube, "ops", "revoked", "shared")["status"]["phase"] == "Scheduled"


def test_a_job_resolved_for_a_location_it_may_no_longer_write_is_resolved_again(
        world: tuple[Reconciler, FakeKube, list[str]]) -> None:
    r, kube, _ = world
    both = {"readers": {"namespaces": ["ops"]}, "writers": {"namespaces": ["ops"]}}
    put_cache(r, kube, "ml", "default", "ml/", sharing=both)
    put_cache(r, kube, "ops", "shared", "ml/")
    assigned = submit_to(r, kube, "ops", "w", "shared")
    assert job(assigned).assigned.store_url == p.store_url(p.DEFAULT_BUCKET, "ml")
    # as if its node was lost before it started: Pending again, resolved for the writer's location
    stored = kube.objects[(p.COMPUTEJOBS, "ops", "w")]
    stored["status"].update(phase="Pending", reason=p.REASON_REASSIGNED)
    stored["metadata"]["labels"].pop(p.NODE_LABEL)
    waiting = kube._stamp(stored)
    put_cache(r, kube, "ml", "default", "ml/", sharing={"readers": {"namespaces": ["ops"]}})
    r.reconcile(waiting)
    again = kube.get(p.COMPUTEJOBS, "ops", "w")
    assert again is not None
    assert (again["status"]["phase"], again["status"]["reason"]) == ("Pending", p.REASON_STORE_CHANGED)
    r.reconcile(again)
    resolved = kube.get(p.COMPUTEJOBS, "ops", "w")
    assert resolved is not None and job(resolved).assigned.store_url == p.store_url(p.DEFAULT_BUCKET, "ops")


def test_a_refused_manifest_write_is_a_wait_with_the_stores_words(
        world: tuple[Reconciler, FakeKube, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    from memoplane_operator.job_manifests import JobManifests

    from memoplane.cas.s3 import StoreUnavailable

    def refused(self: JobManifests, store: Store, manifest: bytes) -> None:
        raise StoreUnavailable("put s3://shared/c1/ml/chunks/x: refused the credentials (AccessDenied)",
                               "check the key's policy on the bucket")

    r, kube, _ = world
    monkeypatch.setattr(JobManifests, "put", refused)
    status = submit(r, kube, "a")["status"]
    assert (status["phase"], status["reason"]) == ("Waiting", p.REASON_STORE)
    assert "AccessDenied" in status["message"]


# -- fromObject: the allowlist, never a result bucket -----------------------------------------------


def test_from_object_reads_the_allowlist_only_and_never_a_caches_bucket(
        world: tuple[Reconciler, FakeKube, list[str]]) -> None:
    from memoplane.cluster.objectinputs import checked_grants

    r, kube, _ = world
    grants = [{"namespaces": ["ml"], "bucket": b, "prefix": ""} for b in ("data", "team-cache")]
    r.ctx.object_grants = checked_grants(OperatorSettings(object_inputs=json.dumps(grants)))
    root = Path(str(r.stores.settings.root))
    for bucket, key in (("data", "t.csv"), ("team-cache", "ml/refs/x")):
        (root / bucket / key).parent.mkdir(parents=True, exist_ok=True)
        (root / bucket / key).write_bytes(b"1,2\n")
    rc = kube.create(p.RESULTCACHES, "ml", {"apiVersion": p.API_VERSION, "kind": "ResultCache",
                                            "metadata": {"name": "team"},
                                            "spec": {"store": {"bucket": "team-cache", "prefix": "ml/"}}})
    assert rc is not None
    r.caches.changed("ml", "team", rc)

    def read(name: str, bucket: str, key: str) -> dict[str, Any]:
        body = {"apiVersion": p.API_VERSION, "kind": "ComputeJob", "metadata": {"name": name},
                "spec": {"python": {"source": "def main(t):\n    return len(t)\n"},
                         "inputs": [{"name": "t", "fromObject": {"bucket": bucket, "key": key}}]}}
        created = kube.create(p.COMPUTEJOBS, "ml", body)
        assert created is not None
        r.reconcile(created)
        return (kube.get(p.COMPUTEJOBS, "ml", name) or {})["status"]

    assert read("allowed", "data", "t.csv")["phase"] == "Scheduled"
    refused = read("results", "team-cache", "ml/refs/x")
    assert (refused["phase"], refused["reason"]) == ("Failed", p.REASON_OBJECT_NOT_ALLOWED)
    assert refused["message"].startswith("spec.inputs[0].fromObject: bucket 'team-cache' holds memoplane's results")


def _succeeded_from(kube: FakeKube, name: str, served: dict[str, Any]) -> dict[str, Any]:
    """What an agent writes after computing `name`: the result `served` (a hit of the same key) has."""
    current = kube.get(p.COMPUTEJOBS, "ml", name)
    assert current is not None
    generation = current["metadata"]["generation"]
    conditions = mark_ready(current["status"].get("conditions"), p.REASON_COMPUTED, "computed", generation,
                            datetime.now(UTC))
    return kube.patch_status(p.COMPUTEJOBS, "ml", name, {
        "phase": p.SUCCEEDED, "reason": p.REASON_COMPUTED, "result": served["status"]["result"], "cached": False,
        "conditions": conditions, "observedGeneration": generation})


def _edit(kube: FakeKube, name: str, source: str) -> dict[str, Any]:
    """A user's edit of the job's source: a new generation."""
    obj = kube.objects[(p.COMPUTEJOBS, "ml", name)]
    obj["spec"]["python"]["source"] = source
    obj["metadata"]["generation"] += 1
    return kube._stamp(obj)


def test_a_ready_downstream_is_held_while_its_upstream_recomputes_then_cut_off(
        world: tuple[Reconciler, FakeKube, list[str]]) -> None:
    r, kube, _ = world
    store_result(r, submit(r, kube, "seed"), 2)
    up = submit(r, kube, "up")                                     # served from the cache: Ready, 2
    uses_up = {"python": {"source": "def main(rows):\n    return rows + 1\n"},
               "inputs": [{"name": "rows", "fromJob": {"name": "up"}}]}
    for name in ("down-seed", "down"):
        created = kube.create(p.COMPUTEJOBS, "ml", {"apiVersion": p.API_VERSION, "kind": "ComputeJob",
                                                    "metadata": {"name": name}, "spec": uses_up})
        assert created is not None
        r.reconcile(created)
        if name == "down-seed":
            store_result(r, kube.get(p.COMPUTEJOBS, "ml", name) or {}, 3)
    down = kube.get(p.COMPUTEJOBS, "ml", "down")
    assert down is not None and down["status"]["phase"] == p.SUCCEEDED
    r.enqueue("ml", "up", up)
    r.enqueue("ml", "down", down)
    # A comment-only edit of up: down is queued at once, and held (not Ready, its result kept).
    r.enqueue("ml", "up", _edit(kube, "up", "# the same rows\n" + SOURCE))
    assert r._jobs.queued(("ml", "down"))
    r.reconcile_named("ml", "down")
    held = kube.get(p.COMPUTEJOBS, "ml", "down")
    assert held is not None
    assert (held["status"]["phase"], held["status"]["reason"]) == (p.WAITING, p.REASON_UPSTREAM_CHANGED)
    assert kstatus(1, held["status"]["observedGeneration"], held["status"]["conditions"]) == "InProgress"
    assert held["status"]["result"] == down["status"]["result"]
    # up recomputes (a new key) to the same value: down resolves to its key again, nothing runs.
    r.reconcile_named("ml", "up")
    store_result(r, kube.get(p.COMPUTEJOBS, "ml", "up") or {}, 2)
    twin = kube.create(p.COMPUTEJOBS, "ml", {**kube.objects[(p.COMPUTEJOBS, "ml", "up")], "status": {},
                                             "metadata": {"name": "up-twin"}})
    assert twin is not None
    r.reconcile(twin)
    r.enqueue("ml", "up", _succeeded_from(kube, "up", kube.get(p.COMPUTEJOBS, "ml", "up-twin") or {}))
    kube.writes.clear()
    r.reconcile_named("ml", "down")
    done = kube.get(p.COMPUTEJOBS, "ml", "down")
    assert done is not None
    assert (done["status"]["phase"], done["status"]["reason"]) == (p.SUCCEEDED, p.REASON_EARLY_CUTOFF)
    assert done["status"]["cacheKey"] == down["status"]["cacheKey"]
    assert done["status"]["result"] == down["status"]["result"]
    assert kube.writes == [("status", p.COMPUTEJOBS, "down")]     # no assignment, no schedule
    assert ("down", p.REASON_EARLY_CUTOFF) in {(e.name, e.reason) for e in kube.events}


# -- a cold tier (spec.tiers) ------------------------------------------------------------------------


def test_a_cache_with_a_tier_opens_its_location_tiered_and_names_the_tier_to_the_agent(
        world: tuple[Reconciler, FakeKube, list[str]]) -> None:
    r, kube, _ = world
    put_cache(r, kube, "ml", "default", "ml/", tiers=[{"after": "720h", "store": {"bucket": "ml-cold"}}])
    job_ = submit(r, kube, "a")
    assert job_["status"]["phase"] == "Scheduled"
    assert job(job_).status.cold_tier == p.ColdTier("ml-cold", "", 720 * 3600.0)
    backend = r.stores.get(p.DEFAULT_BUCKET, "ml").backend
    assert isinstance(backend, TieredBackend) and backend.after == 720 * 3600.0
    assert backend.cold.describe().endswith("ml-cold")
    put_cache(r, kube, "ml", "default", "ml/")   # the tier removed: the location is opened without it
    assert "coldTier" not in submit(r, kube, "b", x=2)["status"]
    assert not isinstance(r.stores.get(p.DEFAULT_BUCKET, "ml").backend, TieredBackend)


@pytest.mark.parametrize(("tier", "words"), [
    ({"bucket": p.DEFAULT_BUCKET, "prefix": "ml/"}, "is owned by namespace ml"),
    ({"bucket": p.DEFAULT_BUCKET, "prefix": "ops/cold"}, "overlaps spec.store"),
], ids=["another-namespaces-home", "inside-its-own-store"])
def test_a_cache_whose_tier_it_may_not_use_is_stalled(
        world: tuple[Reconciler, FakeKube, list[str]], tier: dict[str, Any], words: str) -> None:
    r, kube, _ = world
    put_cache(r, kube, "ml", "default", "ml/")
    put_cache(r, kube, "ops", "default", "ops/", tiers=[{"after": "1h", "store": tier}])
    stalled = ready_condition(r, kube, "ops", "default")
    assert stalled["status"] == "False" and "spec.tiers[0].store" in stalled["message"] and words in stalled["message"]
    assert not isinstance(r.stores.get(p.DEFAULT_BUCKET, "ops").backend, TieredBackend)
