"""spec.verify.replicas parents on the reconciler's worker (decisions: memoplane.cluster.replicas).

A parent resolves its key and is served from the cache only if the stored result is attested
by `replicas` distinct nodes; otherwise it keeps one replica ComputeJob per index (ordinary
jobs, cache policy Bypass, each admitted away from its siblings' nodes: `exclude_for`) and,
when all succeeded, either points the ref at their common result listing every replica's
attestation (Ready) or is Disputed with what differs (never Ready, nothing cached).
Everything is read afresh from the API server and the store on each pass, so a restarted
operator continues where the objects say.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from memoplane.cas import ResultManifest, Store
from memoplane.cas import audit as audit_log
from memoplane.cas.digests import b3
from memoplane.cluster import decide, lineage, resolve, schedule
from memoplane.cluster import protocol as p
from memoplane.cluster import replicas as rp
from memoplane.cluster import spotcheck as sc
from memoplane.cluster import status as st
from memoplane.cluster.index import job_topic
from memoplane.cluster.propagate import held
from memoplane.cluster.views import job
from memoplane.errors import MemoplaneError, NotFound, StoreCorrupted
from memoplane.history import build as history
from memoplane.history import events, new_run_id
from memoplane.trust import judge, trusted_hit

from .caches import Target
from .context import Context
from .hits import record_hit, served

log = logging.getLogger("memoplane.operator.replicas")

def exclude_for(ctx: Context, obj: Mapping[str, Any]) -> frozenset[str]:
    """The nodes a job must not be placed on: for a replica, its siblings' (read afresh); for a
    spot check, the nodes that attest the result it checks."""
    if not rp.is_replica(obj):
        return frozenset()
    namespace = job(obj).meta.namespace
    siblings = [ctx.kube.get(p.COMPUTEJOBS, namespace, name) for name in rp.sibling_names(obj)]
    return rp.taken_nodes(obj, [s for s in siblings if s is not None and rp.owned_by(s, _parent_ref(obj))]) \
        | sc.avoided(obj)


def _parent_ref(replica: Mapping[str, Any]) -> dict[str, Any]:
    return {"metadata": {"uid": job(replica).meta.labels.get(rp.PARENT_LABEL)}}


def reconcile_replicated(ctx: Context, obj: dict[str, Any]) -> None:
    found = ctx.caches.store_for(obj)  # the store and the job's cache's trust policy
    if isinstance(found, decide.Wait):
        ctx.wait(obj, found)
        return
    store = found.store
    if not _resolved(obj):
        updated = _resolve(ctx, obj, found)
        if updated is None:
            return
        obj = updated
    if ctx.memo is not None and _replicas_open(ctx, obj):
        return  # a resync pass: the parent is woken when a replica settles, and reads them then
    children = _replicas(ctx, obj)
    decision = rp.step(obj, children)
    if isinstance(decision, rp.Missing):
        _progress(ctx, obj, decision, children)
    elif isinstance(decision, rp.ReplicaFailed):
        outcomes = [rp.outcome_of(c).to_status() for c in children.values()]
        ctx.fail(obj, decide.Fail(rp.REASON_REPLICA_FAILED, f"replica {decision.name} failed ({decision.reason})"
                                  + (f": {decision.message}" if decision.message else ""),
                                  {"verify": {"replicas": outcomes, "agreed": None, "difference": None}}))
    elif isinstance(decision, rp.Agreed):
        _agreed(ctx, obj, decision, found, children)
    else:
        _disputed(ctx, obj, decision, store)


def _replicas(ctx: Context, obj: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The parent's replicas by name, each read by name (k reads, no list of the namespace)."""
    view = job(obj)
    found = {}
    for index in range(rp.replicas_of(obj)):
        name = rp.child_name(view.meta.name, index)
        child = ctx.kube.get(p.COMPUTEJOBS, view.meta.namespace, name)
        if child is not None and rp.owned_by(child, obj):
            found[name] = child
    return found


def _replicas_open(ctx: Context, obj: Mapping[str, Any]) -> bool:
    """Some replica of the current spec is unfinished, as the operator's index knows it."""
    view = job(obj)
    with ctx.lock:
        bodies = [ctx.index.open.get((view.meta.namespace, rp.child_name(view.meta.name, i)))
                  for i in range(rp.replicas_of(obj))]
    return any(b is not None and rp.owned_by(b, obj) and rp.current(b, obj) for b in bodies)


def _resolved(obj: Mapping[str, Any]) -> bool:
    status = job(obj).status
    return status.cache_key is not None and status.observed_generation == job(obj).meta.generation \
        and not held(obj)  # held: an upstream was recomputed, the key is derived again


