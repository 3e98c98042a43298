"""Retention decisions (pure): which cache keys a ResultCache evicts, what it must never evict
(roots), and the status figures counted from its usage index (memoplane.cas.usage).

Eviction is by last use (a write or a hit), never by write time: `maxAge` evicts what was not
used for that long; `maxBytes` evicts the least recently used until the logical bytes of what
stays fit (logical bytes bound what is stored: deduplication and compression only shrink it).
Nothing written or used within the grace period goes, nor any root.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from memoplane.api.common import duration_seconds, parse_quantity
from memoplane.cas import Store
from memoplane.cas.usage import WRITE, Entry, UsageIndex, Use
from memoplane.history.index import HistoryIndex, prune

from . import protocol as p
from .mapping import batch_keys, is_batch
from .resolve import parse_time
from .views import job


@dataclass(frozen=True)
class Retention:
    max_age: float | None  # seconds
    max_bytes: int | None


def retention_of(rc: Mapping[str, Any]) -> Retention | None:
    """spec.retention (None: keep everything)."""
    spec = (rc.get("spec") or {}).get("retention") or {}
    age, size = spec.get("maxAge"), spec.get("maxBytes")
    if age is None and size is None:
        return None
    return Retention(None if age is None else duration_seconds(str(age)),
                     None if size is None else int(parse_quantity(str(size))))


def choose_evictions(entries: Mapping[str, Entry], retention: Retention, roots: set[str], now: float,
                     grace_seconds: float, limit: int) -> list[str]:
    """At most `limit` keys to evict, least recently used first: unused for longer than maxAge,
    then whatever keeps the rest above maxBytes. Roots and keys written or used within the grace
    period are never chosen (their bytes still count)."""
    total = sum(e.size for e in entries.values())
    out: list[str] = []
    for key, entry in sorted(entries.items(), key=lambda kv: (kv[1].last_used, kv[0])):
        if len(out) >= limit:
            break
        if key in roots or now - max(entry.last_used, entry.written) < grace_seconds:
            continue
        too_old = retention.max_age is not None and now - entry.last_used > retention.max_age
        too_big = retention.max_bytes is not None and total > retention.max_bytes
        if too_old or too_big:
            out.append(key)
            total -= entry.size
    return out


def job_roots(jobs: Iterable[Mapping[str, Any]], store_url: str) -> set[str]:
    """The cache keys of the jobs in the cluster whose results live in `store_url` (a job that
    exists may still be read from, or be served again)."""
    roots: set[str] = set()
    for obj in jobs:
        view = job(obj)
        if view.status.cache_key and view.result_store_url in (store_url, None):
            roots.add(view.status.cache_key)
    return roots


def job_results(jobs: Iterable[Mapping[str, Any]], store_url: str) -> set[str]:
    """The result digests the jobs in the cluster name in `store_url`: roots of the sweep."""
    return {d for o in jobs if (d := job(o).status.result_digest) and job(o).result_store_url == store_url}


def seed_blobs(seeds: Iterable[Mapping[str, Any]], store_url: str) -> set[str]:
    """The overlay blobs of the GMemSeeds stored in `store_url`: roots of the sweep."""
    out: set[str] = set()
    for seed in seeds:
        status = seed.get("status") or {}
        blob = status.get("overlayBlob") or {}
        if status.get("store") == store_url and blob.get("digest"):
            out.add(str(blob["digest"]))
    return out


def kept_history_roots(store: Store, index: HistoryIndex) -> tuple[set[str], set[str]]:
    """(result digests, blob digests) the store's run records name: roots of the sweep, so an old
    version stays readable while its record is kept. Read from `index`, synced first: a pass reads
    only the records it has not seen (and lists their ids), never every record again."""
    index.sync(store)
    return index.roots()


def prune_history(store: Store, index: HistoryIndex, retention: Retention, now: float) -> list[str]:
    """Drop the run records older than maxAge (none without one), so the results only they kept can go."""
    return prune(store, index, retention.max_age, now) if retention.max_age is not None else []


def stats_fields(index: UsageIndex, status: Mapping[str, Any]) -> dict[str, Any]:
    """The ResultCache status figures kept from the usage index (no listing of the store)."""
    logical = index.logical_bytes
    ratio = index.stored_per_logical
    stored = round(logical * ratio) if ratio is not None else None
    out: dict[str, Any] = {"entries": len(index.entries), "logicalBytes": logical, "evictedEntries": index.evicted}
    if stored is not None:
        out["storedBytes"] = stored
        out["dedupRatio"] = round(logical / stored, 4) if stored else 1.0
    if index.last_eviction is not None:
        out["lastEvictionTime"] = datetime.fromtimestamp(index.last_eviction, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {k: v for k, v in out.items() if status.get(k) != v}


def eviction_message(evicted: int, freed: int, retention: Retention) -> str:
    why = [f"maxAge {retention.max_age:g}s" if retention.max_age is not None else "",
           f"maxBytes {retention.max_bytes}" if retention.max_bytes is not None else ""]
    return f"evicted {evicted} entries ({freed} logical bytes) by {' and '.join(w for w in why if w)}"



def written_use(obj: Mapping[str, Any]) -> tuple[str, Use] | None:
    """A settled job that computed its result wrote it: (its store's URL, the write), dated by the
    job's completion (so seeing the job again, e.g. after a restart, changes nothing). A job served
    from the cache wrote nothing (its hit was recorded when it was looked up), nor did one whose
    result was not cached (policy Bypass, or its cache at its quota: no ref)."""
    view = job(obj)
    status = view.status
    url, key, size = view.result_store_url, status.cache_key, status.result.get("size")
    if status.phase != p.SUCCEEDED or status.cached or not (url and key and status.result_digest):
        return None
    if view.spec.policy == "Bypass" or not view.assigned.cache_result:
        return None
    done = parse_time(status.raw.get("completionTime"))
    at = done.timestamp() if done is not None else time.time()
    return url, Use(key, WRITE, at, int(size or 0))


def written_uses(obj: Mapping[str, Any]) -> tuple[str, list[Use]] | None:
    """What a settled job wrote (written_use); a settled map batch (mapping.py): each element it
    computed, under the element's key, sized as its agent reported (status.map.sizes), dated by the
    batch's completion. A failed batch wrote the elements before the one that failed."""
    if not is_batch(obj):
        found = written_use(obj)
        return (found[0], [found[1]]) if found is not None else None
    view = job(obj)
    status = view.status
    reported = status.raw.get("map") or {}
    results, sizes = list(reported.get("results") or ()), list(reported.get("sizes") or ())
    url = view.assigned.store_url
    if status.phase not in (p.SUCCEEDED, p.FAILED) or not (url and results):
        return None
    if view.spec.policy == "Bypass" or not view.assigned.cache_result:
        return None
    done = parse_time(status.raw.get("completionTime"))
    at = done.timestamp() if done is not None else time.time()
    sizes += [0] * (len(results) - len(sizes))   # an agent that reports no sizes: the reindex measures them
    return url, [Use(key, WRITE, at, int(size or 0))
                 for key, _, size in zip(batch_keys(obj), results, sizes, strict=False)]
