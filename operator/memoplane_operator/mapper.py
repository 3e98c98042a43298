"""spec.map parents on the reconciler's worker (memoplane.cluster.mapping decides): derive
every element's key from the parent's spec resolved once, serve the cached ones with no
object (each drawn for a spot check as a plain hit is: spotchecks.py), send the missed ones
to the agents in batches (a few child ComputeJobs), report the counts, and when every element
has a result store the list of their values as the parent's result.

A pass lists the parent's batches by label (n / batch size objects) and looks up only the
keys it has not seen before (MapMemory, by parent uid); a restarted operator looks them up
again and continues where the objects say. The parent waits on its unfinished batches
(woken when one settles) and is revisited by the resync.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from memoplane.api.computejob import MAX_MAP_BATCH
from memoplane.api.computejob import Input as SpecInput
from memoplane.cas import BlobRef, Hit, Provenance, ResultManifest, Store
from memoplane.cluster import decide, lineage, resolve, schedule
from memoplane.cluster import mapping as mp
from memoplane.cluster import protocol as p
from memoplane.cluster import status as st
from memoplane.cluster.index import job_topic
from memoplane.cluster.views import job
from memoplane.errors import MemoplaneError
from memoplane.history import InputRecord, RunRecord, events, new_run_id
from memoplane.history import build as history
from memoplane.jobs import JsonInput
from memoplane.trust.attestation import attest

from .caches import Target
from .context import Context, MapMemory
from .hits import look_up
from .spotchecks import spot_check_element

log = logging.getLogger("memoplane.operator.map")


def elements(ctx: Context, obj: dict[str, Any], store: Store) -> list[Any] | resolve.Waiting | resolve.Failed:
    """The `over` input's list: a value, or an upstream job's JSON result."""
    view = job(obj)
    namespace, name = view.ref
    over = mp.over_of(obj)
    raw = mp.over_input(obj)
    if raw is None:
        return resolve.Failed(p.REASON_INVALID, f"spec.map.over: '{over}' is not the name of an input")
    try:
        item = SpecInput.model_validate(raw)
    except ValueError as exc:
        return resolve.Failed(p.REASON_INVALID, f"spec.inputs '{over}': {exc}")
    if item.from_job is None and "value" not in item.sources():
        return resolve.Failed(p.REASON_INVALID, f"spec.map.over: input '{over}' must be a value or fromJob "
                                                "(a JSON list)")
    created = resolve.parse_time(view.meta.creation_timestamp or None)
    got = resolve.resolve_input(item, name, ctx.lookups(namespace, store), created,
                                datetime.now(UTC), ctx.settings.missing_grace_seconds)
    if isinstance(got, resolve.Waiting | resolve.Failed):
        return got
    if not isinstance(got, JsonInput):
        return resolve.Failed(p.REASON_INVALID, f"spec.map.over: input '{over}' is not JSON: map over a JSON list")
    problem = mp.elements_problem(got.value, over)
    return resolve.Failed(p.REASON_INVALID, problem) if problem else list(got.value)


def element_keys(ctx: Context, obj: dict[str, Any], store: Store
                 ) -> mp.ElementKeys | resolve.Waiting | resolve.Failed:
    """The parent's spec resolved once, over a placeholder element: what every element's key
    is derived from (the runtime the live agents advertise, every other input resolved)."""
    view = job(obj)
    runtime = schedule.runtime_for(ctx.fleet.nodes, view.spec.profile)
    got = resolve.resolve(mp.template_object(obj), runtime, ctx.lookups(view.meta.namespace, store),
                          datetime.now(UTC), ctx.settings.missing_grace_seconds)
    return mp.ElementKeys(got.job, mp.over_of(obj)) if isinstance(got, resolve.Resolved) else got


def _stop(ctx: Context, obj: dict[str, Any], outcome: resolve.Waiting | resolve.Failed) -> None:
    decision = decide.after_resolution(obj, outcome)
    if isinstance(decision, decide.Wait):
        ctx.wait(obj, decision)
    elif isinstance(decision, decide.Fail):
        ctx.fail(obj, decision)


def reconcile_map(ctx: Context, obj: dict[str, Any]) -> None:
    view = job(obj)
    namespace = view.meta.namespace
    found = ctx.caches.store_for(obj)
    if isinstance(found, decide.Wait):
        ctx.wait(obj, found)
        return
    items = elements(ctx, obj, found.store)
    if not isinstance(items, list):
        _stop(ctx, obj, items)
        return
    keyer = element_keys(ctx, obj, found.store)
    if not isinstance(keyer, mp.ElementKeys):
        _stop(ctx, obj, keyer)
        return
    keys = [keyer.key(e) for e in items]
    wanted = dict(zip(keys, items, strict=True))   # distinct keys, first element of each, in element order
    memory = _memory(ctx, obj, found)
    memory.keep_only(wanted)
    listed, _ = ctx.kube.list(p.COMPUTEJOBS, namespace, f"{mp.PARENT_LABEL}={view.meta.uid}")
    children = {job(c).meta.name: c for c in listed if mp.is_batch(c)}
    batches = [mp.batch_view(c, mp.over_of(obj)) for c in children.values()]
    known = _known(ctx, obj, found, wanted, batches, children, memory)
    dispatched = dispatch(ctx, obj, wanted, known, batches, children, mp.batch_manifest)
    if dispatched is None:
        return
    todo, running = dispatched
    prog = mp.progress(keys, known, todo, len(children))
    step = decide.map_step(obj, prog, children, running)
    if isinstance(step, decide.Fail):
        ctx.maps.pop(view.meta.uid, None)
        ctx.fail(obj, step)
    elif isinstance(step, decide.Progressing):
        if step.write:
            ctx.patch(obj, st.map_progress(view.status.raw, view.meta.generation, prog.counts(), datetime.now(UTC)))
    else:
        finish(ctx, obj, found, items, keys, known, memory, prog, sorted(children))


def dispatch(ctx: Context, obj: dict[str, Any], wanted: Mapping[str, Any], known: Mapping[str, mp.Known],
             batches: list[mp.Batch], children: dict[str, dict[str, Any]],
             manifest: Callable[[Mapping[str, Any], list[Any], list[str]], dict[str, Any]]
             ) -> tuple[mp.Plan, list[str]] | None:
    """Plan the parent's batches for what is not known yet, create the new ones (`manifest` makes
    each) and delete those no wanted key needs; the plan and the unfinished batches' names, None if
    the parent failed (a batch name held by a job that is not its own)."""
    view = job(obj)
    namespace, name = view.ref
    slots = sum(n.capacity for n in schedule.live_nodes(ctx.fleet.nodes) if view.spec.profile in n.profiles)
    todo = mp.plan(wanted, known, batches, min(ctx.settings.map_batch_size, MAX_MAP_BATCH), slots)
    made = [manifest(obj, elems, ks) for elems, ks in todo.create]
    # Registered before the writes: a batch that settles at once wakes the parent.
    running = sorted({*todo.running.values(), *(m["metadata"]["name"] for m in made)})
    ctx.wait_on(obj, [job_topic(namespace, n) for n in running])
    taken = decide.name_taken(name, _create(ctx, obj, made, children))
    if taken is not None:
        ctx.fail(obj, taken)
        return None
    for gone in todo.delete:  # no element needs it any more (the results it made stay in the cache)
        ctx.kube.delete(p.COMPUTEJOBS, namespace, gone)
        children.pop(gone, None)
    return todo, running


def _memory(ctx: Context, obj: Mapping[str, Any], target: Target) -> MapMemory:
    """This parent's memory, forgotten when its hits would be judged by another store or policy."""
    uid, source = job(obj).meta.uid, (target.lookup_url, target.policy)
    memory = ctx.maps.get(uid)
    if memory is None or memory.source != source:
        memory = ctx.maps[uid] = MapMemory(source)
    return memory


