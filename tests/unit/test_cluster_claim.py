"""The agent's decisions: claim, re-run after a restart, recognise stale assignments."""

from __future__ import annotations

from typing import Any

from memoplane.cluster import protocol as p
from memoplane.cluster.claim import agent_action, assignment_of, claimable, still_ours

KEY = "b3:" + "aa" * 32


def cj(phase: str, node_label: str | None = "node-a", status_node: str | None = None, digest: str = "b3:j1",
       attempts: int = 1, namespace: str = "ml", generation: int = 1, resolved: int = 1) -> dict[str, Any]:
    labels = {p.NODE_LABEL: node_label} if node_label else {}
    return {"metadata": {"name": "j", "namespace": namespace, "uid": "u1", "generation": generation,
                         "labels": labels,
                         "annotations": {p.JOB_DIGEST_ANNOTATION: digest, p.STORE_ANNOTATION: "s3://memoplane/ml",
                                         p.JOB_GENERATION_ANNOTATION: str(resolved)}},
            "spec": {"backoffLimit": 3, "cache": {"policy": "Refresh"}},
            "status": {"phase": phase, "node": status_node, "attempts": attempts, "cacheKey": KEY}}


def test_assignment_fields() -> None:
    a = assignment_of(cj("Scheduled"))
    assert a is not None
    assert (a.job_digest, a.store, a.attempts, a.policy, a.backoff_limit, a.cache_key) == \
        ("b3:j1", "s3://memoplane/ml", 1, "Refresh", 3, KEY)
    assert assignment_of(cj("Scheduled", generation=2, resolved=1)) is None


def test_the_assignment_says_whether_to_cache_the_result() -> None:
    assert assignment_of(cj("Scheduled")).cache_result  # type: ignore[union-attr]
    at_quota = cj("Scheduled")
    at_quota["metadata"]["annotations"][p.CACHE_RESULT_ANNOTATION] = "false"
    a = assignment_of(at_quota)
    assert a is not None and not a.cache_result


def test_the_assignment_names_the_stores_cold_tier_from_the_status_only() -> None:
    job = cj("Scheduled")
    assert assignment_of(job).cold_tier is None  # type: ignore[union-attr]
    job["status"]["coldTier"] = "2592000 s3://memoplane-cold/ml"
    assert assignment_of(job).cold_tier == p.ColdTier("memoplane-cold", "ml", 2592000.0)  # type: ignore[union-attr]
    for bad in ("soon s3://memoplane-cold/ml", "0 s3://memoplane-cold/ml", "60 /tmp/cold", "60"):
        job["status"]["coldTier"] = bad
        assert assignment_of(job).cold_tier is None, bad  # type: ignore[union-attr]
    job["status"].pop("coldTier")
    job["metadata"]["annotations"][f"{p.GROUP}/cold-tier"] = "60 s3://elsewhere/ml"   # metadata is not read
    assert assignment_of(job).cold_tier is None  # type: ignore[union-attr]


def test_claim_scheduled_jobs_for_this_node() -> None:
    assert agent_action(cj("Scheduled"), "node-a", running_here=False) == "claim"
    assert agent_action(cj("Scheduled"), "node-b", running_here=False) == "ignore"
    assert agent_action(cj("Scheduled"), "node-a", running_here=True) == "ignore"
    for phase in ("Pending", "Waiting", "Succeeded", "Failed"):
        assert agent_action(cj(phase), "node-a", running_here=False) == "ignore"


def test_rerun_after_restart_only_own_running_jobs() -> None:
    assert agent_action(cj("Running", status_node="node-a"), "node-a", running_here=False) == "claim"
    assert agent_action(cj("Running", status_node="node-a"), "node-a", running_here=True) == "ignore"
    # Relabelled to us but the status still names the old node: the operator will set Scheduled.
    assert agent_action(cj("Running", status_node="node-b"), "node-a", running_here=False) == "ignore"


def test_namespace_patterns() -> None:
    assert agent_action(cj("Scheduled", namespace="mpt-1-x"), "node-a", False, ["mpt-1-*"]) == "claim"
    assert agent_action(cj("Scheduled", namespace="other"), "node-a", False, ["mpt-1-*"]) == "ignore"


def test_stale_assignment_after_conflict() -> None:
    mine = assignment_of(cj("Running", status_node="node-a"))
    assert mine is not None
    assert still_ours(cj("Running", status_node="node-a"), "node-a", mine)
    assert not still_ours(cj("Running", status_node="node-a", attempts=2), "node-a", mine)   # reassigned
    assert not still_ours(cj("Scheduled", node_label="node-b"), "node-a", mine)
    assert not still_ours(cj("Running", status_node="node-a", digest="b3:j2"), "node-a", mine)  # new spec
    assert claimable(cj("Scheduled"), "node-a", assignment_of(cj("Scheduled")))  # type: ignore[arg-type]
