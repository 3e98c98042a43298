"""Leases -> live nodes, runtime per profile, node choice, lost nodes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from memoplane.cluster import protocol as p
from memoplane.cluster.schedule import LeaseTracker, NodeView, lease_fields, node_lost, pick_node, runtime_for

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
R1, R2 = "b3:" + "11" * 32, "b3:" + "22" * 32


def lease(node: str, rv: str = "1", renew: datetime = T0, capacity: int = 2, running: int = 0,
          profiles: dict[str, str] | None = None) -> dict[str, Any]:
    profiles = {"python": R1} if profiles is None else profiles
    ann = {p.CAPACITY_ANNOTATION: str(capacity), p.RUNNING_ANNOTATION: str(running),
           p.PROFILES_ANNOTATION: ",".join(profiles)}
    ann.update({p.runtime_annotation(k): v for k, v in profiles.items()})
    return {"metadata": {"name": p.lease_name(node), "resourceVersion": rv, "annotations": ann},
            "spec": {"renewTime": renew.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "leaseDurationSeconds": 10}}


def node(name: str, age: float = 0.0, capacity: int = 2, running: int = 0,
         profiles: dict[str, str] | None = None) -> NodeView:
    return NodeView(name, capacity, running, {"python": R1} if profiles is None else profiles, age, 10.0)


def test_lease_fields() -> None:
    f = lease_fields(lease("node-a", capacity=3, running=1, profiles={"python": R1, "minimal": R2}))
    assert f is not None
    assert (f["node"], f["capacity"], f["running"]) == ("node-a", 3, 1)
    assert f["profiles"] == {"python": R1, "minimal": R2}
    assert lease_fields({"metadata": {"name": "kube-scheduler"}}) is None


def test_tracker_ages_by_observed_change() -> None:
    t = LeaseTracker()
    [v] = t.observe([lease("a", rv="1", renew=T0)], now_mono=100.0, now_wall=T0 + timedelta(seconds=3))
    assert v.age_s == 3.0 and v.live  # first sight: the written renewTime
    [v] = t.observe([lease("a", rv="1", renew=T0)], now_mono=108.0, now_wall=T0 + timedelta(seconds=11))
    assert v.age_s == 11.0 and not v.live  # unchanged for 11s
    [v] = t.observe([lease("a", rv="2", renew=T0)], now_mono=109.0, now_wall=T0)  # renewed (clock skew ignored)
    assert v.age_s == 0.0 and v.live
    assert t.observe([], now_mono=110.0, now_wall=T0) == []


def test_tracker_bounds_a_skewed_first_sight() -> None:
    [v] = LeaseTracker().observe([lease("a", renew=T0)], now_mono=0.0, now_wall=T0 + timedelta(days=1))
    assert not v.live and v.age_s <= 11.0
    [v] = LeaseTracker().observe([lease("a", renew=T0 + timedelta(hours=1))], now_mono=0.0, now_wall=T0)
    assert v.live and v.age_s == 0.0  # a clock ahead of ours counts as just renewed


def test_runtime_for_prefers_the_majority_of_live_nodes() -> None:
    nodes = [node("a"), node("b", profiles={"python": R2}), node("c", profiles={"python": R2}),
             node("d", age=30, profiles={"python": R1})]
    assert runtime_for(nodes, "python") == R2
    assert runtime_for(nodes, "minimal") is None
    assert runtime_for([node("a"), node("b", profiles={"python": R2})], "python") == min(R1, R2)


def test_pick_node_by_free_capacity_profile_and_liveness() -> None:
    nodes = [node("a", capacity=2), node("b", capacity=4), node("c", age=60, capacity=100),
             node("d", capacity=100, profiles={"python": R2})]
    assert pick_node(nodes, "python", R1, {}) == "b"
    assert pick_node(nodes, "python", R1, {"b": 3}) == "a"
    assert pick_node(nodes, "python", R1, {"a": 5, "b": 5}) == "b"  # all full: least overloaded
    assert pick_node(nodes, "python", R2, {}) == "d"
    assert pick_node(nodes, "minimal", R1, {}) is None
    assert pick_node([node("a", running=2), node("b", capacity=2)], "python", R1, {}) == "b"


def test_pick_node_avoids_the_failed_node_when_it_can() -> None:
    nodes = [node("a", capacity=8), node("b", capacity=1)]
    assert pick_node(nodes, "python", R1, {}, avoid="a") == "b"
    assert pick_node([node("a")], "python", R1, {}, avoid="a") == "a"


def test_node_lost() -> None:
    nodes = [node("a"), node("b", age=11)]
    assert not node_lost("a", nodes)
    assert node_lost("b", nodes)
    assert node_lost("gone", nodes)
    assert not node_lost(None, nodes)


def job_on(node_name: str | None, phase: str, attempts: int = 1, backoff_limit: int | None = None) -> dict[str, Any]:
    labels = {p.NODE_LABEL: node_name} if node_name else {}
    spec = {} if backoff_limit is None else {"backoffLimit": backoff_limit}
    return {"metadata": {"labels": labels}, "spec": spec, "status": {"phase": phase, "attempts": attempts}}


def test_assigned_load_counts_scheduled_and_running_jobs_per_node() -> None:
    from memoplane.cluster.schedule import assigned_load

    jobs = [job_on("a", p.SCHEDULED), job_on("a", p.RUNNING), job_on("b", p.RUNNING),
            job_on("b", p.PENDING), job_on("c", p.SUCCEEDED), job_on(None, p.RUNNING)]
    assert assigned_load(jobs) == {"a": 2, "b": 1}
    assert assigned_load([]) == {}


def test_lost_reschedules_until_the_backoff_limit() -> None:
    from memoplane.cluster.schedule import lost

    nodes = [node("a"), node("dead", age=60.0)]
    assert lost(job_on("a", p.RUNNING), nodes) is None
    gone = lost(job_on("dead", p.RUNNING, attempts=2), nodes)
    assert gone is not None and gone.what == "node dead lost its lease" and not gone.exhausted
    assert gone.backoff_limit == 2                               # the default
    assert lost(job_on("dead", p.RUNNING, attempts=3), nodes).exhausted  # type: ignore[union-attr]
    orphan = lost(job_on(None, p.SCHEDULED, attempts=1, backoff_limit=0), nodes)
    assert orphan is not None and orphan.what == "the job has no node" and orphan.exhausted
