"""Resolving a ComputeJob's current generation: its store, its inputs, its cache key
(memoplane.cluster.resolve decides), the job manifest, and the assignment's metadata.
A cache hit is served in the same pass: key, lookup, one status write (and one metadata
patch first only when an earlier generation's assignment is to be removed).
A miss is handed to admission in memory (`Admissible`): its key is not looked up again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from memoplane.api.specs import SpecError, parse_computejob
from memoplane.canonical import canonical_json
from memoplane.cas import Hit
from memoplane.cluster import decide, propagate, resolve, schedule
from memoplane.cluster import mapping as mp
from memoplane.cluster import protocol as p
from memoplane.cluster import status as st
from memoplane.cluster.views import job
from memoplane.errors import MemoplaneError
from memoplane.jobs import Job, job_to_dict
from memoplane.keys import digest_bytes

from .caches import Target
from .context import Context
from .hits import look_up, record_hit, served
from .spotchecks import spot_check

log = logging.getLogger("memoplane.operator")


@dataclass(frozen=True)
class Admissible:
    """A job resolved in this process, as admission needs it: the body its last write
    returned, the resolved job, its cache's store locations and trust policy, and whether its
    key already missed the cache."""

    body: dict[str, Any]
    job: Job
    target: Target
    missed: bool

    @property
    def resource_version(self) -> str | None:
        return job(self.body).meta.resource_version


def resolve_job(ctx: Context, obj: dict[str, Any]) -> Admissible | None:
    """Resolve the current generation; a job that has a key and missed the cache (or was
    not looked up) is returned for admission."""
    view = job(obj)
    try:
        found = ctx.caches.store_for(obj)
        if isinstance(found, decide.Wait):
            ctx.wait(obj, found)
            return None
        runtime = schedule.runtime_for(ctx.fleet.nodes, view.spec.profile)
        outcome = resolve.resolve(obj, runtime, ctx.lookups(view.meta.namespace, found.store),
                                  datetime.now(UTC), ctx.settings.missing_grace_seconds)
    except MemoplaneError as exc:
        ctx.wait(obj, decide.Wait(p.REASON_STORE, str(exc)))
        return None
    decision = decide.after_resolution(obj, outcome)
    if isinstance(decision, decide.Wait):  # woken when an upstream settles (or at the next resync)
        ctx.wait(obj, decision)
        return None
    if isinstance(decision, decide.Fail):
        keep = propagate.kept(obj, decision.reason, decision.message)
        if keep is not None:
            _unchanged(ctx, obj, keep)
        else:
            ctx.fail(obj, decision)
        return None
    changed = None
    if propagate.held(obj):
        step = propagate.release(obj, decision.job.key, decision.input_digests)
        if isinstance(step, propagate.EarlyCutoff):
            _unchanged(ctx, obj, step, _cutoff_run(ctx, obj, decision))
            return None
        changed = step.message
    carried = _keyed(ctx, obj, decision, found)
    if changed is not None:
        ctx.event(carried.body if carried is not None else obj, p.REASON_UPSTREAM_CHANGED, changed)
    return carried


def _unchanged(ctx: Context, obj: dict[str, Any], step: propagate.EarlyCutoff,
               run: dict[str, Any] | None = None) -> None:
    """A held job Ready again with the result it had: nothing runs. `run`: the status fields of
    the cut-off run (its record's id, the upstream runs it now stands on)."""
    view = job(obj)
    done = ctx.patch(obj, {**st.early_cutoff(view.status.raw, view.meta.generation, step.message, datetime.now(UTC),
                                             step.reason), **(run or {})})
    ctx.event(done, step.reason, step.message)


def _cutoff_run(ctx: Context, obj: dict[str, Any], outcome: resolve.Resolved) -> dict[str, Any]:
    """An early cutoff is a run served from the cache: the job's own result again, now standing on
    the upstreams' new runs. Its record is appended before the status write that names it."""
    view = job(obj)
    digest, url = view.status.result_digest, view.result_store_url
    found = ctx.caches.store_for(obj)
    if not digest or not url or isinstance(found, decide.Wait):
        return {"cached": True}
    try:
        hit = Hit(outcome.job.key, digest, ctx.stores.by_url(url).get_result(digest))
    except MemoplaneError as exc:
        log.warning("%s/%s: no run record for the early cutoff: %s", *view.ref, exc)
        return {"cached": True}
    status = {**view.status.raw, "upstreams": outcome.upstreams}
    run_id = record_hit(ctx, {**obj, "status": status}, outcome.job, hit, found, (), time.time())
    return {"upstreams": outcome.upstreams, "runId": run_id, "cached": True}   # nothing ran: served


def check_inputs(ctx: Context, obj: dict[str, Any]) -> None:
    """A job that settled Ready: hold it if a fromJob input's value is no longer the one its
    key used (an upstream recomputed while it ran). Only fromJob inputs are read again: a
    settled job is final for everything else (a new runtime recomputes nothing settled)."""
    view = job(obj)
    try:
        found = ctx.caches.store_for(obj)
        if isinstance(found, decide.Wait):
            return
        spec = parse_computejob(obj).spec
        lookups = ctx.lookups(view.meta.namespace, found.store)
        created, now = resolve.parse_time(view.meta.creation_timestamp or None), datetime.now(UTC)
        digests = {}
        for item in spec.inputs:
            if item.from_job is None:
                continue
            got = resolve.resolve_input(item, view.meta.name, lookups, created, now, ctx.settings.missing_grace_seconds)
            if isinstance(got, resolve.Waiting | resolve.Failed):
                return  # an upstream not Ready holds it (propagate.hold), a missing one leaves it as it is
            digests[item.name] = got.digest
    except (MemoplaneError, SpecError):
        return  # checked again when it next settles; nothing here makes it Ready
    hold = propagate.stale_inputs(obj, digests)
    if hold is not None:
        hold_job(ctx, obj, hold)


def hold_job(ctx: Context, obj: dict[str, Any], hold: propagate.Hold) -> None:
    """Hold a settled job back while an upstream it used is recomputed: not Ready, its result kept."""
    view = job(obj)
    done = ctx.patch(obj, st.upstream_changed(view.status.raw, view.meta.generation, hold.reason, hold.message,
                                              datetime.now(UTC)))
    ctx.event(done, hold.reason, hold.message)


def _key_of(obj: dict[str, Any], job_: Job) -> str:
    """A job's key; a spec.map batch's is the digest of its elements' keys (memoplane.cluster.mapping),
    which names its flight and is never looked up: what is cached is each element's result."""
    if not mp.is_batch(obj):
        return job_.key
    over = job(obj).meta.annotations[mp.BATCH_ANNOTATION]
    return mp.batch_key(over, [j.key for j in mp.jobs_of_batch(obj, job_)])


def _keyed(ctx: Context, obj: dict[str, Any], outcome: resolve.Resolved, target: Target) -> Admissible | None:
    """Write the key (serving a hit in the same write) and hand a miss to admission."""
    view, job_ = job(obj), outcome.job
    generation, now = view.meta.generation, datetime.now(UTC)
    try:
        key = _key_of(obj, job_)
    except ValueError as exc:
        ctx.fail(obj, decide.Fail(p.REASON_INVALID, str(exc)))
        return None
    manifest = canonical_json(job_to_dict(job_))
    digest = digest_bytes(manifest)  # the manifest's blob digest, whether or not it is stored yet
    ctx.manifests.remember(digest, job_)
    batch = mp.is_batch(obj)
    looked_up = decide.looks_up(view.spec.policy, missed=False) and not batch
    store, url = target.store, target.url
    uncached = target.quota_reached if view.spec.policy != "Bypass" else None   # Bypass caches nothing anyway
    started = time.time()
    hit, ms, signers = look_up(ctx, obj, target.lookup, key, target.policy) \
        if looked_up and target.lookup is not None else (None, 0, ())
    status = view.status.raw
    if hit is not None:  # one status write; the result's store is in status.result
        unassigned = _unassigned(ctx, obj)
        run_id = record_hit(ctx, {**unassigned, "status": {**status, "upstreams": outcome.upstreams}}, job_, hit,
                            target, signers, started)
        done = ctx.patch(unassigned, st.resolved_hit(status, generation, key, outcome.input_digests,
                                                     hit.digest, hit.result, target.lookup_url, ms, now,
                                                     outcome.upstreams, run_id))
        served(ctx, done, hit, target)
        spot_check(ctx, done, hit, target)
        return None
    try:
        ctx.manifests.put(store, manifest)  # it goes to a node: the agent loads the manifest from the store
    except MemoplaneError as exc:  # e.g. credentials that may not write there (AccessDenied): say so in status
        ctx.wait(obj, decide.Wait(p.REASON_STORE, str(exc)))
        return None
    # The assignment's metadata in one patch, then the status: a crash between them
    # leaves a job whose status is of an older generation, which the next pass resolves
    # again (same digest, same key); the node label is removed, so no agent acts on it.
    tier = ctx.stores.tier_of(*p.parse_store_url(url))   # where the agent finds content moved out of `url`
    updated = ctx.patch_meta(
        obj, labels={p.KEY_LABEL: p.key_label(key), p.NODE_LABEL: None},
        annotations={p.JOB_DIGEST_ANNOTATION: digest, p.STORE_ANNOTATION: url,
                     p.JOB_GENERATION_ANNOTATION: str(generation),
                     p.CACHE_RESULT_ANNOTATION: None if uncached is None else "false"})
    updated = ctx.patch(updated, st.resolved(status, generation, key, outcome.input_digests, now,
                                             outcome.upstreams, tier))
    ctx.event(updated, p.REASON_RESOLVED, f"cache key {key[:15]}… (generation {generation})")
    if uncached is not None:
        ctx.event(updated, p.REASON_QUOTA_EXCEEDED, f"ResultCache '{view.spec.result_cache}': {uncached}",
                  warning=True)
    if target.access.why:
        ctx.event(updated, p.REASON_SHARING_DENIED, f"ResultCache '{view.spec.result_cache}': {target.access.why}",
                  warning=True)
    return Admissible(updated, job_, target, missed=looked_up or batch or target.lookup is None)


def _unassigned(ctx: Context, obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` with no assignment of an earlier generation left (a served job has none): a job
    that never went to a node is returned as it is, with no write."""
    if not job(obj).assigned.present:
        return obj
    return ctx.patch_meta(obj, labels={p.KEY_LABEL: None, p.NODE_LABEL: None},
                          annotations={name: None for name in p.ASSIGNMENT_ANNOTATIONS})
