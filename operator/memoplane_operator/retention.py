"""Retention on its own thread: each ResultCache's usage index kept (hits and writes the operator
sees, appended to the store's usage log), its size figures in status, its `spec.retention`
applied (decisions in memoplane.cluster.retention) and its store swept.

Nothing here runs on the reconciler's worker or holds the work queue's lock: the reconciler
only hands uses to the UsageRecorder (an in-memory list) and pokes the worker when a
ResultCache changes. Work per pass is bounded: at most `evictions_per_pass` evictions and
`index_reads_per_pass` ref reads per cache (plus a listing of the refs while the index is checked
against them, every `reindex_seconds`); the sweep (gc: a full mark of the store) runs on this
thread too, for caches with retention, after a pass that evicted or every `gc_seconds`. Before
it, the store's run records older than `maxAge` are dropped; the results and blobs the others name
are roots (an SQLite index of the records per store in the temp directory: each sweep reads only
the records it has not seen). A cache that owns its location and has a cold tier (spec.tiers) has
what was not read for tiers[0].after moved there every `demote_seconds` (cas.tiers.demote; an Event
Demoted says how much).
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException

from memoplane.cas import Store
from memoplane.cas.usage import EVICT, HIT, UsageIndex, Use
from memoplane.cluster import protocol as p
from memoplane.cluster import retention as rt
from memoplane.cluster.kube import Kube
from memoplane.cluster.sharing import Access
from memoplane.cluster.stores import Stores
from memoplane.cluster.views import cache
from memoplane.errors import MemoplaneError
from memoplane.history.index import HistoryIndex
from memoplane.settings import OperatorSettings, history_index_path

log = logging.getLogger("memoplane.operator")


class UsageRecorder:
    """Hits and writes, batched per store in memory and appended to its usage log every
    `interval` seconds by its own thread, and on `flush` (the worker's, and at stop): an
    operator that dies loses at most the last unflushed batch."""

    def __init__(self, stores: Stores, interval: float) -> None:
        self.stores, self.interval = stores, interval
        self._lock = threading.Lock()      # guards _pending
        self._flushing = threading.Lock()  # one append at a time: batch names stay in write order
        self._pending: dict[int, tuple[Store, list[Use]]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hit(self, store: Store, key: str, size: int) -> None:
        self._add(store, Use(key, HIT, time.time(), size))

    def written(self, body: Mapping[str, Any]) -> None:
        """A settled job's write, if it computed a result; a map batch's, one per element it computed."""
        found = rt.written_uses(body)
        if found is None or not found[1]:
            return
        try:
            store = self.stores.by_url(found[0])
        except (MemoplaneError, ValueError) as exc:  # a status naming no store we can open: nothing to keep
            log.warning("write of key %s not recorded: %s", found[1][0].key[:15], exc)
            return
        self._add(store, *found[1])

    def _add(self, store: Store, *uses: Use) -> None:
        with self._lock:
            self._pending.setdefault(id(store), (store, []))[1].extend(uses)

    def flush(self) -> None:
        with self._flushing:
            with self._lock:
                pending, self._pending = self._pending, {}
            for store, uses in pending.values():
                try:
                    store.record_uses(uses)
                except MemoplaneError as exc:  # the store is down: these uses are lost, not the operator
                    log.warning("usage of %s not recorded (%d uses): %s", store.describe(), len(uses), exc)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="usage", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.flush()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.flush()
            except Exception:
                log.exception("usage flush failed")


class RetentionWorker:
    def __init__(self, settings: OperatorSettings, kube: Kube, stores: Stores, recorder: UsageRecorder,
                 watched: Callable[[str], bool], access: Callable[[dict[str, Any]], Access],
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg, self.kube, self.stores, self.recorder, self.watched = settings, kube, stores, recorder, watched
        self.access = access   # what the cache's namespace may do in its location (sharing)
        self.clock = clock     # wall time for demotion (tests move it instead of waiting)
        self._indexes: dict[str, UsageIndex] = {}   # store URL -> its index as of the last pass
        self._swept: dict[str, float] = {}          # store URL -> monotonic time of its last sweep
        self._demoted: dict[str, float] = {}        # store URL -> monotonic time of its last demotion
        self._saved: dict[str, tuple[tuple[Any, ...], float]] = {}  # store URL -> (_signature, when) last saved
        self._reindexed: dict[str, float] = {}      # store URL -> monotonic time its refs were last checked
        self._unindexed: dict[str, dict[str, float]] = {}  # store URL -> refs its index lacks, left to read
        self._histories: dict[str, HistoryIndex] = {}      # store URL -> the index of its run records
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.passes = 0

    def poke(self) -> None:
        """A ResultCache changed: run a pass soon."""
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_pass()
            except Exception:
                log.exception("retention pass failed")
            self._wake.wait(self.cfg.retention_seconds)
            self._wake.clear()

    def run_pass(self) -> None:
        caches, _ = self.kube.list(p.RESULTCACHES)
        caches = [rc for rc in caches if self.watched(cache(rc).meta.namespace)]
        if not caches:
            return
        # Roots: the jobs that exist (listed only when some cache has retention).
        jobs = self.kube.list(p.COMPUTEJOBS)[0] if any(rt.retention_of(rc) for rc in caches) else []
        self.recorder.flush()
        for rc in caches:
            if self._stop.is_set():
                return
            try:
                self._cache_pass(rc, jobs)
            except MemoplaneError as exc:
                log.warning("retention of ResultCache %s/%s: %s", cache(rc).meta.namespace, cache(rc).meta.name, exc)
            except Exception:  # one cache's surprise (its store holds what anyone wrote) never stops the others'
                log.exception("retention of ResultCache %s/%s failed", cache(rc).meta.namespace, cache(rc).meta.name)
        self.passes += 1

    def _cache_pass(self, rc: dict[str, Any], jobs: list[dict[str, Any]]) -> None:
        access = self.access(rc)
        if not access.read:   # a location the namespace may not read is neither described nor evicted
            return
        view = cache(rc)
        url = view.store_url
        store = self.stores.of_cache(view, owner=not access.guest)
        index = self._current_index(store, url)
        # Only the owner's retention evicts: a namespace granted another's location never removes its entries.
        retention = None if access.guest else rt.retention_of(rc)
        evicted = self._evict(store, index, retention, rt.job_roots(jobs, url)) \
            if retention is not None else []
        if retention is not None and (evicted or self._sweep_due(url)):
            self._sweep(store, index, url, retention)
        if not access.guest and self._demotion_due(url):
            self._demote(rc, store, url)
        self._save(store, index, url, force=bool(evicted))
        fields = rt.stats_fields(index, view.status)
        if fields:
            self._patch(view.meta.namespace, view.meta.name, fields)
        if evicted and retention is not None:
            freed = sum(size for _, size in evicted)
            self.kube.event(rc, p.REASON_EVICTED, rt.eviction_message(len(evicted), freed, retention))

    def _current_index(self, store: Store, url: str) -> UsageIndex:
        """The store's index with the uses logged since applied. Every `reindex_seconds` (and at
        start) it is checked against the store's refs, which others (the CLI, embedded runs) may
        have written or deleted: a bounded number of refs read per pass until done, then the
        bytes on the store are measured (a listing)."""
        index = store.usage(self._indexes.get(url))
        self._indexes[url] = index
        if time.monotonic() - self._reindexed.get(url, float("-inf")) >= self.cfg.reindex_seconds:
            self._reindexed[url] = time.monotonic()
            self._unindexed[url] = store.refs_to_index(index)
        missing = self._unindexed.get(url)
        if missing is not None:
            left = store.index_refs(index, missing, self.cfg.index_reads_per_pass)
            if left:
                log.info("usage index of %s: %d refs left to index", url, left)
            else:
                del self._unindexed[url]
                self._measure(index, store.stored_bytes())
        return index

    def _evict(self, store: Store, index: UsageIndex, retention: rt.Retention, roots: set[str]
               ) -> list[tuple[str, int]]:
        now = time.time()
        chosen = rt.choose_evictions(index.entries, retention, roots, now, self.cfg.retention_grace_seconds,
                                     self.cfg.evictions_per_pass)
        out = []
        for key in chosen:
            size = index.entries[key].size
            store.evict_ref(key)
            index.apply([Use(key, EVICT, now)])
            out.append((key, size))
        return out

    def _sweep_due(self, url: str) -> bool:
        return time.monotonic() - self._swept.get(url, float("-inf")) >= self.cfg.gc_seconds

    def _demotion_due(self, url: str) -> bool:
        return time.monotonic() - self._demoted.get(url, float("-inf")) >= self.cfg.demote_seconds

    def _demote(self, rc: dict[str, Any], store: Store, url: str) -> None:
        """Move what was not read for spec.tiers[0].after to the cache's cold tier (cas/tiers.py)."""
        report = store.demote(now=self.clock(), limit=self.cfg.demotions_per_pass)
        if report is None:   # no cold tier
            return
        if not report.left:   # else the next pass goes on
            self._demoted[url] = time.monotonic()
        log.info("%s: %d objects (%d bytes) moved to its cold tier, %d kept hot, %d failed, %d left", url,
                 report.moved, report.bytes_moved, report.kept_hot, report.failed, report.left)
        if report.moved or report.failed:
            self.kube.event(rc, p.REASON_DEMOTED, f"moved {report.moved} objects ({report.bytes_moved} bytes) "
                            f"not read for {report.after:.0f} s to {report.cold}"
                            + (f"; {report.failed} copies did not read back equal and stayed" if report.failed
                               else ""), warning=bool(report.failed))

    def _save(self, store: Store, index: UsageIndex, url: str, force: bool) -> None:
        """Compact the usage log into the snapshot: at once after evictions (they are only in
        memory until then), else when something changed and `compact_seconds` passed (uses
        are safe in the log meanwhile)."""
        signature = _signature(index)
        saved, at = self._saved.get(url, ((), float("-inf")))
        if signature != saved and (force or time.monotonic() - at >= self.cfg.compact_seconds):
            store.save_usage(index)
            self._saved[url] = (signature, time.monotonic())

    def _sweep(self, store: Store, index: UsageIndex, url: str, retention: rt.Retention) -> None:
        """Delete what no ref reaches; roots listed now (a job served since the pass began is one),
        and what the run records kept within maxAge name (older records are dropped first)."""
        self._swept[url] = time.monotonic()
        history = self._histories.get(url) or self._histories.setdefault(url, _history_index(store))
        dropped = rt.prune_history(store, history, retention, time.time())
        kept_results, kept_blobs = rt.kept_history_roots(store, history)
        results = rt.job_results(self.kube.list(p.COMPUTEJOBS)[0], url) | kept_results
        blobs = rt.seed_blobs(self.kube.list(p.GMEMSEEDS)[0], url) | kept_blobs
        if dropped:
            log.info("%s: %d run records older than maxAge dropped", url, len(dropped))
        log.info("sweeping %s (%d results and %d blobs of jobs and seeds as roots)", url, len(results), len(blobs))
        report = store.gc(self.cfg.gc_grace_seconds, results=results, blobs=blobs)
        self._measure(index, report.kept_bytes)
        log.info("swept %s: %d objects (%d bytes) deleted, %d young kept; packs: %d deleted, %d condemned, "
                 "%d chunks repacked, %d bytes reclaimed", url, report.deleted, report.deleted_bytes,
                 report.kept_young, report.packs.packs_deleted, report.packs.packs_condemned,
                 report.packs.chunks_repacked, report.packs.bytes_reclaimed)

    @staticmethod
    def _measure(index: UsageIndex, stored: int) -> None:
        logical = index.logical_bytes
        index.stored_per_logical = stored / logical if logical else None

    def _patch(self, namespace: str, name: str, fields: dict[str, Any]) -> None:
        try:
            self.kube.patch_status(p.RESULTCACHES, namespace, name, fields)
        except ApiException as exc:
            if exc.status != 404:
                raise


def _history_index(store: Store) -> HistoryIndex:
    """A store's run records indexed in the temp directory (the chart's emptyDir): a cache, kept
    across restarts of the container, synced with the store before each use."""
    name = history_index_path(None, store.describe()).name
    return HistoryIndex(Path(tempfile.gettempdir()) / "memoplane-history" / name)


def _signature(index: UsageIndex) -> tuple[Any, ...]:
    """What changes when the index does (uses merged, refs indexed, evictions, a measurement)."""
    return index.through, len(index.entries), index.logical_bytes, index.evicted, index.stored_per_logical
