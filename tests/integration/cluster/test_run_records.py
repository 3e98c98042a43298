"""Run records on the cluster (DESIGN §12): every settled ComputeJob run appends one record to its
ResultCache's store and names it in status.runId; a downstream's fromJob input names the upstream's
exact run (status.upstreams); the operator and agents send OpenLineage events for each run.
Real API server, MinIO, operator and agents; the OpenLineage endpoint is the stack's loopback receiver."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from openlineage_check import valid

from memoplane.api.specs import computejob_manifest
from memoplane.cas import Store
from memoplane.cluster import protocol as p
from memoplane.history import RunRecord

pytestmark = pytest.mark.integration
Stack = Any  # conftest.Stack (fixture `stack`)

UP = "def main(n):\n    return list(range(n))\n"
DOWN = "def main(raw):\n    return {'n': len(raw), 'sum': sum(raw)}\n"


def status(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("status") or {}


def records(store: Store, namespace: str, name: str) -> dict[str, RunRecord]:
    """The job's run records in the store, by run id."""
    out = {}
    for run_id in store.run_record_ids():
        data = store.run_record(run_id)
        record = RunRecord.from_json(data) if data is not None else None
        if record is not None and (record.job.namespace, record.job.name) == (namespace, name):
            out[run_id] = record
    return out


def dag(salt: str) -> tuple[dict[str, Any], dict[str, Any]]:
    up = computejob_manifest("up", None, {"python": {"source": UP}, "inputs": [{"name": "n", "value": 4}],
                                          "cache": {"version": salt}})
    down = computejob_manifest("down", None, {"python": {"source": DOWN},
                                              "inputs": [{"name": "raw", "fromJob": {"name": "up"}}],
                                              "cache": {"version": salt}})
    return up, down


def rerun(stack: Stack, ns: str, name: str) -> dict[str, Any]:
    """A new generation with the same key (spec.resources is not part of it): served from the cache."""
    before = stack.get(ns, name)
    stack.kube.json_patch(p.COMPUTEJOBS, ns, name, [{"op": "add", "path": "/spec/resources",
                                                     "value": {"timeoutSeconds": 600}}])
    generation = before["metadata"]["generation"] + 1
    return stack.wait(ns, name, lambda o: o["metadata"]["generation"] == generation
                      and status(o).get("observedGeneration") == generation and status(o).get("phase") in p.TERMINAL)


