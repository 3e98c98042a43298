"""Resolving a ComputeJob's current generation: its store, its inputs, its cache key
(memoplane.cluster.resolve decides), the job manifest, and the assignment's metadata.
A cache hit is served in the same pass: key, lookup, one metadata patch, one status patch.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from memoplane.canonical import canonical_json
from memoplane.cluster import flight, resolve, schedule
from memoplane.cluster import protocol as p
from memoplane.cluster import status as st
from memoplane.cluster.index import job_topic, ref_of
from memoplane.errors import MemoplaneError
from memoplane.jobs import job_to_dict
from memoplane.keys import digest_bytes

from .hits import served, verified_hit
from .lookups import Lookups

if TYPE_CHECKING:
    from .reconciler import Reconciler


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def resolve_job(r: Reconciler, obj: dict[str, Any]) -> dict[str, Any] | None:
    """Resolve the current generation; returns the updated job when it has a key."""
    meta, status = _meta(obj), obj.get("status") or {}
    namespace, generation = str(meta["namespace"]), int(meta.get("generation") or 0)
    now = datetime.now(UTC)
    try:
        found = r.caches.store_for(obj)
    except MemoplaneError as exc:
        r.wait(obj, p.REASON_STORE, str(exc))
        return None
    if isinstance(found, str):
        r.wait(obj, p.REASON_NO_CACHE, found)
        return None
    store, url = found
    profile = str((((obj.get("spec") or {}).get("runtime")) or {}).get("profile") or "python")
    runtime = schedule.runtime_for(r.nodes, profile)
    try:
        outcome = resolve.resolve(obj, runtime, Lookups(r.kube, r.stores, namespace, store), now,
                                  r.cfg.missing_grace_seconds)
    except MemoplaneError as exc:
        r.wait(obj, p.REASON_STORE, str(exc))
        return None
    if isinstance(outcome, resolve.Waiting):
        # Woken when an upstream settles (or at the next resync).
        r.wait_on(obj, [job_topic(namespace, up) for up in resolve.upstream_names(obj)])
        r.wait(obj, outcome.reason, outcome.message)
        return None
    if isinstance(outcome, resolve.Failed):
        r.fail(obj, outcome.reason, outcome.message)
        return None
    job = outcome.job
    manifest = canonical_json(job_to_dict(job))
    digest = digest_bytes(manifest)  # the manifest's blob digest, whether or not it is stored yet
    r.manifests.remember(digest, job)
    key = job.key
    looked = time.monotonic()
    hit = verified_hit(store, key) if flight.policy_of(obj) == "Use" else None
    if hit is None:  # it goes to a node: the agent loads the manifest from the store
        r.manifests.put(store, manifest)
    # The assignment's metadata in one patch, then the status: a crash between them
    # leaves a job whose status is of an older generation, which the next pass resolves
    # again (same digest, same key); the node label is removed, so no agent acts on it.
    updated = r.patch_meta(
        obj, labels={p.KEY_LABEL: p.key_label(key), p.NODE_LABEL: None},
        annotations={p.JOB_DIGEST_ANNOTATION: digest, p.STORE_ANNOTATION: url,
                     p.JOB_GENERATION_ANNOTATION: str(generation)})
    if hit is not None:
        ms = int((time.monotonic() - looked) * 1000)
        done = r.patch(updated, st.resolved_hit(status, generation, key, outcome.input_digests,
                                                hit.digest, hit.result, ms, now))
        served(r, done, hit)
        return None
    updated = r.patch(updated, st.resolved(status, generation, key, outcome.input_digests, now))
    if flight.policy_of(obj) == "Use":
        r.missed(ref_of(updated), str(_meta(updated).get("resourceVersion")))
    r.kube.event(updated, p.REASON_RESOLVED, f"cache key {key[:15]}… (generation {generation})")
    return updated
