"""`memoplane gmem create | fetch | write | stats NAME --cluster [-n NS]`: a GMemSeed on the
cluster of the current kubeconfig, its overlay in the object store (MEMOPLANE_S3_*).

The operator is the seed's only writer (memoplane.cluster.seeds). `write` puts its batch
into the seed's inbox in the store, touches the seed so the operator applies it at once,
and returns when the operator has sealed it and updated the status (so a job created
afterwards gets the new digest). `fetch` computes values here from the spec and the overlay
the status names, checked against the status digest: exactly what a job receives.
"""

from __future__ import annotations

import argparse
import json
import secrets
import time
from typing import Any

import numpy as np

from ..api import gmemseed_manifest
from ..cas import Store
from ..cluster import protocol as p
from ..cluster import seeds as sd
from ..errors import InputError, MemoplaneError, NotFound
from ..gmem import GMem, GMemParams, GMemStore
from ..gmem.transfer import params_from_json, verified_overlay
from .cluster import open_cluster_store
from .kube import GROUP, VERSION, api_call, current_namespace, custom_objects

POLL_SECONDS = 0.2


def _get(api: Any, namespace: str, name: str) -> dict[str, Any]:
    return dict(api_call(f"gmemseed {namespace}/{name}", api.get_namespaced_custom_object,
                         GROUP, VERSION, namespace, p.GMEMSEEDS, name))


def _params(obj: dict[str, Any]) -> GMemParams:
    params = sd.parse_seed(obj)
    if isinstance(params, str):
        raise InputError(f"gmemseed {obj['metadata']['name']} is invalid: {params}", "fix its spec")
    return params


def _store(obj: dict[str, Any]) -> Store:
    url = (obj.get("status") or {}).get("store") or p.store_url(*sd.location(obj["metadata"]["namespace"]))
    return open_cluster_store(url)


def _summary(obj: dict[str, Any]) -> dict[str, Any]:
    meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    ready: dict[str, Any] = next((c for c in status.get("conditions") or () if c.get("type") == "Ready"), {})
    return {"name": meta["name"], "namespace": meta["namespace"], "seed": spec.get("seed"),
            "dtype": spec.get("dtype", "float64"), "layers": spec.get("layers", []),
            "digest": status.get("digest"), "version": status.get("version"),
            "overlayEntries": status.get("overlayEntries"), "ready": ready.get("status") == "True",
            "message": ready.get("message")}


def create(args: argparse.Namespace, params: GMemParams) -> int:
    api = custom_objects()
    namespace = current_namespace(args.namespace)
    body = gmemseed_manifest(args.name, namespace, params.to_json())
    api_call("create gmemseed", api.create_namespaced_custom_object, GROUP, VERSION, namespace, p.GMEMSEEDS, body)
    obj = _wait(api, namespace, args.name, lambda o: v if isinstance(v := sd.seed_view(o), str) else None,
                args.timeout)
    print(json.dumps(_summary(obj), sort_keys=True))
    return 0


def stats(args: argparse.Namespace) -> int:
    api = custom_objects()
    print(json.dumps(_summary(_get(api, current_namespace(args.namespace), args.name)), sort_keys=True))
    return 0


def fetch(args: argparse.Namespace) -> np.ndarray:
    api = custom_objects()
    obj = _get(api, current_namespace(args.namespace), args.name)
    view = sd.seed_view(obj)
    if isinstance(view, str):
        raise MemoplaneError(view, f"wait for it: kubectl wait --for=condition=Ready gmemseed/{args.name}")
    data = None
    if view.overlay_blob is not None:
        with _store(obj) as store:
            data = store.get_bytes(view.overlay_blob[0])
    overlay = verified_overlay(view.params, data, view.digest)
    p_ = params_from_json(view.params)
    g = GMem(p_.seed, p_.dtype, p_.layers, overlay=overlay)
    if args.addr:
        return g.fetch_many(np.array([int(a, 0) for a in args.addr], dtype=np.uint64))
    return g.fetch_range(args.offset, args.count)


def write(args: argparse.Namespace, addrs: list[int], values: list[Any]) -> int:
    api = custom_objects()
    namespace = current_namespace(args.namespace)
    obj = _get(api, namespace, args.name)
    params = _params(obj)
    data = sd.encode_batch(params, np.array(addrs, dtype=np.uint64), np.array(values))
    with _store(obj) as store:
        gstore = GMemStore.of(store)
        name = gstore.queue_batch(sd.store_name(obj["metadata"]["uid"]), data, time.time_ns(), secrets.token_hex(6))
        # A touch makes the operator look now (its resync would find the batch later anyway).
        api_call("annotate gmemseed", api.patch_namespaced_custom_object, GROUP, VERSION, namespace,
                 p.GMEMSEEDS, args.name, {"metadata": {"annotations": {sd.WRITE_ANNOTATION: name.rsplit("/", 1)[1]}}})
        deadline = time.monotonic() + args.timeout
        while gstore.is_queued(name):
            if time.monotonic() > deadline:
                raise MemoplaneError(f"the write is queued ({name}) but the operator has not applied it "
                                     f"within {args.timeout:g}s",
                                     "it is applied when the operator runs: check the operator's log")
            time.sleep(POLL_SECONDS)
    print(json.dumps(_summary(_get(api, namespace, args.name)), sort_keys=True))
    return 0


def _wait(api: Any, namespace: str, name: str, why_not: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            obj = _get(api, namespace, name)
        except NotFound:
            obj = None
        reason = why_not(obj) if obj is not None else "it does not exist yet"
        if reason is None and obj is not None:
            return obj
        if time.monotonic() > deadline:
            raise MemoplaneError(f"gmemseed {namespace}/{name} is not Ready after {timeout:g}s: {reason}",
                                 "check the operator (kubectl describe gmemseed)")
        time.sleep(POLL_SECONDS)

