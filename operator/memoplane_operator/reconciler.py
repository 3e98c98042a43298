"""The operator's ComputeJob reconciler: one worker over a de-duplicating queue of jobs.

kopf watches ComputeJobs and ResultCaches and enqueues what changed, with the body the
watch delivered (the latest state known: no re-read); a resync every `resync_seconds`
revisits every unfinished job, refreshes the agents' leases and, less often, lists every
job and refreshes the ResultCaches' stats. A job that waits for another (same key, or an
upstream) is woken when that one settles (memoplane.cluster.index). One worker makes every
decision in turn, single-flight decisions list the key's jobs afresh, so single flight is
sound (see memoplane.cluster.flight), and nothing lives only in memory: a restarted
operator picks up where the API server says things are.

Every decision is a pure function in memoplane.cluster; this module and the ones it calls
read, call them and write (labels and annotations first, then status, both with
resourceVersion preconditions: a 409 re-queues the job):

  workqueue.py   the queue, the worker thread, the resync timer
  resolution.py  a job's generation -> its cache key (and a hit served at once)
  admission.py   a resolved job -> served, waiting for its key's leader, or scheduled
  hits.py        verified cache lookups and serving a hit
  caches.py      ResultCaches: a job's store, hit/miss counters, cache status
  mapper.py      spec.map parents and their sub-tasks
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from memoplane.cluster import flight, mapping, resolve, schedule
from memoplane.cluster import protocol as p
from memoplane.cluster import status as st
from memoplane.cluster.index import JobIndex, Ref, Topic, ref_of, settled
from memoplane.cluster.kube import Kube
from memoplane.cluster.metrics import OperatorMetrics
from memoplane.cluster.stores import Stores

from . import mapper
from .admission import admit, check_node
from .caches import LANE as CACHE_LANE
from .caches import ResultCaches
from .manifests import Manifests
from .resolution import resolve_job
from .workqueue import Lane, WorkQueue

log = logging.getLogger("memoplane.operator")

JOB_LANE = "job"


@dataclass
class OperatorConfig:
    patterns: list[str] = field(default_factory=list)
    lease_namespace: str = "memoplane-system"
    resync_seconds: float = 2.0
    stats_seconds: float = 30.0
    full_resync_seconds: float = 30.0   # how often every job is listed (the index's safety net)
    resolvers: int = 4                  # threads resolving jobs and serving hits (0: on the worker)
    missing_grace_seconds: float = resolve.MISSING_GRACE_SECONDS
    backoff_base: float = 1.0


class Conflict(Exception):
    """The object changed while we decided: decide again."""


@dataclass
class _Pass:
    """Reads shared by the decisions of one resync pass (hundreds of jobs may wait on one
    key): the single-flight list of a key, until this pass schedules one of its jobs, and
    the (store, key)s found missing from the cache (a hit arriving meanwhile is served by the
    wake-up of the job that computed it, or by the next pass)."""

    groups: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    misses: set[tuple[str, str]] = field(default_factory=set)


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def _status(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("status") or {}


class Reconciler:
    def __init__(self, config: OperatorConfig, kube: Kube, stores: Stores,
                 metrics: OperatorMetrics | None = None) -> None:
        self.cfg = config
        self.kube = kube
        self.stores = stores
        self.metrics = metrics or OperatorMetrics()
        self.tracker = schedule.LeaseTracker()
        self.nodes: list[schedule.NodeView] = []
        self.load: dict[str, int] = defaultdict(int)
        self.index = JobIndex()   # guarded by the work queue's lock
        # Job -> the body to decide on (None: read it first); a queued body superseded by a
        # write of ours is skipped. ResultCaches go first.
        self._jobs = Lane(JOB_LANE, accept=lambda body: body is None or not self.index.stale(body))
        self.work = WorkQueue("reconciler", [Lane(CACHE_LANE), self._jobs], config.resync_seconds,
                              max(60.0, 10 * config.resync_seconds), log)
        self._cond = self.work.cond
        self.caches = ResultCaches(kube, stores, self.work, self.watched)
        self.manifests = Manifests()
        # never: each periodic task is due at once, however long ago the monotonic clock started
        self._last_full = float("-inf")
        self._last_leases = float("-inf")
        self._last_stats = float("-inf")
        self.memo: _Pass | None = None
        # Resolution (key, cache lookup, serving a hit) runs on a small pool: it needs no
        # single-flight order, and a burst of hits is bound by round trips, not CPU.
        self._resolvers = ThreadPoolExecutor(config.resolvers, thread_name_prefix="resolve") \
            if config.resolvers > 0 else None
        self._missed: dict[Ref, str] = {}   # job -> resourceVersion written after its key missed the cache

    @property
    def healthy_at(self) -> float:
        return self.work.healthy_at

    # -- queue -----------------------------------------------------------------------------

    def watched(self, namespace: str) -> bool:
        return p.namespace_matches(self.cfg.patterns, namespace)

    def enqueue(self, namespace: str, name: str, body: dict[str, Any] | None = None) -> None:
        """Decide on the job soon: on `body` (a watch event's), else on a fresh read."""
        with self._cond:
            if body is not None:
                verdict = self.index.observe(body)
                if verdict == "skip":
                    return
                if verdict == "settled":  # nothing to decide; what waited for it may proceed
                    self._jobs.forget((namespace, name))
                    self._wake(body)
                    return
            self._jobs.put((namespace, name), body)
            self._cond.notify()

    def deleted(self, body: dict[str, Any]) -> None:
        with self._cond:
            self.index.forget(ref_of(body))
            self._jobs.remove(ref_of(body))
            self._wake(body)

    def _wake(self, body: Mapping[str, Any]) -> None:
        for ref in self.index.wake(body):  # caller holds _cond
            self._jobs.put(ref, self.index.open.get(ref))
        self._cond.notify()

    def enqueue_cache(self, namespace: str, name: str, body: dict[str, Any] | None = None) -> None:
        self.caches.changed(namespace, name, body)

    def cache_deleted(self, namespace: str, name: str) -> None:
        self.caches.deleted(namespace, name)

    def start(self) -> None:
        self.kube.ensure_namespace(self.cfg.lease_namespace)
        self.work.start(self._handle, self.resync)

    def stop(self) -> None:
        self.work.stop()
        if self._resolvers is not None:
            self._resolvers.shutdown(wait=True, cancel_futures=True)
        self.kube.flush_events()

    def live(self) -> bool:
        return self.work.live()

    def _handle(self, lane: str, ref: Ref, body: dict[str, Any] | None) -> None:
        try:
            if lane == CACHE_LANE:
                self.caches.reconcile(*ref)
            elif body is not None:
                self.reconcile(body)
            else:
                self.reconcile_named(*ref)
        except Conflict:
            self.enqueue(*ref)

    # -- leases ----------------------------------------------------------------------------

    def refresh_nodes(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_leases < min(1.0, self.cfg.resync_seconds):
            return
        leases = self.kube.list_leases(self.cfg.lease_namespace)
        self.nodes = self.tracker.observe(leases, now, datetime.now(UTC))
        self._last_leases = now
        self.metrics.nodes.set(len(schedule.live_nodes(self.nodes)))

    # -- resync ----------------------------------------------------------------------------

    def resync(self) -> None:
        self.refresh_nodes(force=True)
        if time.monotonic() - self._last_full >= self.cfg.full_resync_seconds:
            self._last_full = time.monotonic()
            listed, _ = self.kube.list(p.COMPUTEJOBS)
            with self._cond:
                self.index.replace_open([o for o in listed if self.watched(str(_meta(o).get("namespace")))])
        with self._cond:
            items = list(self.index.open.values())
        self.load = defaultdict(int, schedule.assigned_load(items))
        self.memo = _Pass()
        try:
            for ref in [ref_of(o) for o in sorted(items, key=lambda o: str(_meta(o).get("creationTimestamp")))]:
                if self.work.stopping:
                    return
                with self._cond:
                    # The latest body; a job in the queue is decided there, soon, on its newest event.
                    current = None if self._jobs.queued(ref) else self.index.open.get(ref)
                if current is None or settled(current):
                    continue
                try:
                    self.reconcile(current)
                except Conflict:
                    self.enqueue(*ref)
                except Exception:
                    log.exception("reconcile %s/%s failed", *ref)
        finally:
            self.memo = None
        if time.monotonic() - self._last_stats >= self.cfg.stats_seconds:
            self._last_stats = time.monotonic()
            self.caches.refresh_stats()

    # -- ComputeJob ---------------------------------------------------------------------------

    def reconcile_named(self, namespace: str, name: str) -> None:
        obj = self.kube.get(p.COMPUTEJOBS, namespace, name)
        if obj is None:
            with self._cond:
                self.index.forget((namespace, name))
            return
        with self._cond:
            self.index.observe(obj)
        self.reconcile(obj)

    def reconcile(self, obj: dict[str, Any]) -> None:
        started = time.monotonic()
        try:
            self._reconcile(obj)
        finally:
            self.metrics.reconcile.observe(time.monotonic() - started)

    def _reconcile(self, obj: dict[str, Any]) -> None:
        meta = _meta(obj)
        if meta.get("deletionTimestamp") or not self.watched(str(meta.get("namespace"))):
            return
        if settled(obj):
            return
        self.refresh_nodes()
        if mapping.is_map(obj):  # a parent of sub-tasks: see mapper.py
            mapper.reconcile_map(self, obj)
            return
        phase = _status(obj).get("phase")
        if flight.needs_resolution(obj):
            if self._resolvers is not None:
                ref = ref_of(obj)
                with self._cond:
                    self._jobs.hold(ref)
                self._resolvers.submit(self._resolve_on_pool, ref, obj)
                return
            resolved = resolve_job(self, obj)  # serves a cache hit itself
            if resolved is None:
                return
            obj = resolved
            phase = _status(obj).get("phase")
        with self._cond:
            looked_up = self._missed.pop(ref_of(obj), None) == meta.get("resourceVersion")
        if phase in (p.SCHEDULED, p.RUNNING):
            check_node(self, obj)
        elif phase in (p.PENDING, p.WAITING):
            admit(self, obj, looked_up)

    def _resolve_on_pool(self, ref: Ref, obj: dict[str, Any]) -> None:
        """Resolve on a pool thread; a job that must be admitted goes back to the worker."""
        then: dict[str, Any] | None = None
        requeue = False
        try:
            then = resolve_job(self, obj)
            requeue = then is not None
        except Conflict:
            requeue = True  # decide again on a fresh read
        except Exception:
            log.exception("resolve %s/%s failed", *ref)
        finally:
            with self._cond:
                # An event that arrived while resolving is decided on, else our result.
                self._jobs.release(ref, then, requeue)
                self._cond.notify()

    def missed(self, ref: Ref, resource_version: str) -> None:
        """The job's key missed the cache in the write that produced `resource_version`:
        admission need not look it up again in this state."""
        with self._cond:
            self._missed[ref] = resource_version

    # -- writes --------------------------------------------------------------------------------

    def _written(self, write: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run a write with a resourceVersion precondition; a 404 or 409 means decide again."""
        try:
            out = write()
        except ApiException as exc:
            if exc.status in (404, 409):
                raise Conflict() from None
            raise
        with self._cond:
            self.index.wrote(out)
        return out

    def patch_meta(self, obj: Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
        meta = _meta(obj)
        return self._written(lambda: self.kube.patch_meta(
            p.COMPUTEJOBS, str(meta["namespace"]), str(meta["name"]),
            resource_version=meta.get("resourceVersion"), **kwargs))

    def patch(self, obj: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
        meta = _meta(obj)
        return self._written(lambda: self.kube.patch_status(
            p.COMPUTEJOBS, str(meta["namespace"]), str(meta["name"]), patch, meta.get("resourceVersion")))

    def wait(self, obj: dict[str, Any], reason: str, message: str) -> None:
        status = _status(obj)
        generation = int(_meta(obj).get("generation") or 0)
        if st.already_waiting(status, generation, reason, message):
            return
        done = self.patch(obj, st.waiting(status, generation, reason, message, datetime.now(UTC)))
        if status.get("reason") != reason:
            self.kube.event(done, reason, message)

    def wait_on(self, obj: Mapping[str, Any], topics: list[Topic]) -> None:
        """Revisit `obj` as soon as any of `topics` settles (a job name or a key)."""
        with self._cond:
            for topic in topics:
                self.index.wait_for(ref_of(obj), topic)

    def fail(self, obj: dict[str, Any], reason: str, message: str, extra: Mapping[str, Any] | None = None) -> None:
        generation = int(_meta(obj).get("generation") or 0)
        patch = st.failed(_status(obj), generation, reason, message, datetime.now(UTC))
        done = self.patch(obj, {**patch, **(extra or {})})
        self.metrics.jobs.labels("failed").inc()
        self.kube.event(done, st.camel(reason), message, warning=True)
