"""Admitting a resolved ComputeJob: serve it from the cache, let it wait for the job
computing the same key (single flight), or schedule it to a node; and reschedule a started
job whose node was lost. memoplane.cluster.decide decides; this module reads and applies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from memoplane.cluster import decide
from memoplane.cluster import mapping as mp
from memoplane.cluster import protocol as p
from memoplane.cluster import status as st
from memoplane.cluster.views import job
from memoplane.jobs import Job

from .caches import Target
from .context import Context
from .hits import look_up, record_hit, served
from .replicas import exclude_for
from .resolution import Admissible
from .spotchecks import spot_check

log = logging.getLogger("memoplane.operator")


def admit(ctx: Context, obj: dict[str, Any], carried: Admissible | None = None) -> None:
    """Serve from the cache, wait for the job computing the same key, or schedule.
    `carried`: what resolving this very state found (its key missed the cache)."""
    if decide.backing_off(obj, datetime.now(UTC), ctx.settings.backoff_base):
        return  # a later resync schedules it
    view = job(obj)
    namespace, key = view.meta.namespace, str(view.status.cache_key)
    target = carried.target if carried is not None else ctx.caches.store_for(obj)
    if isinstance(target, decide.Wait):  # the cache's trusted keys cannot be read: serve nothing
        ctx.wait(obj, target)
        return
    if carried is None and view.assigned.store_url not in (None, target.url):
        # Sharing changed since it was resolved: its manifest and inputs go where it may write now.
        ctx.patch(obj, st.pending(view.status.raw, view.meta.generation, p.REASON_STORE_CHANGED,
                                  f"its results now go to {target.url}: resolving again", datetime.now(UTC)))
        return
    missed, memo = carried is not None and carried.missed, ctx.memo
    if target.lookup is not None and not mp.is_batch(obj) and decide.looks_up(   # a batch's key has no ref
            view.spec.policy, missed or bool(memo and (target.lookup_url, key) in memo.misses)):
        # A stored result is served whoever else computes the key: no flight to consult.
        if _serve(ctx, obj, key, target, carried.job if carried is not None else None):
            return
        if memo:
            memo.misses.add((target.lookup_url, key))
    waiting = decide.follow(obj, _group(ctx, namespace, key))
    if waiting is not None:  # woken when the leader settles
        ctx.wait(obj, waiting)
        return
    resolved = carried.job if carried is not None else ctx.manifests.job_of(obj, target.store)
    decision = decide.place(obj, ctx.fleet.nodes, ctx.fleet.load, resolved.profile, str(resolved.runtime),
                            exclude_for(ctx, obj))
    if isinstance(decision, decide.Wait):
        ctx.wait(obj, decision)
    elif isinstance(decision, decide.Rederive):
        ctx.patch(obj, st.pending(view.status.raw, view.meta.generation, decision.reason, decision.message,
                                  datetime.now(UTC)))
    else:
        _schedule(ctx, obj, decision, target, resolved)


def _serve(ctx: Context, obj: Mapping[str, Any], key: str, target: Target, resolved: Job | None) -> bool:
    assert target.lookup is not None
    started = time.time()
    hit, ms, signers = look_up(ctx, obj, target.lookup, key, target.policy)
    if hit is None:
        return False
    view = job(obj)
    run_id = record_hit(ctx, obj, resolved, hit, target, signers, started)
    done = ctx.patch(obj, st.cache_hit(view.status.raw, view.meta.generation, hit.digest, hit.result,
                                       target.lookup_url, ms, datetime.now(UTC), run_id=run_id))
    served(ctx, done, hit, target)
    spot_check(ctx, done, hit, target)
    return True


def _group(ctx: Context, namespace: str, key: str) -> list[dict[str, Any]]:
    """The jobs listed with the key's label (shared by the decisions of a resync pass)."""
    memo = ctx.memo
    group = memo.groups.get((namespace, key)) if memo else None
    if group is None:
        group, _ = ctx.kube.list(p.COMPUTEJOBS, namespace, f"{p.KEY_LABEL}={p.key_label(key)}")
        if memo:
            memo.groups[(namespace, key)] = group
    return group


def _schedule(ctx: Context, obj: dict[str, Any], decision: decide.Schedule, target: Target, resolved: Job) -> None:
    view = job(obj)
    namespace, now = view.meta.namespace, datetime.now(UTC)
    # Re-put the manifest (refreshes its age): a job that waited long must not find it collected.
    ctx.manifests.refresh(target.store, obj, resolved)
    message = f"{decision.message}; {target.access.why}" if target.access.why else decision.message
    if ctx.memo:
        ctx.memo.groups.pop((namespace, str(view.status.cache_key)), None)  # the flight has a started job now
    labelled = ctx.patch_meta(obj, labels={p.NODE_LABEL: decision.node})
    done = ctx.patch(labelled, st.scheduled(view.status.raw, view.meta.generation, decision.node, decision.attempts,
                                            now, reason=decision.reason, message=message))
    ctx.fleet.load[decision.node] += 1
    ctx.metrics.cache_misses.inc()
    ctx.caches.count_miss(namespace, view.spec.result_cache)
    ctx.event(done, p.REASON_SCHEDULED, message)
    log.info("%s/%s: key %s -> node %s (attempt %d)", namespace, view.meta.name, str(view.status.cache_key)[3:15],
             decision.node, decision.attempts)


def check_node(ctx: Context, obj: dict[str, Any]) -> None:
    """A Scheduled or Running job whose node lost its lease: reschedule it, or fail it past
    its backoff limit."""
    decision = decide.check_node(obj, ctx.fleet.nodes)
    if isinstance(decision, decide.Later):
        return
    ctx.metrics.reassigned.inc()
    if isinstance(decision, decide.Fail):
        ctx.fail(obj, decision)
        return
    view = job(obj)
    updated = ctx.patch(obj, st.pending(view.status.raw, view.meta.generation, p.REASON_REASSIGNED,
                                        f"{decision.what} (attempt {decision.attempts}): rescheduling",
                                        datetime.now(UTC)))
    ctx.event(updated, p.REASON_REASSIGNED, f"{decision.what}: rescheduling", warning=True)
    admit(ctx, updated)
