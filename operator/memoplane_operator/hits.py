"""Cache hits: looking a key up with verification, and serving what is found."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from memoplane.cas import Hit, Store
from memoplane.cluster import flight
from memoplane.cluster import protocol as p
from memoplane.errors import NotFound, StoreCorrupted

if TYPE_CHECKING:
    from .reconciler import Reconciler

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


def served(r: Reconciler, done: Mapping[str, Any], hit: Hit) -> None:
    """`done` (its status already written) was served `hit`: count it and say so."""
    namespace = str((done.get("metadata") or {})["namespace"])
    saved = float(hit.result.provenance.duration_s)
    r.metrics.cache_hits.inc()
    r.metrics.seconds_saved.inc(saved)
    r.metrics.jobs.labels("cached").inc()
    r.caches.count_hit(namespace, flight.cache_of(done), saved)
    r.kube.event(done, p.REASON_CACHE_HIT, f"result {hit.digest[:15]}… for key "
                                           f"{str((done.get('status') or {}).get('cacheKey'))[:15]}… from the cache, "
                                           f"{saved:.2f}s of compute saved")