def _known(ctx: Context, obj: dict[str, Any], target: Target, wanted: Mapping[str, Any], batches: list[mp.Batch],
           children: Mapping[str, Mapping[str, Any]], memory: MapMemory) -> dict[str, mp.Known]:
    """The wanted keys whose result is known: remembered, reported by a batch, or a hit found
    now (the keys in no unfinished or failed batch are looked up)."""
    known: dict[str, mp.Known] = dict(memory.known)
    for batch in batches:
        known.update(mp.batch_results(batch, job(children[batch.name]).assigned.store_url or target.url))
    in_batches = {k for b in batches if b.phase != p.SUCCEEDED for k in b.keys}
    _look_up(ctx, obj, target, {k: e for k, e in wanted.items() if k not in known and k not in in_batches}, memory,
             known)
    return known


def _look_up(ctx: Context, obj: dict[str, Any], target: Target, todo: Mapping[str, Any], memory: MapMemory,
             known: dict[str, mp.Known]) -> None:
    """Look `todo`'s keys up in the cache under its trust policy (in parallel); remember the hits
    (each drawn for a spot check as a plain hit is)."""
    if not todo or target.lookup is None or not decide.looks_up(job(obj).spec.policy, missed=False):
        return
    lookup, started = target.lookup, time.monotonic()

    def served(key: str) -> Hit | None:
        hit = look_up(ctx, obj, lookup, key, target.policy)[0]
        if hit is not None:
            spot_check_element(ctx, obj, todo[key], hit, target)
        return hit

    keys = list(todo)
    with ThreadPoolExecutor(max_workers=max(1, ctx.settings.map_lookup_threads), thread_name_prefix="map") as pool:
        found = list(pool.map(served, keys))
    view = job(obj)
    for hit in found:
        if hit is None:
            continue
        saved = float(hit.result.provenance.duration_s)
        memory.known[hit.key] = known[hit.key] = mp.Known(hit.digest, target.lookup_url, cached=True, seconds=saved)
        memory.manifests[hit.digest] = hit.result
        ctx.metrics.cache_hits.inc()
        ctx.metrics.seconds_saved.inc(saved)
        ctx.caches.count_hit(view.meta.namespace, view.spec.result_cache, saved)
    log.info("%s/%s: looked up %d element keys in %.2fs, %d hits", *view.ref, len(keys), time.monotonic() - started,
             sum(h is not None for h in found))


