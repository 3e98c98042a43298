"""spec.map: one cached sub-task per element of a list input, kept in batches (pure decisions).

Every element is a sub-task with its own cache key, derived exactly as if the parent's
`over` input were that element (`child_spec`): the same key a plain job with that input
has, so each element is cached, served and reused on its own. What an element costs is
what it needs:
- the operator derives every element's key itself (the parent's spec is resolved once,
  `ElementKeys` makes a key cost one hash) and looks the keys up in the cache: a hit is
  served with no API object at all;
- the missed keys go to the agents in BATCHES: one child ComputeJob per batch of up to
  `map_batch_size` distinct missed elements. A batch's spec is the parent's with the `over`
  input replaced by the batch's elements, its annotation BATCH_ANNOTATION marks it as a
  batch, and KEYS_ANNOTATION lists the elements' keys. The agent runs each element as its
  own sandbox run (own key, result, attestation and ref) and reports the elements' result
  digests, in order, in the batch's status.map.results. A batch's own key (`batch_key`,
  the digest of its elements' keys) is only its single-flight name: no result is stored
  under it.
So a 10,000-element map is 10,000 lookups and, when cold, ~10,000/64 child objects; a
pass lists those few children, never one object per element. A batch's name follows its
keys, so a batch is never rewritten: when the parent's spec changes its keys change, new
batches are made and the ones no element needs any more are deleted.

The parent's result is the list of the elements' values in element order; its key is a
digest of the elements' keys in that order (the same list of elements over the same code
gives the same key, however the elements were batched or served).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..canonical import canonical_json
from ..jobs import Job, JsonInput, job_from_dict
from ..keys import KeyTemplate, digest_bytes, digest_value
from . import protocol as p
from .views import job, meta_of, section

PARENT_LABEL = f"{p.GROUP}/map-parent"            # value: the parent's uid
BATCH_ANNOTATION = f"{p.GROUP}/map-batch"         # value: the `over` input's name: this child is a batch
KEYS_ANNOTATION = f"{p.GROUP}/map-keys"           # the batch's element keys, JSON list, in its elements' order
# "jobs": a batch whose `over` input lists whole job manifests (spec.map.overChunks: leaves and combine nodes
# differ in code and inputs), not elements of one template.
FORM_ANNOTATION = f"{p.GROUP}/map-batch-form"
JOBS_FORM = "jobs"
REASON_SUBTASK_FAILED = "SubTaskFailed"
REASON_MAPPING = "Mapping"
REASON_NAME_TAKEN = "SubTaskNameTaken"
NAME_MAX = 253
DIGEST_CHARS = 10                                # hex digits of the batch digest in a child's name
BATCH_BYTES = 256 << 10                          # a batch's elements, canonical JSON, at most (one larger goes alone)


def is_map(obj: Mapping[str, Any]) -> bool:
    return job(obj).spec.map_over is not None


def is_batch(obj: Mapping[str, Any]) -> bool:
    return BATCH_ANNOTATION in meta_of(obj).annotations


def over_of(obj: Mapping[str, Any]) -> str:
    return str(job(obj).spec.map_over)


def over_input(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    over = over_of(obj)
    return next((item for item in job(obj).spec.inputs if item.get("name") == over), None)


def elements_problem(value: Any, over: str) -> str | None:
    if not isinstance(value, list):
        return f"spec.map.over: input '{over}' is a {type(value).__name__}, not a list: map over a JSON list"
    return None


def child_spec(parent: Mapping[str, Any], value: Any) -> dict[str, Any]:
    """The parent's spec without `map`, its `over` input replaced by `value` (an element,
    or the list of a batch's elements)."""
    spec = {k: v for k, v in section(parent, "spec").items() if k != "map"}
    over = over_of(parent)
    spec["inputs"] = [({"name": over, "value": value} if item.get("name") == over else item)
                      for item in spec.get("inputs") or ()]
    return spec


def template_object(parent: Mapping[str, Any]) -> dict[str, Any]:
    """The parent as a plain job over a placeholder element: resolving it once resolves
    every input but `over` for all elements."""
    return {**parent, "spec": child_spec(parent, None)}