def lineage_events(stack: Stack, run_id: str, kinds: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The OpenLineage events of `run_id` (by the memoplane facet), once `kinds` have arrived."""
    assert stack.lineage is not None, "the stack has no OpenLineage endpoint"
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in list(stack.lineage.events)
                 if e["run"].get("facets", {}).get("memoplane", {}).get("runId") == run_id]
        if len(found) >= kinds or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_two_job_dag_computed_then_served_has_a_record_per_run_naming_the_exact_upstream_run(
        stack: Stack, ns: str) -> None:
    up, down = dag(uuid.uuid4().hex[:12])
    stack.apply(ns, down, up)
    first = stack.wait_all(ns, ["up", "down"])
    assert [status(first[n])["phase"] for n in ("up", "down")] == ["Succeeded"] * 2
    assert status(first["down"])["cached"] is False
    runs = stack.total_runs()
    again_up = rerun(stack, ns, "up")
    # down was held while up ran again, then cut off (up's value is the same): a served run of its own.
    cutoff = stack.wait(ns, "down", lambda o: status(o).get("reason") == p.REASON_EARLY_CUTOFF)
    again_down = rerun(stack, ns, "down")
    assert status(again_up)["cached"] is True and status(again_down)["cached"] is True
    assert status(cutoff)["cached"] is True
    assert stack.total_runs() == runs   # served: no sandbox ran

    store = stack.store(ns)
    ups, downs = records(store, ns, "up"), records(store, ns, "down")
    assert len(ups) == 2 and len(downs) == 3
    cut = downs[status(cutoff)["runId"]]
    assert cut.cached is True and cut.result == status(first["down"])["result"]["digest"]
    assert cut.inputs[0].upstream_run == status(again_up)["runId"]
    for first_obj, second_obj, kept in ((first["up"], again_up, ups), (first["down"], again_down, downs)):
        computed, served = kept[status(first_obj)["runId"]], kept[status(second_obj)["runId"]]
        assert (computed.cached, served.cached) == (False, True)
        assert computed.result == served.result == status(second_obj)["result"]["digest"]
        assert computed.key == served.key == status(second_obj)["cacheKey"]
        assert computed.job.uid == second_obj["metadata"]["uid"]
        assert (computed.job.generation, served.job.generation) == (1, 2)
        assert computed.node in ("node-a", "node-b") and computed.signer, computed
        assert served.node == p.OPERATOR_COMPONENT and served.signer == computed.signer
        assert computed.cache == served.cache == f"{ns}/default"
        assert computed.code_blob and store.get_bytes(computed.code_blob).decode() in (UP, DOWN)
        assert served.compute_seconds == pytest.approx(computed.compute_seconds, abs=0.5)

    # The downstream's input names the exact upstream run of each round, in its record and its status.
    for down_obj, up_obj in ((first["down"], first["up"]), (again_down, again_up)):
        (raw,) = downs[status(down_obj)["runId"]].inputs
        assert (raw.name, raw.source, raw.upstream_job) == ("raw", "fromJob", f"{ns}/up")
        assert raw.upstream_run == status(up_obj)["runId"]
        assert raw.upstream_result == status(up_obj)["result"]["digest"]
        assert status(down_obj)["upstreams"] == [{"input": "raw", "job": f"{ns}/up",
                                                   "result": status(up_obj)["result"]["digest"],
                                                   "runId": status(up_obj)["runId"]}]

    # OpenLineage: START then COMPLETE for every run, each a valid RunEvent.
    for name, obj, cached in (("up", first["up"], False), ("up", again_up, True),
                              ("down", first["down"], False), ("down", again_down, True)):
        run_id = status(obj)["runId"]
        got = lineage_events(stack, run_id, 2)
        assert [e["eventType"] for e in got] == ["START", "COMPLETE"], (name, got)
        for event in got:
            valid(event)
            assert (event["job"]["namespace"], event["job"]["name"]) == (ns, name)
        facet = got[1]["run"]["facets"]["memoplane"]
        assert facet["cached"] is cached and facet["resultDigest"] == status(obj)["result"]["digest"]
        assert facet["cacheKey"] == status(obj)["cacheKey"]
        assert [(d["namespace"], d["name"]) for d in got[1]["outputs"]] == \
            [(f"memoplane://{ns}/default", status(obj)["result"]["digest"])]


def test_a_failed_job_has_a_record_with_its_failure(stack: Stack, ns: str) -> None:
    stack.apply(ns, computejob_manifest("broken", None, {
        "python": {"source": "def main(x):\n    raise ValueError('no such row')\n"},
        "inputs": [{"name": "x", "value": uuid.uuid4().hex}], "backoffLimit": 0}))
    failed = status(stack.wait(ns, "broken"))
    assert failed["phase"] == "Failed" and failed["runId"]
    record = records(stack.store(ns), ns, "broken")[failed["runId"]]
    assert record.result is None and record.cached is False and "no such row" in (record.failure or "")
    assert record.signer is None and record.node in ("node-a", "node-b")   # nothing attested
    assert record.key == failed["cacheKey"]
    got = lineage_events(stack, failed["runId"], 2)
    assert [e["eventType"] for e in got] == ["START", "FAIL"]
    for event in got:
        valid(event)


def test_a_map_parent_records_its_list_with_each_sub_tasks_run(stack: Stack, ns: str) -> None:
    stack.apply(ns, computejob_manifest("squares", None, {
        "python": {"source": "def main(x):\n    return x * x\n"}, "inputs": [{"name": "x", "value": [1, 2, 3]}],
        "map": {"over": "x"}, "cache": {"version": uuid.uuid4().hex[:12]}}))
    done = status(stack.wait(ns, "squares", timeout=180))
    assert done["phase"] == "Succeeded" and done["runId"]
    record = records(stack.store(ns), ns, "squares")[done["runId"]]
    assert record.result == done["result"]["digest"] and record.key == done["cacheKey"]
    assert [i.name for i in record.inputs] == ["x[0]", "x[1]", "x[2]"]
    # Each element ran in a batch as its own run, with its own record: found by its result.
    store = stack.store(ns)
    every = [RunRecord.from_json(store.run_record(i) or b"") for i in store.run_record_ids()]
    for item in record.inputs:
        assert item.source == "mapElement" and item.upstream_result
        (element_run,) = [r for r in every if r.result == item.upstream_result]
        assert element_run.key == item.digest and element_run.cached is False and element_run.signer
    got = lineage_events(stack, done["runId"], 2)
    assert [e["eventType"] for e in got] == ["START", "COMPLETE"]


def test_an_agreed_verify_parent_records_the_replicas_nodes_and_keys(stack: Stack, ns: str) -> None:
    stack.apply(ns, computejob_manifest("checked", None, {
        "python": {"source": "def main(n):\n    return n + 1\n"}, "inputs": [{"name": "n", "value": 41}],
        "cache": {"version": uuid.uuid4().hex[:12]}, "verify": {"replicas": 2}}))
    done = status(stack.wait(ns, "checked", timeout=180))
    assert done["phase"] == "Succeeded" and done["runId"]
    record = records(stack.store(ns), ns, "checked")[done["runId"]]
    assert record.result == done["result"]["digest"] and record.cached is False
    assert sorted(record.node.split(",")) == ["node-a", "node-b"]
    assert len((record.signer or "").split(",")) == 2


def test_a_restarted_operator_writes_no_second_record_for_a_settled_run(stack: Stack, ns: str) -> None:
    up, down = dag(uuid.uuid4().hex[:12])
    stack.apply(ns, down, up)
    first = stack.wait_all(ns, ["up", "down"])
    assert rerun(stack, ns, "up")["status"]["cached"] is True   # a hit: the operator's record
    # down is held while up runs again, then cut off: a served run, recorded by the operator.
    cutoff = stack.wait(ns, "down", lambda o: status(o).get("reason") == p.REASON_EARLY_CUTOFF)
    store = stack.store(ns)
    before = {n: set(records(store, ns, n)) for n in ("up", "down")}
    stack.kill_operator()
    stack.start_operator()
    # A job applied after the restart settles once the new operator is at work (it lists every job as it starts).
    stack.apply(ns, computejob_manifest("after", None, {"python": {"source": UP}, "inputs": [{"name": "n", "value": 2}],
                                                        "cache": {"version": uuid.uuid4().hex[:12]}}))
    assert status(stack.wait(ns, "after"))["phase"] == "Succeeded"
    assert {n: set(records(store, ns, n)) for n in ("up", "down")} == before
    assert len(before["up"]) == 2 and len(before["down"]) == 2
    assert status(first["down"])["runId"] in before["down"]
    assert status(stack.get(ns, "down"))["runId"] == status(cutoff)["runId"]