def _create(ctx: Context, obj: Mapping[str, Any], made: list[dict[str, Any]],
            children: dict[str, dict[str, Any]]) -> list[str]:
    """Create the new batches; the names held by jobs that are not ours."""
    namespace, taken = job(obj).meta.namespace, []
    for manifest in made:
        child = ctx.kube.create(p.COMPUTEJOBS, namespace, manifest)
        if child is None:  # the name exists: ours from an earlier pass, or someone else's
            other = ctx.kube.get(p.COMPUTEJOBS, namespace, manifest["metadata"]["name"])
            if other is not None and not mp.owned_by(other, obj):
                taken.append(manifest["metadata"]["name"])
            elif other is not None:
                children[job(other).meta.name] = other
            continue
        children[job(child).meta.name] = child
    return taken


def _values(ctx: Context, keys: list[str], known: Mapping[str, mp.Known], memory: MapMemory) -> list[Any]:
    """Each element's JSON value, from its (verified) result manifest; the manifests not in
    memory are read in parallel."""
    distinct = {k: known[k] for k in dict.fromkeys(keys)}
    unread = sorted({(r.digest, r.store) for r in distinct.values() if r.digest not in memory.manifests})

    def read(item: tuple[str, str]) -> ResultManifest:
        return ctx.stores.by_url(item[1]).get_result(item[0])

    with ThreadPoolExecutor(max_workers=max(1, ctx.settings.map_lookup_threads), thread_name_prefix="map") as pool:
        memory.manifests.update(zip((d for d, _ in unread), pool.map(read, unread), strict=True))
    values: dict[str, Any] = {}
    for key, result in distinct.items():
        manifest = memory.manifests[result.digest]
        if manifest.value.kind != "json":
            raise resolve.LookupError_(p.REASON_INVALID, f"the sub-task of key {key[:15]}… returned "
                                       f"{manifest.value.kind}, not JSON: a map's values must be JSON")
        values[key] = ctx.stores.by_url(result.store).load_value(manifest.value)
        memory.known[key] = result
    return [values[k] for k in keys]


