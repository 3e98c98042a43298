"""spec.map parents on the reconciler's worker: keep one child ComputeJob per distinct
element (memoplane.cluster.mapping decides which), report progress, and when every child
succeeded store the list of their values as the parent's result.

Everything is read afresh from the API server (the children by label) on each pass, so a
restarted operator continues where the objects say; the children are ordinary jobs that
the rest of the reconciler resolves, serves from the cache or schedules. The parent waits
on each unfinished child (woken when it settles) and is revisited by the resync.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from memoplane.api.computejob import Input as SpecInput
from memoplane.cas import BlobRef, Provenance, ResultManifest, Store
from memoplane.cluster import decide, lineage, resolve
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

from .context import Context

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


def reconcile_map(ctx: Context, obj: dict[str, Any]) -> None:
    view = job(obj)
    namespace, name = view.ref
    found = ctx.caches.store_for(obj)
    if isinstance(found, decide.Wait):
        ctx.wait(obj, found)
        return
    store, url = found.store, found.url
    items = elements(ctx, obj, store)
    if not isinstance(items, list):
        decision = decide.after_resolution(obj, items)
        if isinstance(decision, decide.Wait):
            ctx.wait(obj, decision)
        elif isinstance(decision, decide.Fail):
            ctx.fail(obj, decision)
        return
    listed, _ = ctx.kube.list(p.COMPUTEJOBS, namespace, f"{mp.PARENT_LABEL}={view.meta.uid}")
    children = {job(c).meta.name: c for c in listed}
    todo = mp.plan(obj, items, children)
    # Registered before the writes: a child served from the cache at once wakes the parent.
    ctx.wait_on(obj, [job_topic(namespace, m["metadata"]["name"]) for m in todo.create + todo.update])
    _apply_plan(ctx, obj, todo, children)
    taken = decide.name_taken(name, todo.taken)
    if taken is not None:
        ctx.fail(obj, taken)
        return
    prog = mp.progress(obj, items, children)
    step = decide.map_step(obj, prog, children)
    if isinstance(step, decide.Fail):
        ctx.fail(obj, step)
    elif isinstance(step, decide.Progressing):
        ctx.wait_on(obj, step.topics)
        if step.write:
            ctx.patch(obj, st.map_progress(view.status.raw, view.meta.generation, prog.counts(), datetime.now(UTC)))
    else:
        finish(ctx, obj, store, url, items, children, prog)


def _apply_plan(ctx: Context, obj: Mapping[str, Any], todo: mp.Plan, children: dict[str, dict[str, Any]]) -> None:
    """Create, rewrite and delete children as planned; a wanted name held by a job that is
    not ours goes to `todo.taken`."""
    namespace = job(obj).meta.namespace
    for manifest in todo.create:
        child = ctx.kube.create(p.COMPUTEJOBS, namespace, manifest)
        if child is None:  # the name exists: ours from an earlier pass, or someone else's
            other = ctx.kube.get(p.COMPUTEJOBS, namespace, manifest["metadata"]["name"])
            if other is not None and not mp.owned_by(other, obj):
                todo.taken.append(manifest["metadata"]["name"])
            continue
        children[job(child).meta.name] = child
    if todo.taken:
        return
    for manifest in todo.update:  # the parent's spec changed: so does each child's
        patch = [{"op": "replace", "path": "/spec", "value": manifest["spec"]},
                 {"op": "add", "path": "/metadata/annotations/" + mp.SPEC_ANNOTATION.replace("/", "~1"),
                  "value": manifest["metadata"]["annotations"][mp.SPEC_ANNOTATION]}]
        children[manifest["metadata"]["name"]] = ctx.kube.json_patch(p.COMPUTEJOBS, namespace,
                                                                     manifest["metadata"]["name"], patch)
    for gone in todo.delete:  # no element maps to it any more (its result stays in the cache)
        ctx.kube.delete(p.COMPUTEJOBS, namespace, gone)
        children.pop(gone, None)


def _value(ctx: Context, child: Mapping[str, Any], url: str) -> Any:
    """A child's JSON value: inline in its status, else read (verified) from its store
    (the parent's, `url`, unless its status names another)."""
    view = job(child)
    result = view.status.result
    if "value" in result:
        return result["value"]
    store = ctx.stores.by_url(view.result_store_url or url)
    manifest = store.get_result(str(result["digest"]))
    if manifest.value.kind != "json":
        raise resolve.LookupError_(p.REASON_INVALID, f"ComputeJob '{view.meta.name}' returned "
                                                     f"{manifest.value.kind}, not JSON: a map's values must be JSON")
    return store.load_value(manifest.value)


def finish(ctx: Context, obj: dict[str, Any], store: Store, url: str, items: list[Any],
           children: Mapping[str, Mapping[str, Any]], prog: mp.Progress) -> None:
    """Every element succeeded: store the values in element order under the map key."""
    view = job(obj)
    namespace, name = view.ref
    names = [mp.child_name(name, e) for e in items]
    try:
        values = [_value(ctx, children[n], url) for n in names]
    except resolve.LookupError_ as exc:
        ctx.fail(obj, decide.Fail(exc.reason, exc.message, {"map": prog.counts()}))
        return
    except MemoplaneError as exc:
        ctx.wait(obj, decide.Wait(p.REASON_STORE, f"reading a sub-task's result: {exc}"))
        return
    over = mp.over_of(obj)
    keys = [str(job(children[n]).status.cache_key) for n in names]
    key = mp.map_key(over, keys)
    now_s = time.time()
    empty = store.put_bytes(b"")
    result = ResultManifest(store.put_value(values), BlobRef(empty.digest, 0), BlobRef(empty.digest, 0),
                            Provenance(key, {f"{over}[{i}]": k for i, k in enumerate(keys)}, "",
                                       p.OPERATOR_COMPONENT, now_s, now_s, 0.0),
                            meta={"map": {"over": over, "children": names}})
    # The list is a live result (GC keeps it, `memoplane result` finds it), attested by the
    # operator's key as the agents attest theirs.
    digest = store.commit(result, [attest(key, mp.map_manifest(over, keys), result.digest, ctx.signer,
                                          p.OPERATOR_COMPONENT, now_s, time.time())])
    saved = sum(job(children[n]).status.compute_seconds_saved for n in dict.fromkeys(names))
    run_id = _record(obj, store, key, digest, result, [children[n] for n in names], now_s, saved, prog,
                     ctx.signer.keyid)
    done = ctx.patch(obj, st.map_succeeded(view.status.raw, view.meta.generation, key, digest, result, url, prog.counts(),
                                           saved, datetime.now(UTC), run_id))
    ctx.metrics.jobs.labels("computed").inc()
    ctx.event(done, p.REASON_COMPUTED, f"{prog.total} sub-tasks succeeded ({prog.cached} from the cache), "
                                       f"result {digest[:15]}…")
    log.info("%s/%s: map of %d elements done, key %s", namespace, name, prog.total, key[3:15])


def _record(obj: Mapping[str, Any], store: Store, key: str, digest: str, result: ResultManifest,
            children: list[Mapping[str, Any]], started: float, saved: float, prog: mp.Progress,
            signer: str) -> str | None:
    """The parent's run: the assembled list, its inputs the sub-tasks (each its key, result and
    run, as fromJob inputs name theirs). Appended before the status write that names its run id."""
    over, namespace = mp.over_of(obj), job(obj).meta.namespace
    inputs = tuple(InputRecord(f"{over}[{i}]", str(job(c).status.cache_key), None, "mapElement",
                               f"{namespace}/{job(c).meta.name}", job(c).status.result_digest,
                               job(c).status.raw.get("runId")) for i, c in enumerate(children))
    run_id = new_run_id()
    record = RunRecord(run_id=run_id, job=lineage.identity(obj), key=key, result=digest, inputs=inputs, code="",
                       runtime="", env={}, node=p.OPERATOR_COMPONENT, signer=signer, started=started, ended=time.time(),
                       cached=prog.total > 0 and prog.cached == prog.total, compute_seconds=saved,
                       cache=lineage.cache_label(obj), policy=job(obj).spec.policy,
                       result_size=result.logical_size, components={"map": over})
    kept = history.append(store, record)
    events.run_settled(record, start=True)
    return run_id if kept else None
