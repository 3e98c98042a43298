"""The operator's ComputeJob reconciler: one worker over a de-duplicating queue of jobs.

kopf watches ComputeJobs and ResultCaches and enqueues what changed, with the body the
watch delivered (the latest state known: no re-read); a resync every `resync_seconds`
revisits every unfinished job, refreshes the agents' leases and, less often, lists every
job and refreshes the ResultCaches' stats. A job that waits for another (same key, or an
upstream) is woken when that one settles (memoplane.cluster.index); a Ready job whose
upstream is recomputed is held, not Ready, until it resolves again (memoplane.cluster.propagate).
One worker makes every decision in turn, single-flight decisions list the key's jobs afresh, so single flight is
sound (see memoplane.cluster.flight), and nothing lives only in memory: a restarted
operator picks up where the API server says things are.

Every decision is a pure function in memoplane.cluster (decide.py); this module and the
ones it calls read, call them and apply what they return through a Context (context.py:
labels and annotations first, then status, both with resourceVersion preconditions: a 409
re-queues the job). None of them imports this module:

  workqueue.py   the queue, the worker thread, the resync timer
  context.py     what the modules below may do: read, write a job, post Events, wait, fail
  resolution.py  a job's generation -> its cache key (and a hit served at once)
  admission.py   a resolved job -> served, waiting for its key's leader, or scheduled
  hits.py        verified cache lookups and serving a hit
  caches.py      ResultCaches: a job's store, hit/miss counters, cache status
  retention.py   usage of each cache's keys, its stats and retention, on their own threads
  agent_keys.py  the agents' own keys, from their Leases, remembered in a ConfigMap
  mapper.py      spec.map parents and their sub-tasks
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from memoplane.cluster import flight, mapping, objectinputs, propagate, schedule
from memoplane.cluster import protocol as p
from memoplane.cluster.index import JobIndex, Ref, ref_of, settled
from memoplane.cluster.kube import Kube
from memoplane.cluster.metrics import OperatorMetrics
from memoplane.cluster.replicas import is_replicated
from memoplane.cluster.spotcheck import awaiting_verdict
from memoplane.cluster.stores import Stores
from memoplane.cluster.views import job
from memoplane.errors import MemoplaneError
from memoplane.settings import OperatorSettings
from memoplane.trust import SigningKey
from memoplane.trust.audit import sign_head

from . import chunker, mapper
from .admission import admit, check_node
from .agent_keys import AgentKeys
from .caches import LANE as CACHE_LANE
from .caches import ResultCaches
from .context import Conflict, Context, Pass
from .job_manifests import JobManifests
from .replicas import reconcile_replicated
from .resolution import Admissible, check_inputs, hold_job, resolve_job
from .retention import RetentionWorker, UsageRecorder
from .spotchecks import judge_check
from .workqueue import Lane, WorkQueue

log = logging.getLogger("memoplane.operator")

JOB_LANE = "job"


class Reconciler:
    def __init__(self, settings: OperatorSettings, kube: Kube, stores: Stores, signer: SigningKey,
                 metrics: OperatorMetrics | None = None) -> None:
        self.cfg = settings
        self.patterns = p.parse_patterns(settings.watch_namespaces)
        self.kube = kube
        self.stores = stores
        self.metrics = metrics or OperatorMetrics()
        self.tracker = schedule.LeaseTracker()
        self.index = JobIndex()   # guarded by the work queue's lock
        # Job -> the body to decide on (None: read it first); a queued body superseded by a
        # write of ours is skipped. ResultCaches go first.
        self._jobs = Lane(JOB_LANE, accept=lambda body: body is None or not self.index.stale(body))
        self.work = WorkQueue("reconciler", [Lane(CACHE_LANE), self._jobs], settings.resync_seconds,
                              max(60.0, 10 * settings.resync_seconds), log)
        self._cond = self.work.cond
        self.agent_keys = AgentKeys(kube, settings.lease_namespace, signer.public)
        self.caches = ResultCaches(kube, stores, self.work, self.watched, lambda: self.agent_keys.cluster)
        self.usage = UsageRecorder(stores, settings.usage_flush_seconds)
        self.retention = RetentionWorker(settings, kube, stores, self.usage, self.watched,
                                         self.caches.access_of)
        self.ctx = Context(settings, kube, stores, self.caches, JobManifests(), self.metrics, self.index, self._cond,
                           signer, objectinputs.checked_grants(settings),
                           self.usage)
        # never: each periodic task is due at once, however long ago the monotonic clock started
        self._last_full = float("-inf")
        self._last_leases = float("-inf")
        self._last_stats = float("-inf")
        # Resolution (key, cache lookup, serving a hit) runs on a small pool: it needs no
        # single-flight order, and a burst of hits is bound by round trips, not CPU.
        self._resolvers = ThreadPoolExecutor(settings.resolvers, thread_name_prefix="resolve") \
            if settings.resolvers > 0 else None
        self._carried: dict[Ref, Admissible] = {}   # job -> what resolving it found, for admission
        self._checks: set[Ref] = set()   # settled jobs whose fromJob inputs are to be checked (propagate.needs_check)

    @property
    def healthy_at(self) -> float:
        return self.work.healthy_at

    # -- queue -----------------------------------------------------------------------------

    def watched(self, namespace: str) -> bool:
        return p.namespace_matches(self.patterns, namespace)

    def enqueue(self, namespace: str, name: str, body: dict[str, Any] | None = None) -> None:
        """Decide on the job soon: on `body` (a watch event's), else on a fresh read."""
        if body is not None and settled(body):
            self.usage.written(body)  # outside the lock: it may open the store
        with self._cond:
            if body is not None:
                verdict = self.index.observe(body)
                if verdict == "skip":
                    return
                self._propagate(body)
                if verdict == "open":
                    self._checks.discard((namespace, name))  # checked when it settles again
                if verdict == "settled":  # nothing to decide; what waited for it may proceed
                    self._jobs.forget((namespace, name))
                    self._wake(body)
                    if propagate.needs_check(body):
                        self._checks.add((namespace, name))
                    elif not awaiting_verdict(body) and self.ctx.edges.hold(body) is None:
                        return  # a settled spot check is judged on the worker (spotchecks.py), a held job held there
            self._jobs.put((namespace, name), body)
            self._cond.notify()

    def _propagate(self, body: dict[str, Any]) -> None:
        """Remember the job's edges and state; if it is not Ready, the Ready jobs that use
        its result are held on the worker, at once (memoplane.cluster.propagate). Caller holds _cond."""
        self.ctx.edges.observe(body)
        for ref in self.ctx.edges.to_hold(ref_of(body)):
            self._jobs.put(ref, None)  # read afresh: settled bodies are not kept

    def deleted(self, body: dict[str, Any]) -> None:
        with self._cond:
            self.index.forget(ref_of(body))
            self.ctx.edges.forget(ref_of(body))  # its downstream jobs keep what they have: results outlive jobs
            self._jobs.remove(ref_of(body))
            self._carried.pop(ref_of(body), None)
            self._checks.discard(ref_of(body))
            self._wake(body)
        self.ctx.maps.pop(job(body).meta.uid, None)   # a map parent's memory (mapper.py)

    def _wake(self, body: Mapping[str, Any]) -> None:
        for ref in self.index.wake(body):  # caller holds _cond
            self._jobs.put(ref, self.index.open.get(ref))
        self._cond.notify()

    def enqueue_cache(self, namespace: str, name: str, body: dict[str, Any] | None = None) -> None:
        self.caches.changed(namespace, name, body)
        self.retention.poke()

    def cache_deleted(self, namespace: str, name: str) -> None:
        self.caches.deleted(namespace, name)

    def start(self) -> None:
        self.kube.ensure_namespace(self.cfg.lease_namespace)
        self.refresh_nodes(force=True)  # the agents' keys before the first policy is made
        self.work.start(self._handle, self.resync)
        self.usage.start()
        self.retention.start()

    def stop(self) -> None:
        self.work.stop()
        self.retention.stop()
        self.usage.stop()
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
        if self.agent_keys.observe(leases):  # a new agent key: every cache's policy is made again
            self.caches.forget_policies()
        self.ctx.fleet.nodes = self.tracker.observe(leases, now, datetime.now(UTC))
        self._last_leases = now
        self.metrics.nodes.set(len(schedule.live_nodes(self.ctx.fleet.nodes)))

    # -- resync ----------------------------------------------------------------------------

    def resync(self) -> None:
        self.refresh_nodes(force=True)
        if time.monotonic() - self._last_full >= self.cfg.full_resync_seconds:
            self._last_full = time.monotonic()
            self.caches.forget_policies()  # a Secret or ConfigMap of trusted keys may have changed
            listed, _ = self.kube.list(p.COMPUTEJOBS)
            with self._cond:
                mine = [o for o in listed if self.watched(job(o).meta.namespace)]
                self.index.replace_open(mine)
                self.ctx.edges.replace(mine)
                for ref in sorted({d for o in mine for d in self.ctx.edges.to_hold(ref_of(o))}):
                    self._jobs.put(ref, None)
        with self._cond:
            items = list(self.index.open.values())
        self.ctx.fleet.load = defaultdict(int, schedule.assigned_load(items))
        self.ctx.memo = Pass()
        try:
            for ref in [ref_of(o) for o in sorted(items, key=lambda o: job(o).meta.creation_timestamp)]:
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
            self.ctx.memo = None
        if time.monotonic() - self._last_stats >= self.cfg.stats_seconds:
            self._last_stats = time.monotonic()
            self.caches.refresh_stats()
            self._sign_audit_heads()

    def _sign_audit_heads(self) -> None:
        """A signed checkpoint of every audit log kept in a store this operator uses: what was
        recorded up to now can no longer be edited, dropped or reordered unseen."""
        for store in self.stores.opened():
            try:
                if store.audit_log.started():
                    sign_head(store, self.ctx.signer, time.time())
            except MemoplaneError as exc:
                log.warning("audit log of %s not signed: %s", store.describe(), exc)

    # -- ComputeJob ---------------------------------------------------------------------------

    def reconcile_named(self, namespace: str, name: str) -> None:
        obj = self.kube.get(p.COMPUTEJOBS, namespace, name)
        if obj is None:
            with self._cond:
                self.index.forget((namespace, name))
                self.ctx.edges.forget((namespace, name))
            return
        with self._cond:
            self.index.observe(obj)
            self.ctx.edges.observe(obj)
        self.reconcile(obj)

    def reconcile(self, obj: dict[str, Any]) -> None:
        started = time.monotonic()
        try:
            self._reconcile(obj)
        finally:
            self.metrics.reconcile.observe(time.monotonic() - started)

    def _reconcile(self, obj: dict[str, Any]) -> None:
        view = job(obj)
        if view.meta.deleting or not self.watched(view.meta.namespace):
            return
        if view.settled:
            if awaiting_verdict(obj):
                judge_check(self.ctx, obj)
            with self._cond:
                hold = self.ctx.edges.hold(obj)
                check = view.ref in self._checks
                self._checks.discard(view.ref)
            if hold is not None:  # an upstream it used is being recomputed: not Ready until it resolves again
                hold_job(self.ctx, obj, hold)
            elif check:  # it just settled: were its fromJob inputs recomputed meanwhile?
                check_inputs(self.ctx, obj)
            return
        self.refresh_nodes()
        if mapping.is_map(obj):  # a parent of sub-tasks: see mapper.py
            mapper.reconcile_map(self.ctx, obj)
            return
        if mapping.is_chunk_map(obj):  # a tree of leaf and combine sub-tasks: see chunker.py
            chunker.reconcile_chunks(self.ctx, obj)
            return
        if is_replicated(obj):  # a parent of replicas: see replicas.py
            reconcile_replicated(self.ctx, obj)
            return
        if flight.needs_resolution(obj):
            if self._resolvers is not None:
                with self._cond:
                    self._jobs.hold(view.ref)
                self._resolvers.submit(self._resolve_on_pool, view.ref, obj)
                return
            carried = resolve_job(self.ctx, obj)  # serves a cache hit itself
            if carried is not None:
                admit(self.ctx, carried.body, carried)
            return
        with self._cond:
            carried = self._carried.pop(view.ref, None)
        if carried is not None and carried.resource_version != view.meta.resource_version:
            carried = None  # the job changed since: decide on what it is now
        phase = view.status.phase
        if phase in (p.SCHEDULED, p.RUNNING):
            check_node(self.ctx, obj)
        elif phase in (p.PENDING, p.WAITING):
            admit(self.ctx, obj, carried)

    def _resolve_on_pool(self, ref: Ref, obj: dict[str, Any]) -> None:
        """Resolve on a pool thread; a job that must be admitted goes back to the worker,
        with what resolving it found."""
        then: dict[str, Any] | None = None
        requeue = False
        try:
            carried = resolve_job(self.ctx, obj)
            if carried is not None:
                then, requeue = carried.body, True
                with self._cond:
                    self._carried[ref] = carried
        except Conflict:
            requeue = True  # decide again on a fresh read
        except Exception:
            log.exception("resolve %s/%s failed", *ref)
        finally:
            with self._cond:
                # An event that arrived while resolving is decided on, else our result.
                self._jobs.release(ref, then, requeue)
                self._cond.notify()