def _resolve(ctx: Context, obj: dict[str, Any], target: Target) -> dict[str, Any] | None:
    """The key for the current generation, served at once when `replicas` nodes already
    attest its stored result (where its namespace may read); the updated parent otherwise
    (None: waiting, failed or served)."""
    view, store, policy, lookup = job(obj), target.store, target.policy, target.lookup
    runtime = schedule.runtime_for(ctx.fleet.nodes, view.spec.profile)
    try:
        outcome = resolve.resolve(obj, runtime, ctx.lookups(view.meta.namespace, store),
                                  datetime.now(UTC), ctx.settings.missing_grace_seconds)
    except MemoplaneError as exc:
        ctx.wait(obj, decide.Wait(p.REASON_STORE, str(exc)))
        return None
    decision = decide.after_resolution(obj, outcome)
    if isinstance(decision, decide.Wait):
        ctx.wait(obj, decision)
        return None
    if isinstance(decision, decide.Fail):
        ctx.fail(obj, decision)
        return None
    key, now, generation = decision.job.key, datetime.now(UTC), view.meta.generation
    if lookup is not None and decide.looks_up(view.spec.policy, missed=False):
        started = time.time()
        found = trusted_hit(lookup, key, policy)
        hit = found.hit
        if hit is not None and found.verdict is not None and rp.enough_nodes(
                policy, key, hit.digest, lookup.attestations(key, hit.digest), rp.replicas_of(obj)):
            seen = {**obj, "status": {**view.status.raw, "upstreams": decision.upstreams}}
            run_id = record_hit(ctx, seen, decision.job, hit, target, found.verdict.signers, started)
            done = ctx.patch(obj, st.resolved_hit(view.status.raw, generation, key, decision.input_digests, hit.digest,
                                                  hit.result, target.lookup_url, 0, now, decision.upstreams, run_id))
            served(ctx, done, hit, target)
            return None
    first = st.resolved(view.status.raw, generation, key, decision.input_digests, now, decision.upstreams)
    return ctx.patch(obj, {**first, **st.replicating(first, generation, key, 0, rp.replicas_of(obj), [], now,
                                                     rp.REASON_REPLICATING, rp.REASON_DISPUTED)})


def _progress(ctx: Context, obj: dict[str, Any], missing: rp.Missing, children: dict[str, dict[str, Any]]) -> None:
    view = job(obj)
    namespace = view.meta.namespace
    if missing.create:
        problem = rp.nodes_problem(rp.replicas_of(obj), ctx.fleet.nodes, view.spec.profile,
                                   schedule.runtime_for(ctx.fleet.nodes, view.spec.profile))
        if problem is not None and not children:  # none started yet: wait for enough nodes
            ctx.wait(obj, decide.Wait(rp.REASON_TOO_FEW_NODES, problem))
            return
    # Registered before the writes: a replica that settles at once wakes the parent.
    names = [m["metadata"]["name"] for m in missing.create + missing.update] + missing.waiting_on
    ctx.wait_on(obj, [job_topic(namespace, n) for n in names])
    for manifest in missing.create:
        if ctx.kube.create(p.COMPUTEJOBS, namespace, manifest) is None:
            other = ctx.kube.get(p.COMPUTEJOBS, namespace, manifest["metadata"]["name"])
            if other is not None and not rp.owned_by(other, obj):
                ctx.fail(obj, decide.Fail(rp.REASON_NAME_TAKEN, f"ComputeJob '{manifest['metadata']['name']}' "
                                                                f"exists and is not a replica of '{view.meta.name}': "
                                                                "rename one of them"))
                return
    for manifest in missing.update:  # the parent's spec changed: so does each replica's
        rewrite = [{"op": "replace", "path": "/spec", "value": manifest["spec"]},
                   {"op": "add", "path": "/metadata/annotations/" + rp.SPEC_ANNOTATION.replace("/", "~1"),
                    "value": manifest["metadata"]["annotations"][rp.SPEC_ANNOTATION]}]
        ctx.kube.json_patch(p.COMPUTEJOBS, namespace, manifest["metadata"]["name"], rewrite)
    done = missing.done
    patch = st.replicating(view.status.raw, view.meta.generation, view.status.cache_key, len(done),
                           rp.replicas_of(obj), rp.nodes_of(done), datetime.now(UTC), rp.REASON_REPLICATING,
                           rp.REASON_DISPUTED)
    if (view.status.phase, view.status.message) != (patch["phase"], patch["message"]):
        ctx.patch(obj, patch)