def finish(ctx: Context, obj: dict[str, Any], target: Target, items: list[Any], keys: list[str],
           known: Mapping[str, mp.Known], memory: MapMemory, prog: mp.Progress, batches: list[str]) -> None:
    """Every element has a result: store the values in element order under the map key."""
    view = job(obj)
    namespace, name = view.ref
    store, url = target.store, target.url
    try:
        values = _values(ctx, keys, known, memory)
    except resolve.LookupError_ as exc:
        ctx.maps.pop(view.meta.uid, None)
        ctx.fail(obj, decide.Fail(exc.reason, exc.message, {"map": prog.counts()}))
        return
    except (MemoplaneError, ValueError) as exc:  # e.g. a result evicted since: look everything up again
        ctx.maps.pop(view.meta.uid, None)
        ctx.wait(obj, decide.Wait(p.REASON_STORE, f"reading a sub-task's result: {exc}"))
        return
    over = mp.over_of(obj)
    key = mp.map_key(over, keys)
    now_s = time.time()
    empty = store.put_bytes(b"")
    result = ResultManifest(store.put_value(values), BlobRef(empty.digest, 0), BlobRef(empty.digest, 0),
                            Provenance(key, {f"{over}[{i}]": k for i, k in enumerate(keys)}, "",
                                       p.OPERATOR_COMPONENT, now_s, now_s, 0.0),
                            meta={"map": {"over": over, "elements": len(items), "batches": batches}})
    # The list is a live result (GC keeps it, `memoplane result` finds it), attested by the
    # operator's key as the agents attest theirs.
    digest = store.commit(result, [attest(key, mp.map_manifest(over, keys), result.digest, ctx.signer,
                                          p.OPERATOR_COMPONENT, now_s, time.time())])
    saved = sum(known[k].seconds for k in dict.fromkeys(keys))
    run_id = _record(obj, store, key, digest, result, keys, known, now_s, saved, prog, ctx.signer.keyid)
    done = ctx.patch(obj, st.map_succeeded(view.status.raw, view.meta.generation, key, digest, result, url,
                                           prog.counts(), saved, datetime.now(UTC), run_id))
    ctx.metrics.jobs.labels("computed").inc()
    ctx.event(done, p.REASON_COMPUTED, f"{prog.total} sub-tasks succeeded ({prog.cached} from the cache, "
                                       f"{prog.computed} computed in {len(batches)} batches), result {digest[:15]}…")
    log.info("%s/%s: map of %d elements done, key %s", namespace, name, prog.total, key[3:15])


def _record(obj: Mapping[str, Any], store: Store, key: str, digest: str, result: ResultManifest,
            keys: list[str], known: Mapping[str, mp.Known], started: float, saved: float, prog: mp.Progress,
            signer: str) -> str | None:
    """The parent's run: the assembled list, its inputs the sub-tasks (each its key and result; the
    element runs are found by result digest: a batch runs many). Appended before the status write
    that names its run id."""
    over = mp.over_of(obj)
    inputs = tuple(InputRecord(f"{over}[{i}]", k, None, "mapElement", None, known[k].digest, None)
                   for i, k in enumerate(keys))
    run_id = new_run_id()
    record = RunRecord(run_id=run_id, job=lineage.identity(obj), key=key, result=digest, inputs=inputs, code="",
                       runtime="", env={}, node=p.OPERATOR_COMPONENT, signer=signer, started=started, ended=time.time(),
                       cached=prog.total > 0 and prog.cached == prog.total, compute_seconds=saved,
                       cache=lineage.cache_label(obj), policy=job(obj).spec.policy,
                       result_size=result.logical_size, components={"map": over})
    kept = history.append(store, record)
    events.run_settled(record, start=True)
    return run_id if kept else None
