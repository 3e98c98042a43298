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
from .flight import policy_of, resolved_for_current_generation


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


def assignment_of(obj: Mapping[str, Any]) -> Assignment | None:
    meta = obj.get("metadata") or {}
    ann = meta.get("annotations") or {}
    status = obj.get("status") or {}
    digest, store = ann.get(p.JOB_DIGEST_ANNOTATION), ann.get(p.STORE_ANNOTATION)
    if not digest or not store or not status.get("cacheKey") or not resolved_for_current_generation(obj):
        return None
    return Assignment(uid=str(meta.get("uid") or ""), namespace=str(meta.get("namespace") or ""),
                      name=str(meta.get("name") or ""), job_digest=digest, store=store,
                      attempts=int(status.get("attempts") or 0), generation=int(meta.get("generation") or 0),
                      policy=policy_of(obj),
                      backoff_limit=int((obj.get("spec") or {}).get("backoffLimit", 2)),
                      cache_key=str(status["cacheKey"]))


def labelled_for(obj: Mapping[str, Any], node: str) -> bool:
    return ((obj.get("metadata") or {}).get("labels") or {}).get(p.NODE_LABEL) == node


Action = Literal["claim", "ignore"]


def agent_action(obj: Mapping[str, Any], node: str, running_here: bool,
                 patterns: tuple[str, ...] | list[str] = ()) -> Action:
    meta = obj.get("metadata") or {}
    if not labelled_for(obj, node) or meta.get("deletionTimestamp"):
        return "ignore"
    if not p.namespace_matches(list(patterns), str(meta.get("namespace") or "")):
        return "ignore"
    if assignment_of(obj) is None or running_here:
        return "ignore"
    status = obj.get("status") or {}
    phase = status.get("phase")
    if phase == p.SCHEDULED:
        return "claim"
    if phase == p.RUNNING and status.get("node") == node:
        return "claim"
    return "ignore"


def still_ours(obj: Mapping[str, Any], node: str, mine: Assignment) -> bool:
    """After a 409: does the fresh object still hold the assignment we are working on?"""
    now = assignment_of(obj)
    status = obj.get("status") or {}
    return (labelled_for(obj, node) and now is not None and now.uid == mine.uid
            and now.job_digest == mine.job_digest and now.attempts == mine.attempts
            and status.get("phase") == p.RUNNING and status.get("node") == node)


def claimable(obj: Mapping[str, Any], node: str, mine: Assignment) -> bool:
    """After a 409 on the claim: may we still claim it (same assignment, not yet claimed
    by us or anyone)?"""
    now = assignment_of(obj)
    status = obj.get("status") or {}
    return (labelled_for(obj, node) and now is not None and now.uid == mine.uid
            and now.job_digest == mine.job_digest and now.attempts == mine.attempts
            and (status.get("phase") == p.SCHEDULED
                 or (status.get("phase") == p.RUNNING and status.get("node") == node)))
