"""Cache hits: looking a key up with verification and the cache's trust policy, and serving
what is found. A stored result the policy refuses is a miss (the job computes) and a
Warning Event `Untrusted` says why."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from memoplane.cas import Hit, Store
from memoplane.cas import audit as audit_log
from memoplane.cluster import lineage
from memoplane.cluster import protocol as p
from memoplane.cluster.views import job
from memoplane.errors import MemoplaneError, NotFound, StoreCorrupted
from memoplane.history import build as history
from memoplane.history import events, new_run_id
from memoplane.jobs import Job
from memoplane.trust import Lookup, TrustPolicy, trusted_hit

from .caches import Target
from .context import Context

log = logging.getLogger("memoplane.operator")

DEEP_VERIFY_MAX_BYTES = 64 << 20  # a hit's value blob up to this size is re-hashed in full before it is served


def verified_hit(store: Store, key: str, policy: TrustPolicy) -> Lookup:
    """A trusted, verified hit, at a cost proportional to what it serves.

    trusted_hit reads the ref and the result manifest (sealed: its digest is checked, and
    with it the inline value), checks that every chunk of every blob exists, and judges the
    result's attestations with `policy`. What the status then serves is the result's value:
    when that is a blob (<= 64 MiB) it is re-hashed in full here, so a damaged value is
    recomputed rather than handed to the jobs downstream. stdout, stderr and output files
    are verified whenever they are read, by whoever reads them, and are not re-read for
    every hit."""
    found = trusted_hit(store, key, policy)
    blob = found.hit.result.value.blob if found.hit is not None else None
    if blob is None or blob.size > DEEP_VERIFY_MAX_BYTES:
        return found
    try:
        for _ in store.iter_blob(blob.digest):
            pass
    except (NotFound, StoreCorrupted) as exc:
        # The damaged chunk was quarantined by the read, so the ref now fails the
        # presence check and is quarantined too: the key is a miss from here on.
        log.warning("key %s: value %s not served: %s", key[:15], blob.digest[:15], exc)
        return trusted_hit(store, key, policy)
    return found


def look_up(ctx: Context, obj: Mapping[str, Any], store: Store, key: str, policy: TrustPolicy
            ) -> tuple[Hit | None, int, tuple[str, ...]]:
    """A trusted, verified lookup for `obj`, how long it took (ms: the hit's status reports
    it) and the trusted keys that attest the hit. A refused stored result is announced on `obj`
    and is a miss."""
    looked = time.monotonic()
    found = verified_hit(store, key, policy)
    ms = int((time.monotonic() - looked) * 1000)
    if found.hit is not None:
        ctx.usage.hit(store, key, found.hit.result.logical_size)
    if found.refused and found.verdict is not None:
        ctx.metrics.untrusted.inc()
        ctx.event(obj, p.REASON_UNTRUSTED, f"stored result for key {key[:15]}… not served, recomputing: "
                                           f"{found.verdict.reason}", warning=True)
        log.warning("key %s: stored result refused: %s", key[:15], found.verdict.reason)
    return found.hit, ms, found.verdict.signers if found.verdict is not None and found.hit is not None else ()


def record_hit(ctx: Context, obj: Mapping[str, Any], resolved: Job | None, hit: Hit, target: Target,
               signers: tuple[str, ...], started: float) -> str | None:
    """Append the record of serving `hit` to `obj` (before the status that shows it: the run id
    goes into that write) to the job's own cache's store; its run id, None when not kept."""
    try:
        resolved = resolved or ctx.manifests.job_of(obj, target.store)
        run_id = new_run_id()
        record = lineage.job_record(
            obj, resolved, run_id=run_id, result=hit.digest, result_size=hit.result.logical_size,
            node=p.OPERATOR_COMPONENT, signer=",".join(signers) or None, started=started, ended=time.time(),
            cached=True, compute_seconds=float(hit.result.provenance.duration_s))
    except (MemoplaneError, ValueError, KeyError) as exc:
        log.warning("%s/%s: no run record for the hit: %s", *job(obj).ref, exc)
        return None
    kept = history.append(target.store, record)
    events.run_settled(record, start=True)
    return run_id if kept else None


def served(ctx: Context, done: Mapping[str, Any], hit: Hit, target: Target) -> None:
    """`done` (its status already written) was served `hit` from `target.lookup`: count it, say so,
    and audit a read across namespaces (in the owner's store, if it keeps a log)."""
    view = job(done)
    if target.access.guest and target.lookup is not None:
        target.lookup.audit(audit_log.SHARED_READ, key=hit.key, result=hit.digest, reader=view.meta.namespace,
                            cache=f"{view.meta.namespace}/{view.spec.result_cache}")
    saved = float(hit.result.provenance.duration_s)
    ctx.metrics.cache_hits.inc()
    ctx.metrics.seconds_saved.inc(saved)
    ctx.metrics.jobs.labels("cached").inc()
    ctx.caches.count_hit(view.meta.namespace, view.spec.result_cache, saved)
    ctx.event(done, p.REASON_CACHE_HIT, f"result {hit.digest[:15]}… for key {str(view.status.cache_key)[:15]}… "
                                        f"from the cache, {saved:.2f}s of compute saved")