# -- keys ---------------------------------------------------------------------------------


class ElementKeys:
    """Keys of the sub-tasks of one resolved template (a Job whose `over` input is a
    placeholder): the fixed components are encoded once, so an element's key costs one
    canonical encoding of the element and one hash. Equal to `element_job(...).key`."""

    def __init__(self, template: Job, over: str) -> None:
        parts = template.key_parts()
        self.over = over
        self._template = KeyTemplate(parts.code, parts.entrypoint, parts.runtime, parts.env, parts.salt)
        self._inputs = {name: entry for name, entry in parts.inputs.items() if name != over}

    def key(self, element: Any) -> str:
        return self._template.key({**self._inputs, self.over: "json:" + digest_value(element)})


def element_job(template: Job, over: str, element: Any) -> Job:
    return replace(template, inputs={name: (JsonInput(element) if name == over else value)
                                     for name, value in template.inputs.items()})


def batch_jobs(batch: Job, over: str) -> list[Job]:
    """A batch's resolved job (its `over` input holds the list of its elements) as the jobs
    of its elements, in order."""
    value = batch.inputs.get(over)
    if not isinstance(value, JsonInput) or not isinstance(value.value, list):
        raise ValueError(f"a map batch's input '{over}' must be the JSON list of its elements")
    return [element_job(batch, over, element) for element in value.value]


def manifest_jobs(batch: Job, over: str) -> list[Job]:
    """A "jobs" batch's resolved job (its `over` input holds job manifests) as those jobs, in order."""
    value = batch.inputs.get(over)
    if not isinstance(value, JsonInput) or not isinstance(value.value, list):
        raise ValueError(f"a map batch's input '{over}' must be the JSON list of its jobs")
    try:
        return [job_from_dict(item) for item in value.value]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"a map batch's input '{over}' holds a malformed job manifest: {exc}") from None


def jobs_of_batch(obj: Mapping[str, Any], batch: Job) -> list[Job]:
    """The jobs a batch ComputeJob (`obj`, resolved to `batch`) runs, one after another."""
    annotations = meta_of(obj).annotations
    over = annotations[BATCH_ANNOTATION]
    return manifest_jobs(batch, over) if annotations.get(FORM_ANNOTATION) == JOBS_FORM else batch_jobs(batch, over)


def batch_key(over: str, keys: Sequence[str]) -> str:
    """A batch's key: its single-flight name (never a ref), distinct from any element's key."""
    return digest_bytes(canonical_json({"v": 1, "batch": over, "keys": list(keys)}))


def map_manifest(over: str, child_keys: list[str]) -> dict[str, Any]:
    """What the parent's key is the digest of: its elements' keys in element order."""
    return {"v": 1, "map": over, "keys": child_keys}


def map_key(over: str, child_keys: list[str]) -> str:
    return digest_bytes(canonical_json(map_manifest(over, child_keys)))


# -- batches --------------------------------------------------------------------------------


def batch_name(parent: str, keys: Sequence[str]) -> str:
    suffix = "-" + digest_value(list(keys))[3:3 + DIGEST_CHARS]
    return parent[: NAME_MAX - len(suffix)].rstrip("-.") + suffix


def batch_manifest(parent: Mapping[str, Any], elements: list[Any], keys: list[str]) -> dict[str, Any]:
    return _batch_object(parent, over_of(parent), child_spec(parent, elements), keys)


def chunks_over(obj: Mapping[str, Any]) -> str | None:
    """spec.map.overChunks: the large input an over-chunks map splits."""
    over = section(section(obj, "spec"), "map").get("overChunks")
    return str(over) if over else None


def is_chunk_map(obj: Mapping[str, Any]) -> bool:
    return chunks_over(obj) is not None


