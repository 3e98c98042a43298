"""The operator's decisions about a ComputeJob, as values (pure): what to do, not how.

The operator reads (the job, its key's jobs, the nodes, the cache), calls one of these and
applies what it returns: serve a hit, wait (and on what), re-derive the key, schedule to a
node, fail, or do nothing yet. Each decision is a function of what was read and of `now`,
so each is table-tested (tests/unit/test_cluster_decide.py) and none touches the network.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import protocol as p
from . import resolve, schedule
from .flight import leader
from .index import Topic, job_topic, key_topic
from .mapping import REASON_NAME_TAKEN, REASON_SUBTASK_FAILED, Progress
from .retry import retry_at
from .views import job


@dataclass(frozen=True)
class Wait:
    """Write Waiting with this reason and message; revisit when one of `topics` settles."""

    reason: str
    message: str
    topics: tuple[Topic, ...] = ()


@dataclass(frozen=True)
class Fail:
    reason: str
    message: str
    extra: Mapping[str, Any] = field(default_factory=dict)   # more status fields (a map's counts)


@dataclass(frozen=True)
class Rederive:
    """The key was derived for a runtime the agents no longer run: Pending, resolved again."""

    reason: str
    message: str


@dataclass(frozen=True)
class Schedule:
    node: str
    attempts: int
    reason: str
    message: str


@dataclass(frozen=True)
class Later:
    """Nothing to write now (backing off, or nothing changed): a later pass decides again."""


@dataclass(frozen=True)
class Reassign:
    """The job's node is gone: back to Pending with this message, then admitted again."""

    what: str
    attempts: int


# -- resolution ------------------------------------------------------------------------------


def after_resolution(obj: Mapping[str, Any], outcome: resolve.Resolution) -> resolve.Resolved | Wait | Fail:
    """A resolution that did not produce a job: wait (for the upstreams it names) or fail."""
    if isinstance(outcome, resolve.Waiting):
        topics = tuple(job_topic(*up) for up in resolve.upstream_refs(obj))
        return Wait(outcome.reason, outcome.message, topics)
    if isinstance(outcome, resolve.Failed):
        return Fail(outcome.reason, outcome.message)
    return outcome


def looks_up(policy: str, missed: bool) -> bool:
    """Look the key up in the cache: policy Use, unless this state already missed it."""
    return policy == "Use" and not missed


# -- admission -------------------------------------------------------------------------------


def backing_off(obj: Mapping[str, Any], now: datetime, base: float) -> bool:
    not_before = retry_at(job(obj).status.raw, base=base)
    return not_before is not None and now < not_before


def follow(obj: Mapping[str, Any], group: Iterable[Mapping[str, Any]]) -> Wait | None:
    """Single flight: wait for the job computing the same key, unless this one leads.
    `group`: the jobs listed with its key label."""
    view = job(obj)
    lead = leader(obj, group)
    if job(lead).meta.uid == view.meta.uid:
        return None
    return Wait(p.REASON_IN_FLIGHT, f"waiting for ComputeJob '{job(lead).meta.name}', which computes the same key",
                (key_topic(view.meta.namespace, str(view.status.cache_key)),))


def place(obj: Mapping[str, Any], nodes: Sequence[schedule.NodeView], load: Mapping[str, int], profile: str,
          runtime: str, exclude: frozenset[str] = frozenset()) -> Wait | Rederive | Schedule:
    """A job that leads its key's flight: have its key derived again for the runtime the
    agents now run, wait for a node, or go to one. `profile`, `runtime`: its manifest's;
    `exclude`: nodes it must not run on (a replica's siblings')."""
    view = job(obj)
    current = schedule.runtime_for(nodes, profile)
    if current is not None and current != runtime:
        return Rederive(p.REASON_RUNTIME_MISMATCH, f"agents now run profile '{profile}' as {current[:15]}…")
    node = schedule.pick_node(nodes, profile, runtime, load, avoid=view.assigned.node, exclude=exclude)
    if node is None and exclude:
        return Wait(p.REASON_NO_NODE, f"no live agent serves profile '{profile}' at runtime {runtime[:15]}… "
                                      f"on a node other than its sibling replicas' ({', '.join(sorted(exclude))})")
    if node is None:
        return Wait(p.REASON_NO_NODE, f"no live agent serves profile '{profile}' at runtime {runtime[:15]}…")
    attempts = view.status.attempts + 1
    reason = p.REASON_SCHEDULED if attempts == 1 else p.REASON_RESCHEDULED
    return Schedule(node, attempts, reason, f"assigned to node {node} (attempt {attempts})")


