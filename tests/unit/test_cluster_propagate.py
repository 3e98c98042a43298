"""Propagation along fromJob edges, table-tested: which Ready jobs are held when an upstream
is recomputed, and what a held job does once it resolves again (memoplane.cluster.propagate)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from memoplane.api.conditions import kstatus, mark_ready
from memoplane.cluster import flight, propagate
from memoplane.cluster import protocol as p
from memoplane.cluster import status as st

KEY, KEY2 = "b3:" + "aa" * 32, "b3:" + "bb" * 32
R1, R2 = "b3:" + "11" * 32, "b3:" + "22" * 32
D1, D2 = "b3:" + "33" * 32, "b3:" + "44" * 32
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def cj(name: str, *ups: str | tuple[str, str], generation: int = 1, observed: int | None = 1,
       phase: str | None = "Succeeded", result: str | None = R1, **status: Any) -> dict[str, Any]:
    """A job whose inputs are fromJob `ups` (a name, or (namespace, name)), input i named after its upstream."""
    inputs = [{"name": f"in_{u if isinstance(u, str) else u[1]}",
               "fromJob": {"name": u} if isinstance(u, str) else {"name": u[1], "namespace": u[0]}} for u in ups]
    return {"metadata": {"name": name, "namespace": "ml", "generation": generation,
                         "annotations": {p.JOB_GENERATION_ANNOTATION: str(generation)}},
            "spec": {"inputs": inputs or [{"name": "count", "value": 1}]},
            "status": {"phase": phase, "observedGeneration": observed, "cacheKey": KEY,
                       **({"result": {"digest": result}} if result else {}), **status}}


def dag(download: dict[str, Any]) -> propagate.EdgeIndex:
    edges = propagate.EdgeIndex()
    edges.replace([download, cj("normalize", "download"), cj("report", "download", "normalize")])
    return edges


def test_edges_of_a_job_name_its_fromjob_inputs_in_any_namespace() -> None:
    obj = cj("report", "download", ("shared", "rows"))
    assert propagate.from_job_inputs(obj) == (("in_download", ("ml", "download")), ("in_rows", ("shared", "rows")))
    edges = propagate.EdgeIndex()
    edges.observe(obj)
    assert edges.downstream(("shared", "rows")) == [("ml", "report")]


def test_a_settled_upstream_holds_nothing() -> None:
    edges = dag(cj("download"))
    assert edges.to_hold(("ml", "download")) == []
    assert edges.hold(cj("normalize", "download")) is None


def test_a_new_generation_upstream_holds_each_ready_job_that_uses_it() -> None:
    edges = dag(cj("download", generation=2, observed=1))
    assert edges.to_hold(("ml", "download")) == [("ml", "normalize"), ("ml", "report")]
    assert edges.hold(cj("normalize", "download")) == propagate.Hold(
        "input 'in_download': upstream ComputeJob 'download' is being recomputed (generation 2)")


def test_holding_is_transitive_through_a_held_job() -> None:
    edges = dag(cj("download"))
    held = cj("normalize", "download", phase=p.WAITING, reason=p.REASON_UPSTREAM_CHANGED)
    edges.observe(held)
    assert propagate.held(held)
    assert edges.to_hold(("ml", "normalize")) == [("ml", "report")]
    assert edges.hold(cj("report", "normalize")) == propagate.Hold(
        "input 'in_normalize': upstream ComputeJob 'normalize' is being recomputed (generation 1)")


def test_a_failed_upstream_holds_and_says_so() -> None:
    edges = dag(cj("download", phase=p.FAILED, result=None))
    assert edges.hold(cj("normalize", "download")) == propagate.Hold(
        "input 'in_download': upstream ComputeJob 'download' is not Ready (phase Failed)")


def test_only_ready_jobs_are_held() -> None:
    edges = dag(cj("download", generation=2))
    for not_ready in (cj("n", "download", phase=p.RUNNING), cj("n", "download", generation=2),
                      cj("n", "download", phase=p.FAILED)):
        assert edges.hold(not_ready) is None
    deleting = cj("n", "download")
    deleting["metadata"]["deletionTimestamp"] = "2026-01-02T03:04:05Z"
    assert edges.hold(deleting) is None


def test_a_deleted_upstream_holds_nothing_and_its_edges_stay() -> None:
    edges = dag(cj("download", generation=2))
    edges.forget(("ml", "download"))
    assert edges.hold(cj("normalize", "download")) is None   # results outlive jobs
    assert edges.downstream(("ml", "download")) == [("ml", "normalize"), ("ml", "report")]
    edges.forget(("ml", "normalize"))
    assert edges.downstream(("ml", "download")) == [("ml", "report")]


def test_an_edited_spec_moves_its_edges() -> None:
    edges = dag(cj("download"))
    edges.observe(cj("report", "normalize"))
    assert edges.downstream(("ml", "download")) == [("ml", "normalize")]


def test_a_held_job_is_resolved_again() -> None:
    held = cj("normalize", "download", phase=p.WAITING, reason=p.REASON_UPSTREAM_CHANGED)
    assert flight.needs_resolution(held)
    assert not flight.needs_resolution(cj("normalize", "download", phase=p.WAITING, reason=p.REASON_UPSTREAM))


def test_release_to_the_same_key_is_an_early_cutoff() -> None:
    held = cj("report", "download", "normalize", phase=p.WAITING, reason=p.REASON_UPSTREAM_CHANGED)
    assert propagate.release(held, KEY, {"in_download": D1, "in_normalize": D2}) == propagate.EarlyCutoff(
        f"input 'in_download': upstream 'download' recomputed to the same value {D1[:15]}…; "
        f"input 'in_normalize': upstream 'normalize' recomputed to the same value {D2[:15]}…; nothing re-ran")


def test_release_to_another_key_names_the_inputs_that_changed() -> None:
    held = cj("report", "download", ("other", "normalize"), phase=p.WAITING, reason=p.REASON_UPSTREAM_CHANGED,
              inputDigests={"in_download": D1, "in_normalize": D1})
    got = propagate.release(held, KEY2, {"in_download": D2, "in_normalize": D1})
    assert got == propagate.Changed(f"input 'in_download' (upstream 'download') changed {D1[:15]}… -> {D2[:15]}…")
    got = propagate.release(held, KEY2, {"in_download": D1, "in_normalize": D2})
    assert got == propagate.Changed(
        f"input 'in_normalize' (upstream 'other/normalize') changed {D1[:15]}… -> {D2[:15]}…")


def test_the_hold_status_is_not_ready_and_keeps_the_result() -> None:
    done = cj("normalize", "download")
    done["status"]["conditions"] = mark_ready([], p.REASON_COMPUTED, "computed", 1, T0)
    patch = st.upstream_changed(done["status"], 1, p.REASON_UPSTREAM_CHANGED, "m", T0)
    assert "result" not in patch and patch["phase"] == p.WAITING
    conds = {c["type"]: c["status"] for c in patch["conditions"]}
    assert conds == {"Ready": "False", "Reconciling": "True"}
    assert kstatus(1, patch["observedGeneration"], patch["conditions"]) == "InProgress"
    back = st.early_cutoff({**done["status"], **patch}, 1, "same", T0)
    assert back["phase"] == p.SUCCEEDED and back["reason"] == p.REASON_EARLY_CUTOFF and "result" not in back
    assert kstatus(1, back["observedGeneration"], back["conditions"]) == "Current"



def test_a_ready_job_whose_fromjob_input_changed_while_it_ran_is_held() -> None:
    done = cj("normalize", "download", inputDigests={"in_download": D1})
    assert propagate.needs_check(done)
    assert propagate.stale_inputs(done, {"in_download": D1}) is None
    assert propagate.stale_inputs(done, {"in_download": D2}) == propagate.Hold(
        f"input 'in_download' (upstream 'download') changed {D1[:15]}… -> {D2[:15]}… since it was resolved")
    assert propagate.stale_inputs(cj("n", "download", phase=p.RUNNING, inputDigests={"in_download": D1}),
                                  {"in_download": D2}) is None


def test_only_ready_jobs_with_recorded_fromjob_digests_are_checked() -> None:
    assert not propagate.needs_check(cj("download", inputDigests={"count": D1}))   # no fromJob input
    assert not propagate.needs_check(cj("normalize", "download"))                  # no digests recorded
    assert not propagate.needs_check(cj("normalize", "download", phase=p.RUNNING, inputDigests={"in_download": D1}))
    mapped = cj("normalize", "download", inputDigests={"in_download": D1})
    mapped["spec"]["map"] = {"over": "in_download"}
    assert not propagate.needs_check(mapped)
    assert propagate.stale_inputs(cj("normalize", "download", inputDigests={}), {"in_download": D2}) is None


def test_a_held_job_whose_upstream_is_gone_keeps_its_result() -> None:
    held = cj("normalize", "download", phase=p.WAITING, reason=p.REASON_UPSTREAM_CHANGED)
    assert propagate.kept(held, p.REASON_NOT_FOUND, "m") == propagate.EarlyCutoff(
        "m; it keeps its previous result", p.REASON_UPSTREAM_GONE)
    assert propagate.kept(held, p.REASON_UPSTREAM_FAILED, "m") is None   # a failed upstream fails it
    assert propagate.kept(cj("normalize", "download", phase=p.WAITING), p.REASON_NOT_FOUND, "m") is None