def chunk_spec(parent: Mapping[str, Any], value: Any = None, *, keep_over: bool = False) -> dict[str, Any]:
    """An over-chunks parent's spec as a plain job (no map, no python.combine), its `overChunks`
    input kept (`keep_over`: what the leaves' template resolves from) or replaced by `value`."""
    spec = {k: v for k, v in section(parent, "spec").items() if k != "map"}
    spec["python"] = {k: v for k, v in section(spec, "python").items() if k != "combine"}
    over = chunks_over(parent)
    if not keep_over:
        spec["inputs"] = [({"name": over, "value": value} if item.get("name") == over else item)
                          for item in spec.get("inputs") or ()]
    return spec


def jobs_batch_manifest(parent: Mapping[str, Any], manifests: list[Any], keys: list[str]) -> dict[str, Any]:
    """A batch of whole jobs (an over-chunks map's leaves or combine nodes): its `overChunks`
    input lists their manifests (memoplane.jobs.job_to_dict), in the order of `keys`."""
    over = str(chunks_over(parent))
    made = _batch_object(parent, over, chunk_spec(parent, manifests), keys)
    made["metadata"]["annotations"][FORM_ANNOTATION] = JOBS_FORM
    return made


def _batch_object(parent: Mapping[str, Any], over: str, spec: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    meta = meta_of(parent)
    return {
        "apiVersion": p.API_VERSION, "kind": "ComputeJob",
        "metadata": {
            "name": batch_name(meta.name, keys), "namespace": meta.namespace,
            "labels": {PARENT_LABEL: meta.uid},
            "annotations": {BATCH_ANNOTATION: over, KEYS_ANNOTATION: json.dumps(keys, separators=(",", ":"))},
            "ownerReferences": [{"apiVersion": p.API_VERSION, "kind": "ComputeJob", "name": meta.name,
                                 "uid": meta.uid, "controller": True, "blockOwnerDeletion": False}],
        },
        "spec": spec,
    }


def batch_keys(child: Mapping[str, Any]) -> list[str]:
    """The element keys a batch was made for (empty when the annotation is unreadable)."""
    try:
        keys = json.loads(meta_of(child).annotations.get(KEYS_ANNOTATION, "[]"))
    except ValueError:
        return []
    return [str(k) for k in keys] if isinstance(keys, list) else []


def owned_by(child: Mapping[str, Any], parent: Mapping[str, Any]) -> bool:
    return meta_of(child).labels.get(PARENT_LABEL) == meta_of(parent).uid


@dataclass(frozen=True)
class Known:
    """A sub-task's result: from a cache hit (`cached`) or computed by a batch."""

    digest: str
    store: str        # the URL of the store that holds it
    cached: bool
    seconds: float = 0.0   # compute seconds a hit saved


@dataclass(frozen=True)
class Batch:
    name: str
    keys: tuple[str, ...]
    phase: str | None        # None: not settled for its spec yet
    results: tuple[str, ...] = ()     # element result digests, in order (a failed batch: those before the failure)
    failed_key: str | None = None     # a failed batch: the key of the element that failed


def batch_view(child: Mapping[str, Any], over: str) -> Batch:
    """What a listed child says: its keys, whether it settled, its element results. A batch
    whose key is not the digest of its keys ran something else: it counts as failed."""
    view = job(child)
    keys = tuple(batch_keys(child))
    if not view.settled:
        return Batch(view.meta.name, keys, None)
    reported = section(view.status.raw, "map")
    results = tuple(str(d) for d in (reported.get("results") or ()))
    if str(view.status.cache_key) != batch_key(over, keys) or len(results) > len(keys) or \
            (view.status.phase == p.SUCCEEDED and len(results) != len(keys)):
        return Batch(view.meta.name, keys, p.FAILED)
    index = reported.get("failedElement")
    failed_key = keys[index] if isinstance(index, int) and 0 <= index < len(keys) else None
    return Batch(view.meta.name, keys, str(view.status.phase), results, failed_key)


@dataclass
class Plan:
    """What the parent does with its batches now."""

    create: list[tuple[list[Any], list[str]]] = field(default_factory=list)   # (elements, keys) per new batch
    delete: list[str] = field(default_factory=list)        # batches no wanted key is in any more
    running: dict[str, str] = field(default_factory=dict)  # key -> its unfinished batch
    failed: dict[str, str] = field(default_factory=dict)   # key -> its failed batch
    culprits: set[str] = field(default_factory=set)        # keys whose own run failed


def batch_size(missing: int, slots: int, most: int) -> int:
    """Up to `most` elements a batch, yet spread over the `slots` the live agents run at once:
    a batch runs its elements one after another, so a few misses go to as many batches as
    there are slots rather than to one."""
    return max(1, min(most, -(-missing // max(1, slots))))


def plan(wanted: Mapping[str, Any], known: Mapping[str, Known], batches: Iterable[Batch], size: int,
         slots: int = 1) -> Plan:
    """`wanted`: element key -> element, in element order (distinct keys); `known`: the keys
    whose result is known (hits, and the results batches reported); `batches`: the parent's
    children. The keys neither known nor in an unfinished or failed batch go to new batches
    of up to `size` (fewer when the agents' `slots` would otherwise idle), in element order.
    A failed batch stays (and fails the parent) while the element it failed on is wanted:
    the same key fails the same way."""
    out = Plan()
    for batch in batches:
        if not any(k in wanted for k in batch.keys) or (batch.failed_key and batch.failed_key not in wanted):
            # Nothing wanted in it, or it failed on an element no longer wanted: the others go to new batches.
            out.delete.append(batch.name)
        elif batch.phase is None:
            out.running.update({k: batch.name for k in batch.keys if k not in known})
        elif batch.phase != p.SUCCEEDED:
            out.failed.update({k: batch.name for k in batch.keys if k not in known})
            out.culprits.update([batch.failed_key] if batch.failed_key else ())
    todo = [k for k in wanted if k not in known and k not in out.running and k not in out.failed]
    for keys in _groups(todo, wanted, batch_size(len(todo), slots, size)):
        out.create.append(([wanted[k] for k in keys], keys))
    return out


def _groups(todo: list[str], wanted: Mapping[str, Any], size: int) -> Iterable[list[str]]:
    """`todo` in order, cut into batches of up to `size` keys whose elements take up to
    BATCH_BYTES in the batch's spec (an API object must stay well under etcd's limit)."""
    group: list[str] = []
    used = 0
    for key in todo:
        length = len(canonical_json(wanted[key]))
        if group and (len(group) == size or used + length > BATCH_BYTES):
            yield group
            group, used = [], 0
        group.append(key)
        used += length
    if group:
        yield group


def batch_results(batch: Batch, url: str) -> dict[str, Known]:
    """A settled batch's element results, by key (a failed one: those before the failure)."""
    return {k: Known(d, url, cached=False) for k, d in zip(batch.keys, batch.results, strict=False)}


@dataclass(frozen=True)
class Progress:
    """Counts per element (equal elements count once each) and, for `distinct`, per key."""

    total: int
    distinct: int
    cached: int
    computed: int
    running: int
    failed: int
    batches: int
    first_failure: tuple[int, str] | None   # (element index, batch name)

    @property
    def succeeded(self) -> int:
        return self.cached + self.computed

    @property
    def done(self) -> bool:
        return self.succeeded == self.total

    def counts(self) -> dict[str, int]:
        return {"total": self.total, "distinct": self.distinct, "succeeded": self.succeeded, "cached": self.cached,
                "computed": self.computed, "running": self.running, "failed": self.failed, "batches": self.batches}


def progress(keys: Sequence[str], known: Mapping[str, Known], todo: Plan, batches: int) -> Progress:
    """`keys`: each element's key, in element order."""
    cached = computed = running = failed = 0
    first: tuple[int, str] | None = None      # the first element whose own run failed, else the first blocked
    blocked: tuple[int, str] | None = None
    for index, key in enumerate(keys):
        found = known.get(key)
        if found is not None:
            cached += found.cached
            computed += not found.cached
        elif key in todo.failed:
            failed += 1
            blocked = blocked or (index, todo.failed[key])
            first = first or ((index, todo.failed[key]) if key in todo.culprits else None)
        else:
            running += 1
    return Progress(len(keys), len(set(keys)), cached, computed, running, failed, batches, first or blocked)
