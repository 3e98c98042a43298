"""Run records as the cluster makes them: status.upstreams from what resolution read, the record of a
ComputeJob run (identity, sources, cache), status patches carrying runId; and @memoize appending one
record per call through the deferred writer."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from test_cluster_resolve import FakeLookups

from memoplane import memoize
from memoplane.cas import open_store
from memoplane.cluster import lineage, resolve
from memoplane.cluster import status as st
from memoplane.history import RunRecord
from memoplane.history.deferred import DEFERRED
from memoplane.jobs import JsonInput

NOW = datetime(2026, 1, 1, tzinfo=UTC)
RUNTIME = "b3:" + "0" * 64


def cjob(name: str, inputs: list[dict[str, Any]], status: dict[str, Any] | None = None,
         generation: int = 1) -> dict[str, Any]:
    return {"apiVersion": "memoplane.io/v1alpha1", "kind": "ComputeJob",
            "metadata": {"name": name, "namespace": "ml", "uid": f"uid-{name}", "generation": generation,
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"python": {"source": "def main(**kw):\n    return 1\n"}, "inputs": inputs,
                     "cache": {"resultCache": "team"}},
            "status": status or {}}


def succeeded(name: str, digest: str, run_id: str) -> dict[str, Any]:
    return cjob(name, [{"name": "n", "value": 1}], {"phase": "Succeeded", "observedGeneration": 1,
                                                    "result": {"digest": digest}, "runId": run_id})


def test_resolution_names_each_upstreams_result_and_run_as_read() -> None:
    down = cjob("down", [{"name": "a", "fromJob": {"name": "up"}}, {"name": "k", "value": 3}])
    lookups = FakeLookups(jobs={"up": succeeded("up", "b3:r1", "r00000000000000000001-aaaaaaaa")},
                          results={"b3:r1": JsonInput([1, 2])})
    outcome = resolve.resolve(down, RUNTIME, lookups, NOW)
    assert isinstance(outcome, resolve.Resolved)
    assert outcome.upstreams == [{"input": "a", "job": "ml/up", "result": "b3:r1",
                                  "runId": "r00000000000000000001-aaaaaaaa"}]
    patch = st.resolved({}, 1, outcome.job.key, outcome.input_digests, NOW, outcome.upstreams)
    assert patch["upstreams"] == outcome.upstreams and patch["runId"] is None   # an earlier run's id is cleared


def test_a_job_without_upstreams_writes_none() -> None:
    outcome = resolve.resolve(cjob("solo", [{"name": "k", "value": 3}]), RUNTIME, FakeLookups(), NOW)
    assert isinstance(outcome, resolve.Resolved) and outcome.upstreams == []
    assert st.resolved({}, 1, outcome.job.key, {}, NOW, outcome.upstreams)["upstreams"] is None


def test_a_cluster_record_names_the_job_its_sources_and_the_upstream_run(tmp_path: Path) -> None:
    up_run = "r00000000000000000001-aaaaaaaa"
    down = cjob("down", [{"name": "a", "fromJob": {"name": "up"}}, {"name": "k", "value": 3}], generation=4)
    lookups = FakeLookups(jobs={"up": succeeded("up", "b3:r1", up_run)}, results={"b3:r1": JsonInput(7)})
    outcome = resolve.resolve(down, RUNTIME, lookups, NOW)
    assert isinstance(outcome, resolve.Resolved)
    down["status"] = {"upstreams": outcome.upstreams}
    with open_store(str(tmp_path / "store")) as store:
        record = lineage.job_record(down, outcome.job, run_id="r00000000000000000002-bbbbbbbb", result="b3:out",
                                    result_size=10, node="node-a", signer="node-a-1", started=1.0, ended=2.0,
                                    cached=False, compute_seconds=1.0, store=store)
        assert record.code_blob is not None and store.get_bytes(record.code_blob).startswith(b"def main")
    assert (record.job.namespace, record.job.name, record.job.uid, record.job.generation) == ("ml", "down",
                                                                                            "uid-down", 4)
    assert record.cache == "ml/team" and record.key == outcome.job.key and record.policy == "Use"
    a, k = record.inputs
    assert (a.source, a.upstream_job, a.upstream_result, a.upstream_run) == ("fromJob", "ml/up", "b3:r1", up_run)
    assert a.digest == JsonInput(7).digest
    assert (k.source, k.upstream_run) == ("value", None)
    assert RunRecord.from_json(record.to_json()) == record


def test_settling_patches_carry_the_run_id() -> None:
    assert st.failed({}, 1, "sandbox", "boom", NOW, run_id="r1")["runId"] == "r1"
    assert st.failed({}, 1, "InvalidSpec", "bad", NOW)["runId"] is None


def test_memoize_appends_one_record_per_call_computed_then_served(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"))

    @memoize(store=store)
    def double(n: int) -> int:
        return n * 2

    assert double(21) == 42 and double(21) == 42 and double(5) == 10
    DEFERRED.flush()
    kept = [RunRecord.from_json(store.run_record(r) or b"") for r in store.run_record_ids()]
    mine = [r for r in kept if r.job.name.endswith("double")]
    assert [(r.cached, r.result is not None) for r in mine] == [(False, True), (True, True), (False, True)]
    computed, served, other = mine
    assert computed.result == served.result and computed.key == served.key == double.key(21)
    assert computed.signer and served.signer == computed.signer
    assert computed.code_blob and b"def double" in store.get_bytes(computed.code_blob)
    assert [i.name for i in computed.inputs] == ["n"] and other.key == double.key(5)
