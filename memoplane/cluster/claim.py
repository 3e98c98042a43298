"""The agent's decisions about the jobs labelled for its node (pure).

An assignment is identified by (uid, job digest, attempts): the operator writes a new
job digest for a new generation and increments attempts when it (re)assigns, so a write
from an earlier assignment is recognised as stale and dropped.

- Scheduled -> claim it (patch Running with a resourceVersion precondition) and run it.
- Running on this node but not running here -> the agent restarted and its sandbox died
  with it: claim again and re-run (a result is only reported after its ref is durable,
  so re-running is always safe).
- anything else -> not ours to act on now.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from . import protocol as p
from .views import job


@dataclass(frozen=True)
class Assignment:
    uid: str
    namespace: str
    name: str
    job_digest: str
    store: str
    attempts: int
    generation: int
    policy: str
    backoff_limit: int
    cache_key: str
    cache_result: bool = True   # false: the cache was at its quota when resolved: compute, set no ref
    cold_tier: p.ColdTier | None = None   # the store's cold tier, if its cache has one


def assignment_of(obj: Mapping[str, Any]) -> Assignment | None:
    view = job(obj)
    meta, status = view.meta, view.status
    digest, store, key = view.assigned.job_digest, view.assigned.store_url, status.cache_key
    if not digest or not store or not key or not view.resolved_for_current_generation:
        return None
    return Assignment(uid=meta.uid, namespace=meta.namespace, name=meta.name, job_digest=digest, store=store,
                      attempts=status.attempts, generation=meta.generation, policy=view.spec.policy,
                      backoff_limit=view.spec.backoff_limit, cache_key=key,
                      cache_result=view.assigned.cache_result, cold_tier=status.cold_tier)


def labelled_for(obj: Mapping[str, Any], node: str) -> bool:
    return job(obj).assigned.node == node


Action = Literal["claim", "ignore"]


def agent_action(obj: Mapping[str, Any], node: str, running_here: bool,
                 patterns: tuple[str, ...] | list[str] = ()) -> Action:
    meta = job(obj).meta
    if not labelled_for(obj, node) or meta.deleting:
        return "ignore"
    if not p.namespace_matches(list(patterns), meta.namespace):
        return "ignore"
    if assignment_of(obj) is None or running_here:
        return "ignore"
    status = job(obj).status
    if status.phase == p.SCHEDULED:
        return "claim"
    if status.phase == p.RUNNING and status.node == node:
        return "claim"
    return "ignore"


def still_ours(obj: Mapping[str, Any], node: str, mine: Assignment) -> bool:
    """After a 409: does the fresh object still hold the assignment we are working on?"""
    now = assignment_of(obj)
    status = job(obj).status
    return (labelled_for(obj, node) and now is not None and now.uid == mine.uid
            and now.job_digest == mine.job_digest and now.attempts == mine.attempts
            and status.phase == p.RUNNING and status.node == node)


def claimable(obj: Mapping[str, Any], node: str, mine: Assignment) -> bool:
    """After a 409 on the claim: may we still claim it (same assignment, not yet claimed
    by us or anyone)?"""
    now = assignment_of(obj)
    status = job(obj).status
    return (labelled_for(obj, node) and now is not None and now.uid == mine.uid
            and now.job_digest == mine.job_digest and now.attempts == mine.attempts
            and (status.phase == p.SCHEDULED or (status.phase == p.RUNNING and status.node == node)))
