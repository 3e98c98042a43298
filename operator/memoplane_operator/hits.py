"""Cache hits: looking a key up with verification, and serving what is found."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from memoplane.cas import Hit, Store
from memoplane.cluster import protocol as p
from memoplane.cluster.views import job
from memoplane.errors import NotFound, StoreCorrupted

from .context import Context

log = logging.getLogger("memoplane.operator")

DEEP_VERIFY_MAX_BYTES = 64 << 20  # a hit's value blob up to this size is re-hashed in full before it is served


def verified_hit(store: Store, key: str) -> Hit | None:
    """A verified hit, at a cost proportional to what it serves.

    get_ref reads the ref and the result manifest (sealed: its digest is checked, and
    with it the inline value) and checks that every chunk of every blob exists. What
    the status then serves is the result's value: when that is a blob (<= 64 MiB) it is
    re-hashed in full here, so a damaged value is recomputed rather than handed to the
    jobs downstream. stdout, stderr and output files are verified whenever they are
    read, by whoever reads them, and are not re-read for every hit."""
    hit = store.get_ref(key)
    blob = hit.result.value.blob if hit is not None else None
    if hit is None or blob is None or blob.size > DEEP_VERIFY_MAX_BYTES:
        return hit
    try:
        for _ in store.iter_blob(blob.digest):
            pass
    except (NotFound, StoreCorrupted) as exc:
        # The damaged chunk was quarantined by the read, so the ref now fails the
        # presence check and is quarantined too: the key is a miss from here on.
        log.warning("key %s: value %s not served: %s", key[:15], blob.digest[:15], exc)
        return store.get_ref(key)
    return hit


def look_up(store: Store, key: str) -> tuple[Hit | None, int]:
    """A verified lookup and how long it took (ms: the hit's status reports it)."""
    looked = time.monotonic()
    hit = verified_hit(store, key)
    return hit, int((time.monotonic() - looked) * 1000)


def served(ctx: Context, done: Mapping[str, Any], hit: Hit) -> None:
    """`done` (its status already written) was served `hit`: count it and say so."""
    view = job(done)
    saved = float(hit.result.provenance.duration_s)
    ctx.metrics.cache_hits.inc()
    ctx.metrics.seconds_saved.inc(saved)
    ctx.metrics.jobs.labels("cached").inc()
    ctx.caches.count_hit(view.meta.namespace, view.spec.result_cache, saved)
    ctx.event(done, p.REASON_CACHE_HIT, f"result {hit.digest[:15]}… for key {str(view.status.cache_key)[:15]}… "
                                        f"from the cache, {saved:.2f}s of compute saved")