def check_node(obj: Mapping[str, Any], nodes: Sequence[schedule.NodeView]) -> Later | Fail | Reassign:
    """A Scheduled or Running job: keep it while its node holds a live lease; else reassign
    it, or fail it past its backoff limit."""
    lost = schedule.lost(obj, nodes)
    if lost is None:
        return Later()
    if lost.exhausted:
        return Fail(p.REASON_BACKOFF_LIMIT,
                    f"{lost.what} during attempt {lost.attempts}; backoffLimit {lost.backoff_limit} reached")
    return Reassign(lost.what, lost.attempts)


# -- the default ResultCache --------------------------------------------------------------


@dataclass(frozen=True)
class CreateDefault:
    """The namespace's default ResultCache does not exist yet: create it."""

    namespace: str


def missing_cache(namespace: str, name: str) -> CreateDefault | Wait:
    if name == p.DEFAULT_RESULT_CACHE:
        return CreateDefault(namespace)
    return Wait(p.REASON_NO_CACHE, f"ResultCache '{name}' does not exist in namespace {namespace}: create it")


def default_cache(namespace: str) -> dict[str, Any]:
    """The body of a namespace's default ResultCache."""
    return {"apiVersion": p.API_VERSION, "kind": "ResultCache",
            "metadata": {"name": p.DEFAULT_RESULT_CACHE, "namespace": namespace,
                         "labels": {"app.kubernetes.io/managed-by": p.OPERATOR_COMPONENT}},
            "spec": {"store": {"bucket": p.DEFAULT_BUCKET, "prefix": p.default_store_prefix(namespace)}}}


# -- spec.map parents ----------------------------------------------------------------------


@dataclass(frozen=True)
class Progressing:
    """Sub-tasks under way: write the progress (when it changed), revisit as they settle."""

    write: bool
    topics: tuple[Topic, ...]


@dataclass(frozen=True)
class Finish:
    """Every sub-task succeeded: store their values as the parent's result."""


def name_taken(parent: str, taken: Sequence[str]) -> Fail | None:
    if not taken:
        return None
    return Fail(REASON_NAME_TAKEN, f"ComputeJob '{taken[0]}' exists and is not a sub-task of '{parent}': "
                                   "rename one of them")


def map_step(obj: Mapping[str, Any], prog: Progress, children: Mapping[str, Mapping[str, Any]],
             running: Sequence[str] = ()) -> Fail | Progressing | Finish:
    """What a map parent does with its sub-tasks' progress (`children`: its batches by
    name; `running`: the unfinished ones, whose settling wakes it)."""
    view = job(obj)
    if prog.failed:
        index, child_name = prog.first_failure or (0, "")
        child = children.get(child_name)
        why, detail = job(child).status.failure_summary() if child is not None else ("failed", "")
        return Fail(REASON_SUBTASK_FAILED, f"element {index} (batch ComputeJob '{child_name}') failed ({why})"
                    + (f": {detail}" if detail else ""), {"map": prog.counts()})
    if not prog.done:
        status = view.status
        changed = status.map != prog.counts() or status.phase != p.RUNNING or \
            status.observed_generation != view.meta.generation
        return Progressing(changed, tuple(job_topic(view.meta.namespace, c) for c in running))
    return Finish()
