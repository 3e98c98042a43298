"""spec.map.overChunks parents on the reconciler's worker: the over-chunks plan of
memoplane.chunkmap (the same leaf and combine jobs, so the same keys, as an embedded
`memoplane run --over-chunks`) driven by spec.map's batch machinery (mapper.py).

A pass resolves the parent as a plain job (its overChunks input a blob: fromJob, fromObject,
fromConfigMap...), splits that blob into record-aligned content-defined chunks (each stored as
a blob in the job's store), builds the content-defined combine tree and walks it layer by layer
from the leaves: a layer's keys are derived, known results (remembered, reported by a batch, or
a cache hit) are taken, and the missing nodes go to the agents in "jobs" batches (each element a
whole job manifest: a leaf and a combine node differ in code and inputs). The walk stops at the
first layer with missing nodes (a combine node's inputs are its children's values) and the
parent waits on its batches. When the root is known, the parent's result IS the root node's
result (its key and digest), so the cluster and an embedded run of the same file and script
agree on both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from memoplane.cas import ResultManifest
from memoplane.chunkmap.plan import Role, check_combine, layer_jobs, layers, split_chunks
from memoplane.chunkmap.tree import Node, build_tree
from memoplane.cluster import decide, lineage, resolve, schedule
from memoplane.cluster import mapping as mp
from memoplane.cluster import protocol as p
from memoplane.cluster import status as st
from memoplane.cluster.views import job, section
from memoplane.errors import InputError, MemoplaneError
from memoplane.history import InputRecord, RunRecord, events, new_run_id
from memoplane.history import build as history
from memoplane.jobs import BlobInput, Job, job_to_dict

from .caches import Target
from .context import Context, MapMemory
from .mapper import _known, _memory, _stop, _values, dispatch

log = logging.getLogger("memoplane.operator.chunks")


def template(ctx: Context, obj: dict[str, Any], target: Target) -> Job | resolve.Waiting | resolve.Failed:
    """The parent resolved as a plain job: the leaves' template (its overChunks input the whole blob)."""
    view = job(obj)
    runtime = schedule.runtime_for(ctx.fleet.nodes, view.spec.profile)
    got = resolve.resolve({**obj, "spec": mp.chunk_spec(obj, keep_over=True)}, runtime,
                          ctx.lookups(view.meta.namespace, target.store), datetime.now(UTC),
                          ctx.settings.missing_grace_seconds)
    return got.job if isinstance(got, resolve.Resolved) else got


def _tree(ctx: Context, obj: dict[str, Any], target: Target, whole: Job, over: str, combine: str
          ) -> tuple[Node, dict[str, BlobInput]] | resolve.Failed:
    """The combine tree over the chunks of the `over` blob (stored in the job's store), and the chunks by digest."""
    blob = whole.inputs.get(over)
    if not isinstance(blob, BlobInput):
        return resolve.Failed(p.REASON_INVALID, f"spec.map.overChunks: input '{over}' is not a blob: use a "
                                                "fromObject, fromJob (a file result), fromConfigMap or fromBlob input")
    try:
        check_combine(whole, combine)
    except InputError as exc:
        return resolve.Failed(p.REASON_INVALID, f"spec.python.combine: {exc.cause}: {exc.fix}")
    store, size = target.store, ctx.settings.chunk_task_bytes
    memory = _memory(ctx, obj, target)
    if (blob.digest, size) not in memory.chunked:   # a pass per settled batch: read and split the input once

        def put(chunk: bytes) -> BlobInput:
            stored = store.put_bytes(chunk)
            return BlobInput(stored.digest, stored.size)

        chunks, order = split_chunks(store.get_bytes(blob.digest), put, size)
        if memory.chunked:   # a new input: what earlier inputs computed is served from the cache now
            memory.known = {k: replace(v, cached=True) for k, v in memory.known.items()}
        memory.chunked = {(blob.digest, size): (build_tree(order), chunks)}   # only the current input's
    return memory.chunked[(blob.digest, size)]