def _agreed(ctx: Context, obj: dict[str, Any], agreed: rp.Agreed, target: Target,
            children: Mapping[str, Mapping[str, Any]]) -> None:
    """Every replica returned the same result: it is the job's only if each node attests it."""
    view, store, url, policy = job(obj), target.store, target.url, target.policy
    envelopes = store.attestations(agreed.key, agreed.digest)
    missing = rp.unattested(agreed, rp.attesting_nodes(policy, agreed.key, agreed.digest, envelopes))
    outcomes = [o.to_status() for o in agreed.outcomes]
    if missing:
        ctx.fail(obj, decide.Fail(rp.REASON_UNATTESTED, f"replicas agree on {agreed.digest} but no trusted "
                                                        f"attestation of it from {', '.join(missing)}: not cached",
                                  {"verify": {"replicas": outcomes, "agreed": True, "difference": None}}))
        return
    one = dataclasses.replace(policy, min_signatures=1)
    verdicts = [(e, judge(one, agreed.key, agreed.digest, [e])) for e in envelopes]
    listed = [b3(e) for e, verdict in verdicts if verdict.trusted]
    signers = tuple(dict.fromkeys(s for _, verdict in verdicts if verdict.trusted for s in verdict.signers))
    try:
        result = store.get_result(agreed.digest)
        store.set_ref(agreed.key, agreed.digest, attestations=listed)
    except (NotFound, StoreCorrupted) as exc:
        ctx.fail(obj, decide.Fail(p.REASON_STORE, f"the agreed result {agreed.digest} cannot be read: {exc}"))
        return
    run_id = _record_agreed(ctx, obj, agreed, result, target, children, signers)
    done = ctx.patch(obj, st.replicas_agreed(view.status.raw, view.meta.generation, agreed.key, agreed.digest, result,
                                             url, outcomes, datetime.now(UTC), rp.REASON_AGREED, rp.REASON_DISPUTED,
                                             run_id))
    ctx.metrics.jobs.labels("computed").inc()
    ctx.event(done, rp.REASON_AGREED, f"{len(outcomes)} replicas on {', '.join(rp.nodes_of(agreed.outcomes))} "
                                      f"returned {agreed.digest[:15]}…: cached")


def _record_agreed(ctx: Context, obj: Mapping[str, Any], agreed: rp.Agreed, result: ResultManifest, target: Target,
                   children: Mapping[str, Mapping[str, Any]], signers: tuple[str, ...]) -> str | None:
    """The parent's run: the agreed result, computed on every replica's node and attested by their
    keys (the replicas themselves are Bypass runs with no record of their own). Its job is a
    replica's manifest (the same key). The run id, None when not kept."""
    try:
        resolved = ctx.manifests.job_of(next(iter(children.values())), target.store)
    except (MemoplaneError, ValueError, KeyError, StopIteration) as exc:
        log.warning("%s/%s: no run record for the agreed result: %s", *job(obj).ref, exc)
        return None
    provenance, run_id = result.provenance, new_run_id()
    record = lineage.job_record(
        obj, resolved, run_id=run_id, result=agreed.digest, result_size=result.logical_size,
        node=",".join(rp.nodes_of(agreed.outcomes)), signer=",".join(signers) or None,
        started=provenance.started_at, ended=time.time(), cached=False, compute_seconds=provenance.duration_s,
        store=target.store)
    kept = history.append(target.store, record)
    events.run_settled(record, start=True)
    return run_id if kept else None


def outputs_of(store: Store, digest: str) -> rp.Outputs:
    """A replica's result, loaded (each read verified) for the dispute's difference."""
    result = store.get_result(digest)
    tree = store.get_tree(result.output_tree.digest) if result.output_tree else None
    files = {path: entry.digest for path, entry in tree.entries.items()} if tree else {}
    return rp.Outputs(result.value.kind, store.load_value(result.value), files,
                      store.get_bytes(result.stdout.digest), store.get_bytes(result.stderr.digest), result.meta)


def _disputed(ctx: Context, obj: dict[str, Any], disagreed: rp.Disagreed, store: Store) -> None:
    view = job(obj)
    x, y = disagreed.pair
    try:
        lines = rp.difference(outputs_of(store, str(x.digest)), outputs_of(store, str(y.digest)),
                              (str(x.node), str(y.node)))
    except (MemoplaneError, ValueError) as exc:
        lines = [f"(the results could not be compared: {exc})"]
    message = rp.dispute_message(disagreed, lines)
    outcomes = [o.to_status() for o in disagreed.outcomes]
    done = ctx.patch(obj, st.disputed(view.status.raw, view.meta.generation, x.key, outcomes, "; ".join(lines),
                                      message, datetime.now(UTC), rp.REASON_DISPUTED))
    ctx.metrics.jobs.labels("failed").inc()
    store.audit(audit_log.DISPUTE, job=f"{view.meta.namespace}/{view.meta.name}", key=x.key,
                results={str(o.node): o.digest for o in disagreed.outcomes}, difference=lines[:8])
    ctx.event(done, rp.REASON_DISPUTED, message, warning=True)
    log.warning("%s/%s: %s", view.meta.namespace, view.meta.name, message)
