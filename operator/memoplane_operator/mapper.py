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
from typing import TYPE_CHECKING, Any

from memoplane.cas import BlobRef, Provenance, ResultManifest, Store
from memoplane.cluster import mapping as mp
from memoplane.cluster import protocol as p
from memoplane.cluster import resolve
from memoplane.cluster import status as st
from memoplane.cluster.index import job_topic, ref_of
from memoplane.errors import MemoplaneError
from memoplane.jobs import JsonInput

from .lookups import Lookups

if TYPE_CHECKING:
    from .reconciler import Reconciler

log = logging.getLogger("memoplane.operator.map")


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def _status(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("status") or {}


def elements(r: Reconciler, obj: dict[str, Any], store: Store) -> list[Any] | resolve.Waiting | resolve.Failed:
    """The `over` input's list: a value, or an upstream job's JSON result."""
    from memoplane.api.computejob import Input as SpecInput

    namespace, name = ref_of(obj)
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
    created = resolve.parse_time(_meta(obj).get("creationTimestamp"))
    got = resolve.resolve_input(item, name, Lookups(r.kube, r.stores, namespace, store), created,
                                datetime.now(UTC), r.cfg.missing_grace_seconds)
    if isinstance(got, resolve.Waiting | resolve.Failed):
        return got
    if not isinstance(got, JsonInput):
        return resolve.Failed(p.REASON_INVALID, f"spec.map.over: input '{over}' is not JSON: map over a JSON list")
    problem = mp.elements_problem(got.value, over)
    return resolve.Failed(p.REASON_INVALID, problem) if problem else list(got.value)


def reconcile_map(r: Reconciler, obj: dict[str, Any]) -> None:
    meta, status = _meta(obj), _status(obj)
    namespace, name = ref_of(obj)
    generation = int(meta.get("generation") or 0)
    found = r.caches.store_for(obj)
    if isinstance(found, str):
        r.wait(obj, p.REASON_NO_CACHE, found)
        return
    store, _url = found
    items = elements(r, obj, store)
    if isinstance(items, resolve.Waiting):
        r.wait_on(obj, [job_topic(namespace, up) for up in resolve.upstream_names(obj)])
        r.wait(obj, items.reason, items.message)
        return
    if isinstance(items, resolve.Failed):
        r.fail(obj, items.reason, items.message)
        return
    listed, _ = r.kube.list(p.COMPUTEJOBS, namespace, f"{mp.PARENT_LABEL}={meta.get('uid')}")
    children = {str(_meta(c).get("name")): c for c in listed}
    todo = mp.plan(obj, items, children)
    # Registered before the writes: a child served from the cache at once wakes the parent.
    r.wait_on(obj, [job_topic(namespace, m["metadata"]["name"]) for m in todo.create + todo.update])
    for manifest in todo.create:
        child = r.kube.create(p.COMPUTEJOBS, namespace, manifest)
        if child is None:  # the name exists: ours from an earlier pass, or someone else's
            other = r.kube.get(p.COMPUTEJOBS, namespace, manifest["metadata"]["name"])
            if other is not None and not mp.owned_by(other, obj):
                todo.taken.append(manifest["metadata"]["name"])
            continue
        children[str(_meta(child)["name"])] = child
    if todo.taken:
        r.fail(obj, mp.REASON_NAME_TAKEN, f"ComputeJob '{todo.taken[0]}' exists and is not a sub-task of "
                                          f"'{name}': rename one of them")
        return
    for manifest in todo.update:  # the parent's spec changed: so does each child's
        patch = [{"op": "replace", "path": "/spec", "value": manifest["spec"]},
                 {"op": "add", "path": "/metadata/annotations/" + mp.SPEC_ANNOTATION.replace("/", "~1"),
                  "value": manifest["metadata"]["annotations"][mp.SPEC_ANNOTATION]}]
        children[manifest["metadata"]["name"]] = r.kube.json_patch(p.COMPUTEJOBS, namespace,
                                                                   manifest["metadata"]["name"], patch)
    for gone in todo.delete:  # no element maps to it any more (its result stays in the cache)
        r.kube.delete(p.COMPUTEJOBS, namespace, gone)
        children.pop(gone, None)
    now = datetime.now(UTC)
    prog = mp.progress(obj, items, children)
    if prog.failed:
        index, child_name = prog.first_failure or (0, "")
        s = _status(children[child_name])
        failure = s.get("failure") or {}
        why = failure.get("reason") or s.get("reason") or "failed"
        detail = failure.get("message") or s.get("message") or ""
        r.fail(obj, mp.REASON_SUBTASK_FAILED, f"element {index} (ComputeJob '{child_name}') failed ({why})"
                                              + (f": {detail}" if detail else ""), extra={"map": prog.counts()})
        return
    if not prog.done:
        r.wait_on(obj, [job_topic(namespace, c) for c in prog.waiting_on])
        if status.get("map") != prog.counts() or status.get("phase") != p.RUNNING or \
                status.get("observedGeneration") != generation:
            r.patch(obj, st.map_progress(status, generation, prog.counts(), now))
        return
    finish(r, obj, store, items, children, prog)


def _value(r: Reconciler, child: Mapping[str, Any]) -> Any:
    """A child's JSON value: inline in its status, else read (verified) from its store."""
    result = _status(child).get("result") or {}
    if "value" in result:
        return result["value"]
    url = (_meta(child).get("annotations") or {}).get(p.STORE_ANNOTATION)
    store = r.stores.by_url(str(url))
    manifest = store.get_result(str(result["digest"]))
    if manifest.value.kind != "json":
        raise resolve.LookupError_(p.REASON_INVALID, f"ComputeJob '{_meta(child).get('name')}' returned "
                                                     f"{manifest.value.kind}, not JSON: a map's values must be JSON")
    return store.load_value(manifest.value)


def finish(r: Reconciler, obj: dict[str, Any], store: Store, items: list[Any],
           children: Mapping[str, Mapping[str, Any]], prog: mp.Progress) -> None:
    """Every element succeeded: store the values in element order under the map key."""
    namespace, name = ref_of(obj)
    generation = int(_meta(obj).get("generation") or 0)
    names = [mp.child_name(name, e) for e in items]
    try:
        values = [_value(r, children[n]) for n in names]
    except resolve.LookupError_ as exc:
        r.fail(obj, exc.reason, exc.message, extra={"map": prog.counts()})
        return
    except MemoplaneError as exc:
        r.wait(obj, p.REASON_STORE, f"reading a sub-task's result: {exc}")
        return
    over = mp.over_of(obj)
    keys = [str(_status(children[n]).get("cacheKey")) for n in names]
    key = mp.map_key(over, keys)
    now_s = time.time()
    empty = store.put_bytes(b"")
    result = ResultManifest(store.put_value(values), BlobRef(empty.digest, 0), BlobRef(empty.digest, 0),
                            Provenance(key, {f"{over}[{i}]": k for i, k in enumerate(keys)}, "",
                                       p.OPERATOR_COMPONENT, now_s, now_s, 0.0),
                            meta={"map": {"over": over, "children": names}})
    digest = store.put_result(result)
    store.set_ref(key, digest)  # the list is a live result: GC keeps it, `memoplane result` finds it
    saved = sum(float(_status(children[n]).get("computeSecondsSaved") or 0.0) for n in dict.fromkeys(names))
    done = r.patch(obj, st.map_succeeded(_status(obj), generation, key, digest, result, prog.counts(), saved,
                                         datetime.now(UTC)))
    r.metrics.jobs.labels("computed").inc()
    r.kube.event(done, p.REASON_COMPUTED, f"{prog.total} sub-tasks succeeded ({prog.cached} from the cache), "
                                          f"result {digest[:15]}…")
    log.info("%s/%s: map of %d elements done, key %s", namespace, name, prog.total, key[3:15])