def reconcile_chunks(ctx: Context, obj: dict[str, Any]) -> None:
    view = job(obj)
    namespace = view.meta.namespace
    found = ctx.caches.store_for(obj)
    if isinstance(found, decide.Wait):
        ctx.wait(obj, found)
        return
    whole = template(ctx, obj, found)
    over, combine = str(mp.chunks_over(obj)), str(section(section(obj, "spec"), "python").get("combine") or "")
    if not isinstance(whole, Job):
        _stop(ctx, obj, whole)
        return
    shaped = _tree(ctx, obj, found, whole, over, combine)
    if not isinstance(shaped, tuple):
        _stop(ctx, obj, shaped)
        return
    try:
        _walk(ctx, obj, found, whole, over, combine, *shaped)
    except resolve.LookupError_ as exc:   # e.g. a leaf returned bytes: partial results must be JSON
        ctx.maps.pop(view.meta.uid, None)
        ctx.fail(obj, decide.Fail(exc.reason, f"spec.map.overChunks: {exc.message}"))
    except (MemoplaneError, ValueError) as exc:  # e.g. a result evicted since: look everything up again
        ctx.maps.pop(view.meta.uid, None)
        ctx.wait(obj, decide.Wait(p.REASON_STORE, f"{namespace}: reading a chunk or a node's result: {exc}"))


def _walk(ctx: Context, obj: dict[str, Any], target: Target, whole: Job, over: str, combine: str, root: Node,
          chunks: dict[str, BlobInput]) -> None:
    view = job(obj)
    namespace = view.meta.namespace
    memory = _memory(ctx, obj, target)
    listed, _ = ctx.kube.list(p.COMPUTEJOBS, namespace, f"{mp.PARENT_LABEL}={view.meta.uid}")
    children = {job(c).meta.name: c for c in listed if mp.is_batch(c)}
    batches = [mp.batch_view(c, over) for c in children.values()]
    for done in [b for b in batches if b.phase == p.SUCCEEDED and all(k in memory.known for k in b.keys)]:
        # Its results are remembered (as hits once the input changed): it need not be listed again.
        ctx.kube.delete(p.COMPUTEJOBS, namespace, done.name)
        children.pop(done.name, None)
        batches.remove(done)
    values: dict[str, Any] = {}
    roles: dict[str, Role] = {}
    keys: list[str] = []     # every node's key so far, layer by layer
    wanted: dict[str, Any] = {}
    for layer in layers(root):
        tasks = layer_jobs(whole, over, combine, layer, chunks, values)
        layer_keys = [task.key for task, _ in tasks]
        keys += layer_keys
        roles.update({k: role for k, (_, role) in zip(layer_keys, tasks, strict=True)})
        wanted.update({k: job_to_dict(task) for k, (task, _) in zip(layer_keys, tasks, strict=True)})
        known = _known(ctx, obj, target, wanted, batches, children, memory)
        memory.known.update({k: known[k] for k in layer_keys if k in known})   # batches may be deleted later
        if any(k not in known for k in layer_keys):
            _wait_for_layer(ctx, obj, wanted, keys, known, batches, children, counts(keys, roles, known, len(chunks)))
            return
        values.update(zip((n.id for n in layer), _values(ctx, layer_keys, known, memory), strict=True))
    _finish(ctx, obj, keys, known, memory, counts(keys, roles, known, len(chunks)), sorted(children))


