"""Test doubles of memoplane's own interfaces, shared by the test modules: `from fakes import ...`
(pytest puts tests/ on sys.path when it loads tests/conftest.py).

- FakeKube: memoplane.cluster.kube.Kube over dicts in memory, with the API server's rules that
  the callers rely on (resourceVersion preconditions, merge patches, 404 and 409).
- DelegatingBackend: a real Backend behind a hook that runs before every call naming an object.
- damage_packed_chunks, packed_copy: where a filesystem store keeps a chunk, and damaging it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from kubernetes.client.exceptions import ApiException

from memoplane.cas import Provenance, ResultManifest, Store
from memoplane.cas.backend import Backend, ObjectInfo
from memoplane.cas.digests import object_name
from memoplane.cas.packs import Location, parse_pack, read_range
from memoplane.cluster import protocol as p
from memoplane.cluster.kube import Kube

Objects = list[dict[str, Any]]   # outside FakeKube: there `list` is FakeKube.list


class Event(NamedTuple):
    name: str       # the object's name
    reason: str
    message: str
    warning: bool


class FakeKube(Kube):
    """The Kube calls the operator, the agent and the seed reconciler make, over dicts.

    Objects live in `objects` under (plural, namespace, name); tests put and change them
    there directly. Every accepted write gives the object a new resourceVersion, greater
    than any before (as etcd's revision); a write with a resourceVersion that is not the
    current one is refused with 409. Only the calls below are faked: the others need the
    ApiClient this fake does not have and fail with AttributeError."""

    def __init__(self) -> None:  # no ApiClient: nothing reaches a server
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.writes: list[tuple[str, str, str]] = []     # accepted writes: (verb, plural, name)
        self.events: list[Event] = []
        self.leases: Objects = []
        self.status_attempts = 0                        # patch_status calls, refused ones too
        self.refuse_status_from: int | None = None     # answer 500 from this patch_status call on (1: the first)
        self._last_version = 0

    def _stamp(self, obj: dict[str, Any]) -> dict[str, Any]:
        self._last_version = max(self._last_version, int(obj["metadata"].get("resourceVersion") or 0)) + 1
        obj["metadata"]["resourceVersion"] = str(self._last_version)
        return copy.deepcopy(obj)

    def _current(self, plural: str, namespace: str, name: str, resource_version: str | None) -> dict[str, Any]:
        obj = self.objects.get((plural, namespace, name))
        if obj is None:
            raise ApiException(status=404, reason="Not Found")
        if resource_version is not None and resource_version != obj["metadata"].get("resourceVersion"):
            raise ApiException(status=409, reason="Conflict")
        return obj

    # -- objects: custom ones under their plural, core ones under "configmaps" and "secrets" -----

    def get_config_map(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get("configmaps", namespace, name)

    def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get("secrets", namespace, name)

    def add_config_map_entries(self, namespace: str, name: str, data: Mapping[str, str],
                               labels: Mapping[str, str]) -> None:
        key = ("configmaps", namespace, name)
        obj = self.objects.setdefault(key, {"metadata": {"name": name, "namespace": namespace,
                                                         "labels": dict(labels)}, "data": {}})
        obj.setdefault("data", {}).update(data)
        self._stamp(obj)
        self.writes.append(("patch", "configmaps", name))

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        obj = self.objects.get((plural, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list(self, plural: str, namespace: str | None = None, label_selector: str | None = None
             ) -> tuple[Objects, str]:
        """`label_selector`: one label=value, or None."""
        label, _, value = (label_selector or "").partition("=")
        return [copy.deepcopy(o) for (pl, ns, _), o in self.objects.items()
                if pl == plural and namespace in (None, ns)
                and (not label or (o["metadata"].get("labels") or {}).get(label) == value)], "1"

    def create(self, plural: str, namespace: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        name = body["metadata"]["name"]
        if (plural, namespace, name) in self.objects:
            return None
        obj = copy.deepcopy(dict(body))
        obj["metadata"].update(namespace=namespace, uid=f"uid-{name}", generation=1,
                               creationTimestamp=f"2026-01-02T03:04:{len(self.objects):02d}Z")
        self.objects[(plural, namespace, name)] = obj
        self.writes.append(("create", plural, name))
        return self._stamp(obj)

    def patch_meta(self, plural: str, namespace: str, name: str, labels: Mapping[str, str | None] | None = None,
                   annotations: Mapping[str, str | None] | None = None,
                   resource_version: str | None = None) -> dict[str, Any]:
        obj = self._current(plural, namespace, name, resource_version)
        for field, values in (("labels", labels), ("annotations", annotations)):
            _merge(obj["metadata"].setdefault(field, {}), values or {})
        self.writes.append(("meta", plural, name))
        return self._stamp(obj)

    def patch_status(self, plural: str, namespace: str, name: str, patch: Mapping[str, Any],
                     resource_version: str | None = None) -> dict[str, Any]:
        self.status_attempts += 1
        if self.refuse_status_from is not None and self.status_attempts >= self.refuse_status_from:
            raise ApiException(status=500, reason="Internal Server Error")
        obj = self._current(plural, namespace, name, resource_version)
        _merge(obj.setdefault("status", {}), patch)
        self.writes.append(("status", plural, name))
        return self._stamp(obj)

    # -- core objects ----------------------------------------------------------------------

    def event(self, obj: Mapping[str, Any], reason: str, message: str, *, warning: bool = False,
              component: str = p.OPERATOR_COMPONENT, host: str | None = None) -> None:
        self.events.append(Event(obj["metadata"]["name"], reason, message, warning))

    def flush_events(self, timeout: float = 5.0) -> None:
        pass   # events are recorded at once

    def list_leases(self, namespace: str) -> Objects:
        return copy.deepcopy(self.leases)

    def ensure_namespace(self, name: str) -> None:
        pass

    def namespace_labels(self) -> dict[str, dict[str, str]]:
        """Namespaces are objects under ("namespaces", "", name)."""
        return {name: dict(o["metadata"].get("labels") or {})
                for (plural, _, name), o in self.objects.items() if plural == "namespaces"}


def _merge(into: dict[str, Any], patch: Mapping[str, Any]) -> None:
    """A JSON merge patch one level deep: None removes a key, anything else replaces it."""
    for key, value in patch.items():
        if value is None:
            into.pop(key, None)
        else:
            into[key] = copy.deepcopy(value)


class DelegatingBackend:
    """A Backend that forwards every call to `inner`, first calling `before(op, name)` for each
    call that names one object (op: the method's name). Subclasses override `before`."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    def before(self, op: str, name: str) -> None:
        pass

    def put(self, name: str, data: bytes) -> None:
        self.before("put", name)
        self.inner.put(name, data)

    def put_if_absent(self, name: str, data: bytes | Callable[[], bytes]) -> bool:
        self.before("put_if_absent", name)
        return self.inner.put_if_absent(name, data)

    def create(self, name: str, data: bytes) -> bool:
        self.before("create", name)
        return self.inner.create(name, data)

    def get(self, name: str) -> bytes:
        self.before("get", name)
        return self.inner.get(name)

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        self.before("get_range", name)
        return read_range(self.inner, name, offset, length)

    def exists(self, name: str) -> bool:
        self.before("exists", name)
        return self.inner.exists(name)

    def delete(self, name: str) -> None:
        self.before("delete", name)
        self.inner.delete(name)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def flush(self) -> None:
        self.inner.flush()

    def describe(self) -> str:
        return self.inner.describe()


def computed_result(store: Store, key: str, value: Any, node: str, started: float, runtime: str) -> ResultManifest:
    """A result as a node's execution makes it (value stored, empty stdout and stderr, the node's
    name and times in its provenance and meta), not yet put: for tests of replicas and spot checks."""
    empty = store.put_bytes(b"")
    prov = Provenance(key, {}, runtime, node, started, started + 1, 1.0)
    return ResultManifest(store.put_value(value), empty, empty, prov, meta={"exit_code": 0, "isolation": {node: 1}})


def history_record(job: str, at: int, result: str | None, inputs: tuple[Any, ...] = (), *, key: str = "",
                   components: dict[str, Any] | None = None, cached: bool = False, **extra: Any) -> Any:
    """A run record of job "ns/name" (or an unnamespaced name) made at `at` ns, for history tests."""
    from memoplane.history import JobIdentity, RunRecord, new_run_id

    namespace, _, name = job.rpartition("/")
    return RunRecord(new_run_id(at), JobIdentity(namespace, name), key or f"b3:key-{job}-{at}", result, inputs,
                     extra.pop("code", "b3:code"), extra.pop("runtime", "b3:rt"), extra.pop("env", {}), "node-a",
                     None, at / 1e9, at / 1e9, cached, 1.0, components=components or {}, **extra)


def packed_copy(store: Store, root: Path, chunk: str) -> tuple[Path, Location]:
    """The pack file under a filesystem store's `root` holding `chunk`, and where in it."""
    store.chunks.refresh()
    loc = store.chunks.index.locations(chunk)[0]
    return root / object_name("packs", loc.pack), loc


def damage_packed_chunks(root: Path) -> int:
    """Flip a byte in the middle of every chunk of every pack under a filesystem store's `root`
    (the packs' own trailers say where the chunks are); returns how many were damaged."""
    damaged = 0
    for pack in (root / "packs").rglob("*"):
        if not pack.is_file() or pack.name.startswith("."):
            continue
        data = bytearray(pack.read_bytes())
        for _, offset, length, _ in parse_pack(bytes(data)):
            data[offset + length // 2] ^= 0xFF
            damaged += 1
        pack.write_bytes(bytes(data))
    return damaged
