"""spec.map: one cached sub-task per element of a list input (pure decisions).

A map job (the parent) owns one child ComputeJob per distinct element of its `over`
input. A child is the parent's spec without `map` and with the `over` input replaced by
`{name: over, value: element}`, so its cache key is derived exactly as if the input were
that element, and it is resolved, looked up, single-flighted, scheduled and retried like
any job. The child's name is the parent's plus a digest of the element: an element keeps
its child whatever its position, so adding one element to the list creates one child and
leaves the others untouched (incremental work), and equal elements share one child.

The parent's result is the list of the children's values in element order; its key is a
digest of the children's keys in that order (the same list of elements over the same code
gives the same key). Children carry the label PARENT_LABEL=<parent uid> and an owner
reference, so they are listed by label and, on a cluster with a garbage collector, deleted
with the parent; their results outlive them in the cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..canonical import canonical_json
from ..keys import digest_bytes
from . import protocol as p
from .index import settled
from .views import job, meta_of, section

PARENT_LABEL = f"{p.GROUP}/map-parent"            # value: the parent's uid
SPEC_ANNOTATION = f"{p.GROUP}/map-spec"          # digest of the spec the parent wrote for the child
REASON_SUBTASK_FAILED = "SubTaskFailed"
REASON_MAPPING = "Mapping"
REASON_NAME_TAKEN = "SubTaskNameTaken"
NAME_MAX = 253
DIGEST_CHARS = 10                                # hex digits of the element digest in a child's name


def is_map(obj: Mapping[str, Any]) -> bool:
    return job(obj).spec.map_over is not None


def over_of(obj: Mapping[str, Any]) -> str:
    return str(job(obj).spec.map_over)


def over_input(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    over = over_of(obj)
    return next((item for item in job(obj).spec.inputs if item.get("name") == over), None)


def elements_problem(value: Any, over: str) -> str | None:
    if not isinstance(value, list):
        return f"spec.map.over: input '{over}' is a {type(value).__name__}, not a list: map over a JSON list"
    return None


def element_digest(element: Any) -> str:
    return digest_bytes(canonical_json(element))


def child_name(parent: str, element: Any) -> str:
    suffix = "-" + element_digest(element)[3:3 + DIGEST_CHARS]
    return parent[: NAME_MAX - len(suffix)].rstrip("-.") + suffix


def child_spec(parent: Mapping[str, Any], element: Any) -> dict[str, Any]:
    spec = {k: v for k, v in section(parent, "spec").items() if k != "map"}
    over = over_of(parent)
    spec["inputs"] = [({"name": over, "value": element} if item.get("name") == over else item)
                      for item in spec.get("inputs") or ()]
    return spec


def spec_digest(spec: Mapping[str, Any]) -> str:
    return digest_bytes(canonical_json(spec))


def child_manifest(parent: Mapping[str, Any], element: Any) -> dict[str, Any]:
    meta = meta_of(parent)
    spec = child_spec(parent, element)
    return {
        "apiVersion": p.API_VERSION, "kind": "ComputeJob",
        "metadata": {
            "name": child_name(meta.name, element), "namespace": meta.namespace,
            "labels": {PARENT_LABEL: meta.uid},
            "annotations": {SPEC_ANNOTATION: spec_digest(spec)},
            "ownerReferences": [{"apiVersion": p.API_VERSION, "kind": "ComputeJob", "name": meta.name,
                                 "uid": meta.uid, "controller": True, "blockOwnerDeletion": False}],
        },
        "spec": spec,
    }


def owned_by(child: Mapping[str, Any], parent: Mapping[str, Any]) -> bool:
    return meta_of(child).labels.get(PARENT_LABEL) == meta_of(parent).uid


def current_spec(child: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """The child holds the spec the parent wants now (else the parent rewrites it)."""
    return meta_of(child).annotations.get(SPEC_ANNOTATION) == meta_of(wanted).annotations.get(SPEC_ANNOTATION)


@dataclass
class Plan:
    """What the parent should do with its children now."""

    create: list[dict[str, Any]] = field(default_factory=list)    # manifests
    update: list[dict[str, Any]] = field(default_factory=list)    # manifests of children to rewrite
    delete: list[str] = field(default_factory=list)               # names no element maps to any more
    taken: list[str] = field(default_factory=list)                # names held by jobs not ours


def plan(parent: Mapping[str, Any], elements: list[Any], children: Mapping[str, Mapping[str, Any]],
         existing: Mapping[str, Mapping[str, Any]] | None = None) -> Plan:
    """`children`: this parent's children by name (listed by label); `existing`: other
    jobs found under a wanted name (a name conflict)."""
    out = Plan()
    wanted: dict[str, dict[str, Any]] = {}
    for element in elements:
        manifest = child_manifest(parent, element)
        wanted.setdefault(manifest["metadata"]["name"], manifest)
    for name, manifest in wanted.items():
        child = children.get(name)
        if child is None:
            other = (existing or {}).get(name)
            if other is not None and not owned_by(other, parent):
                out.taken.append(name)
            else:
                out.create.append(manifest)
        elif not current_spec(child, manifest):
            out.update.append(manifest)
    out.delete = sorted(set(children) - set(wanted))
    return out


@dataclass(frozen=True)
class Progress:
    total: int
    succeeded: int
    cached: int
    failed: int
    first_failure: tuple[int, str] | None   # (element index, child name)
    waiting_on: list[str]                    # unfinished children

    @property
    def done(self) -> bool:
        return self.succeeded == self.total

    def counts(self) -> dict[str, int]:
        return {"total": self.total, "succeeded": self.succeeded, "cached": self.cached, "failed": self.failed}


def progress(parent: Mapping[str, Any], elements: list[Any], children: Mapping[str, Mapping[str, Any]]
             ) -> Progress:
    """Counts per element (equal elements count once each): a child counts when it is
    settled for the spec the parent wants now."""
    succeeded = cached = failed = 0
    first: tuple[int, str] | None = None
    waiting: dict[str, None] = {}
    for index, element in enumerate(elements):
        manifest = child_manifest(parent, element)
        name = manifest["metadata"]["name"]
        child = children.get(name)
        if child is None or not current_spec(child, manifest) or not settled(child):
            waiting[name] = None
            continue
        status = job(child).status
        if status.phase == p.SUCCEEDED:
            succeeded += 1
            cached += status.cached
        else:
            failed += 1
            first = first or (index, name)
    return Progress(len(elements), succeeded, cached, failed, first, list(waiting))


def map_manifest(over: str, child_keys: list[str]) -> dict[str, Any]:
    """What the parent's key is the digest of: its children's keys in element order."""
    return {"v": 1, "map": over, "keys": child_keys}


def map_key(over: str, child_keys: list[str]) -> str:
    return digest_bytes(canonical_json(map_manifest(over, child_keys)))