def _wait_for_layer(ctx: Context, obj: dict[str, Any], wanted: Mapping[str, Any], keys: list[str],
                    known: Mapping[str, mp.Known], batches: list[mp.Batch], children: dict[str, dict[str, Any]],
                    tally: dict[str, Any]) -> None:
    """Batches for the layer's missing nodes; fail on a failed one, else report the counts and wait."""
    view = job(obj)
    dispatched = dispatch(ctx, obj, wanted, known, batches, children, mp.jobs_batch_manifest)
    if dispatched is None:
        return
    todo, running = dispatched
    prog = mp.progress(keys, known, todo, len(children))
    step = decide.map_step(obj, prog, children, running)
    if isinstance(step, decide.Fail):
        ctx.maps.pop(view.meta.uid, None)
        ctx.fail(obj, decide.Fail(step.reason, step.message.replace("element", "chunk-map node", 1),
                                  {"map": {**prog.counts(), **tally}}))
        return
    status = view.status
    merged = {**prog.counts(), **tally}
    if status.map != merged or status.phase != p.RUNNING or status.observed_generation != view.meta.generation:
        ctx.patch(obj, st.map_progress(status.raw, view.meta.generation, merged, datetime.now(UTC)))


def counts(keys: list[str], roles: Mapping[str, Role], known: Mapping[str, mp.Known], chunks: int
           ) -> dict[str, Any]:
    """Distinct leaves and combine nodes walked so far: how many, served from the cache, computed."""
    tally: dict[str, Any] = {"chunks": chunks}
    for role, field in (("leaf", "leaves"), ("combine", "combines")):
        mine = [k for k in dict.fromkeys(keys) if roles[k] == role]
        tally[field] = {"total": len(mine), "cached": sum(1 for k in mine if k in known and known[k].cached),
                        "computed": sum(1 for k in mine if k in known and not known[k].cached)}
    return tally


def _finish(ctx: Context, obj: dict[str, Any], keys: list[str], known: Mapping[str, mp.Known], memory: MapMemory,
            tally: dict[str, Any], batches: list[str]) -> None:
    """The root is known: its result is the parent's (the same key and digest as embedded)."""
    view = job(obj)
    root = keys[-1]
    result = known[root]
    distinct = list(dict.fromkeys(keys))
    cached = sum(1 for k in distinct if known[k].cached)
    total = {"total": len(distinct), "distinct": len(distinct), "succeeded": len(distinct), "cached": cached,
             "computed": len(distinct) - cached, "running": 0, "failed": 0, "batches": len(batches)}
    saved = sum(known[k].seconds for k in distinct)
    manifest = memory.manifests[result.digest]
    run_id = _record(ctx, obj, root, result, manifest, cached == len(distinct), saved)
    done = ctx.patch(obj, st.map_succeeded(view.status.raw, view.meta.generation, root, result.digest, manifest,
                                           result.store, {**total, **tally}, saved, datetime.now(UTC), run_id))
    ctx.metrics.jobs.labels("computed").inc()
    leaves, combines = tally["leaves"], tally["combines"]
    ctx.event(done, p.REASON_COMPUTED,
              f"{tally['chunks']} chunks: {leaves['total']} leaves ({leaves['computed']} computed), "
              f"{combines['total']} combine nodes ({combines['computed']} computed), result {result.digest[:15]}…")
    log.info("%s/%s: over-chunks map done, root key %s", *view.ref, root[3:15])


def _record(ctx: Context, obj: Mapping[str, Any], key: str, root: mp.Known, result: ResultManifest, cached: bool,
            saved: float) -> str | None:
    """The parent's run: served the tree's root (its key and result; the nodes' own runs are the agents'
    records). Appended to the store that holds the root's result, before the status names its run id."""
    now, run_id = time.time(), new_run_id()
    record = RunRecord(run_id=run_id, job=lineage.identity(obj), key=key, result=root.digest,
                       inputs=(InputRecord("root", key, None, "mapElement", None, root.digest, None),), code="",
                       runtime="", env={}, node=p.OPERATOR_COMPONENT, signer=ctx.signer.keyid, started=now, ended=now,
                       cached=cached, compute_seconds=saved, cache=lineage.cache_label(obj), policy=job(obj).spec.policy,
                       result_size=result.logical_size, components={"overChunks": str(mp.chunks_over(obj))})
    kept = history.append(ctx.stores.by_url(root.store), record)
    events.run_settled(record, start=True)
    return run_id if kept else None
