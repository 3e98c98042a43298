"""The operator's decisions as values, table-tested: what a job does given what was read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from memoplane.cluster import decide, mapping, resolve
from memoplane.cluster import protocol as p
from memoplane.cluster.index import job_topic, key_topic
from memoplane.cluster.schedule import NodeView
from memoplane.jobs import Job, PythonCode

KEY = "b3:" + "aa" * 32
R1, R2 = "b3:" + "11" * 32, "b3:" + "22" * 32
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def cj(name: str = "a", phase: str | None = "Pending", attempts: int = 0, node: str | None = None,
       created: str = "2026-01-02T03:04:05Z", backoff_limit: int | None = None, **status: Any) -> dict[str, Any]:
    labels = {p.NODE_LABEL: node} if node else {}
    spec: dict[str, Any] = {"inputs": [{"name": "x", "fromJob": {"name": "up"}}]}
    if backoff_limit is not None:
        spec["backoffLimit"] = backoff_limit
    return {"metadata": {"name": name, "namespace": "ml", "uid": "u-" + name, "generation": 1,
                         "creationTimestamp": created, "labels": labels,
                         "annotations": {p.JOB_GENERATION_ANNOTATION: "1"}},
            "spec": spec,
            "status": {"phase": phase, "cacheKey": KEY, "attempts": attempts, "observedGeneration": 1, **status}}


def nv(name: str, runtime: str = R1, age: float = 0.0, capacity: int = 2) -> NodeView:
    return NodeView(name, capacity, 0, {"python": runtime}, age, 10.0)


def test_after_resolution() -> None:
    resolved = resolve.Resolved(Job(code=PythonCode("def main(): pass", "main"), inputs={}, runtime=R1))
    assert decide.after_resolution(cj(), resolved) is resolved
    assert decide.after_resolution(cj(), resolve.Waiting(p.REASON_UPSTREAM, "m")) == \
        decide.Wait(p.REASON_UPSTREAM, "m", (job_topic("ml", "up"),))
    assert decide.after_resolution(cj(), resolve.Failed(p.REASON_INVALID, "m")) == decide.Fail(p.REASON_INVALID, "m")


@pytest.mark.parametrize(("policy", "missed", "looks"), [("Use", False, True), ("Use", True, False),
                                                         ("Refresh", False, False), ("Bypass", False, False)])
def test_looks_up(policy: str, missed: bool, looks: bool) -> None:
    assert decide.looks_up(policy, missed) is looks


def test_follow_waits_for_the_leader_on_its_key() -> None:
    me, older = cj("b", created="2026-01-02T03:04:06Z"), cj("a")
    assert decide.follow(me, [me, older]) == decide.Wait(
        p.REASON_IN_FLIGHT, "waiting for ComputeJob 'a', which computes the same key", (key_topic("ml", KEY),))
    assert decide.follow(older, [me, older]) is None
    assert decide.follow(me, []) is None


@pytest.mark.parametrize(("job", "nodes", "want"), [
    (cj(), [nv("n1"), nv("n2", capacity=4)], decide.Schedule("n2", 1, p.REASON_SCHEDULED, "assigned to node n2 (attempt 1)")),
    (cj(attempts=1, node="n2"), [nv("n1"), nv("n2")],
     decide.Schedule("n1", 2, p.REASON_RESCHEDULED, "assigned to node n1 (attempt 2)")),
    (cj(), [nv("n1", runtime=R2)], decide.Rederive(p.REASON_RUNTIME_MISMATCH,
                                                    f"agents now run profile 'python' as {R2[:15]}…")),
    (cj(), [nv("n1", age=60.0)], decide.Wait(p.REASON_NO_NODE,
                                             f"no live agent serves profile 'python' at runtime {R1[:15]}…")),
])
def test_place(job: dict[str, Any], nodes: list[NodeView], want: object) -> None:
    assert decide.place(job, nodes, {}, "python", R1) == want


@pytest.mark.parametrize(("job", "want"), [
    (cj(phase="Running", attempts=1, node="n1"), decide.Later()),
    (cj(phase="Running", attempts=1, node="gone"), decide.Reassign("node gone lost its lease", 1)),
    (cj(phase="Scheduled", attempts=1), decide.Reassign("the job has no node", 1)),
    (cj(phase="Running", attempts=3, node="gone"),
     decide.Fail(p.REASON_BACKOFF_LIMIT, "node gone lost its lease during attempt 3; backoffLimit 2 reached")),
    (cj(phase="Running", attempts=1, node="gone", backoff_limit=0),
     decide.Fail(p.REASON_BACKOFF_LIMIT, "node gone lost its lease during attempt 1; backoffLimit 0 reached")),
])
def test_check_node(job: dict[str, Any], want: object) -> None:
    assert decide.check_node(job, [nv("n1")]) == want


def test_backing_off_until_the_backoff_ends() -> None:
    stamp = T0.strftime("%Y-%m-%dT%H:%M:%SZ")
    job = cj(attempts=2, conditions=[{"type": "Reconciling", "status": "True", "reason": p.REASON_BACKOFF,
                                      "lastTransitionTime": stamp}])
    assert decide.backing_off(job, T0 + timedelta(seconds=1), base=1.0)       # attempt 2 waits 2s
    assert not decide.backing_off(job, T0 + timedelta(seconds=2), base=1.0)
    assert not decide.backing_off(cj(), T0, base=1.0)


def test_a_missing_cache_is_created_only_when_it_is_the_default() -> None:
    assert decide.missing_cache("ml", "default") == decide.CreateDefault("ml")
    wait = decide.missing_cache("ml", "shared")
    assert isinstance(wait, decide.Wait) and wait.reason == p.REASON_NO_CACHE and "shared" in wait.message
    body = decide.default_cache("ml")
    assert body["spec"]["store"] == {"bucket": p.DEFAULT_BUCKET, "prefix": "ml/"}


def parent(**status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "m", "namespace": "ml", "uid": "u-m", "generation": 2},
            "spec": {"map": {"over": "xs"}, "inputs": [{"name": "xs", "value": [1, 2]}]}, "status": status}


def test_map_steps() -> None:
    # Progress(total, distinct, cached, computed, running, failed, batches, first_failure)
    under_way = mapping.Progress(2, 2, 0, 1, 1, 0, 1, None)
    assert decide.map_step(parent(), under_way, {}, ["m-2"]) == decide.Progressing(True, (job_topic("ml", "m-2"),))
    same = parent(map=under_way.counts(), phase=p.RUNNING, observedGeneration=2)
    assert decide.map_step(same, under_way, {}, ["m-2"]) == decide.Progressing(False, (job_topic("ml", "m-2"),))
    assert decide.map_step(parent(), mapping.Progress(2, 2, 1, 1, 0, 0, 1, None), {}) == decide.Finish()
    failed = mapping.Progress(2, 2, 0, 1, 0, 1, 1, (1, "m-2"))
    child = {"status": {"phase": p.FAILED, "failure": {"reason": "oom", "message": "killed"}}}
    assert decide.map_step(parent(), failed, {"m-2": child}) == decide.Fail(
        mapping.REASON_SUBTASK_FAILED, "element 1 (batch ComputeJob 'm-2') failed (oom): killed",
        {"map": {"total": 2, "distinct": 2, "succeeded": 1, "cached": 0, "computed": 1, "running": 0, "failed": 1,
                 "batches": 1}})
    assert decide.name_taken("m", []) is None
    assert decide.name_taken("m", ["m-1"]) == decide.Fail(
        mapping.REASON_NAME_TAKEN, "ComputeJob 'm-1' exists and is not a sub-task of 'm': rename one of them")
