"""The operator's reconciler: one worker thread over a de-duplicating queue of jobs.

kopf watches ComputeJobs and ResultCaches and enqueues what changed, with the body the
watch delivered (the latest state known: no re-read); a resync every `resync_seconds`
revisits every unfinished job, refreshes the agents' leases and, less often, lists every
job and refreshes the ResultCaches' stats. A job that waits for another (same key, or an
upstream) is woken when that one settles (memoplane.cluster.index). One worker makes every
decision in turn, single-flight decisions list the key's jobs afresh, so single flight is
sound (see memoplane.cluster.flight), and nothing lives only in memory: a restarted
operator picks up where the API server says things are.

A cache hit is served in the pass that resolves the job: key, lookup, one metadata patch
and one status patch; the single-flight list is read only when the key is not cached.

Every decision is a pure function in memoplane.cluster; this module reads, calls them and
writes (labels and annotations first, then status, both with resourceVersion
preconditions: a 409 re-queues the job).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from memoplane.api.conditions import mark_ready, mark_stalled
from memoplane.canonical import canonical_json
from memoplane.cas import Hit, Store
from memoplane.cluster import flight, mapping, resolve, schedule
from memoplane.cluster import protocol as p
from memoplane.cluster import status as st
from memoplane.cluster.index import JobIndex, Ref, Topic, job_topic, key_topic, ref_of, settled
from memoplane.cluster.kube import Kube
from memoplane.cluster.metrics import OperatorMetrics
from memoplane.cluster.retry import retry_at
from memoplane.cluster.stores import Stores
from memoplane.errors import MemoplaneError, NotFound, StoreCorrupted
from memoplane.jobs import BlobInput, Input, Job, JsonInput, job_from_dict, job_to_dict
from memoplane.keys import digest_bytes

from . import mapper

log = logging.getLogger("memoplane.operator")

DEEP_VERIFY_MAX_BYTES = 64 << 20  # a hit's value blob up to this size is re-hashed in full before it is served
MANIFEST_REFRESH_SECONDS = 60.0   # a job manifest put longer ago than this is put again before scheduling


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


class Lookups:
    """resolve.Lookups over the API server and the job's store."""

    def __init__(self, kube: Kube, stores: Stores, namespace: str, store: Store) -> None:
        self.kube, self.stores, self.namespace, self.store = kube, stores, namespace, store

    def get_job(self, name: str) -> Mapping[str, Any] | None:
        return self.kube.get(p.COMPUTEJOBS, self.namespace, name)

    def get_config_map(self, name: str) -> Mapping[str, Any] | None:
        return self.kube.get_config_map(self.namespace, name)

    def result_input(self, result_digest: str, store_url: str | None) -> Input:
        source = self.stores.by_url(store_url) if store_url else self.store
        try:
            value = source.get_result(result_digest).value
            if value.blob is None:
                return JsonInput(value.inline)
            if value.kind == "json":
                return JsonInput(json.loads(source.get_bytes(value.blob.digest)))
            if source is not self.store:
                ref = self.store.put_bytes(source.get_bytes(value.blob.digest))
            else:
                source.blob_manifest(value.blob.digest)  # present and sealed
                ref = value.blob
            return BlobInput(ref.digest, ref.size)
        except (NotFound, StoreCorrupted) as exc:
            raise resolve.LookupError_("UpstreamResultUnavailable", str(exc)) from None
        except MemoplaneError as exc:
            raise resolve.LookupError_(p.REASON_STORE, str(exc)) from None

    def object_input(self, bucket: str, key: str) -> BlobInput | None:
        try:
            stream = self.stores.open_object(bucket, key)
            if stream is None:
                return None
            with stream:
                ref = self.store.put_stream(stream)
        except MemoplaneError as exc:
            raise resolve.LookupError_(p.REASON_STORE, str(exc)) from None
        return BlobInput(ref.digest, ref.size)

    def put_bytes(self, data: bytes) -> BlobInput:
        ref = self.store.put_bytes(data)
        return BlobInput(ref.digest, ref.size)

    def get_seed(self, name: str) -> Mapping[str, Any] | None:
        return self.kube.get(p.GMEMSEEDS, self.namespace, name)

    def seed_overlay(self, digest: str, store_url: str) -> BlobInput:
        from .gmemseed import seed_overlay
        return seed_overlay(self.stores, self.store, digest, store_url)


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
        # Job -> the body to decide on (None: read it first). Guarded by _cond, as is index.
        self._queue: OrderedDict[Ref, dict[str, Any] | None] = OrderedDict()
        self._caches: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self.index = JobIndex()
        self._rcs: dict[tuple[str, str], dict[str, Any]] = {}   # ResultCaches as last seen
        self._last_resync = 0.0
        self._last_full = 0.0
        self._last_leases = 0.0
        self._last_stats = 0.0
        self._jobs: dict[str, Job] = {}       # job manifest digest -> Job (immutable: safe to keep)
        self._put_at: dict[str, float] = {}   # job manifest digest -> when this process last put it
        self._counters: dict[tuple[str, str], dict[str, float]] = defaultdict(
            lambda: {"hits": 0, "misses": 0, "saved": 0.0})
        self._thread: threading.Thread | None = None
        self._pass: _Pass | None = None
        # Resolution (key, cache lookup, serving a hit) runs on a small pool: it needs no
        # single-flight order, and a burst of hits is bound by round trips, not CPU.
        self._resolvers = ThreadPoolExecutor(config.resolvers, thread_name_prefix="resolve") \
            if config.resolvers > 0 else None
        self._busy: set[Ref] = set()                         # being resolved on the pool
        self._deferred: dict[Ref, dict[str, Any] | None] = {}  # arrived meanwhile: queued when done
        self._missed: dict[Ref, str] = {}   # job -> resourceVersion written after its key missed the cache
        self.healthy_at = time.monotonic()

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
                    self._queue.pop((namespace, name), None)
                    self._deferred.pop((namespace, name), None)
                    self._wake(body)
                    return
            self._queue[(namespace, name)] = body
            self._cond.notify()

    def deleted(self, body: dict[str, Any]) -> None:
        with self._cond:
            self.index.forget(ref_of(body))
            self._queue.pop(ref_of(body), None)
            self._wake(body)

    def _wake(self, body: Mapping[str, Any]) -> None:
        for ref in self.index.wake(body):  # caller holds _cond
            self._queue[ref] = self.index.open.get(ref)
        self._cond.notify()

    def enqueue_cache(self, namespace: str, name: str, body: dict[str, Any] | None = None) -> None:
        with self._cond:
            if body is not None:
                self._rcs[(namespace, name)] = body
            self._caches[(namespace, name)] = None
            self._cond.notify()

    def cache_deleted(self, namespace: str, name: str) -> None:
        with self._cond:
            self._rcs.pop((namespace, name), None)

    def start(self) -> None:
        self.kube.ensure_namespace(self.cfg.lease_namespace)
        self._thread = threading.Thread(target=self._loop, name="reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify()
        if self._thread:
            self._thread.join(timeout=30)
        if self._resolvers is not None:
            self._resolvers.shutdown(wait=True, cancel_futures=True)
        self.kube.flush_events()

    def live(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and \
            time.monotonic() - self.healthy_at < max(60.0, 10 * self.cfg.resync_seconds)

    def _next(self) -> tuple[str, tuple[str, str], dict[str, Any] | None] | None:
        with self._cond:
            while not self._stop.is_set():
                now = time.monotonic()
                due = self._last_resync + self.cfg.resync_seconds
                if now >= due:
                    return ("resync", ("", ""), None)
                if self._caches:
                    return ("cache", self._caches.popitem(last=False)[0], None)
                while self._queue:
                    ref, body = self._queue.popitem(last=False)
                    if ref in self._busy:  # being resolved: decided when that is done
                        self._deferred[ref] = body
                    elif body is None or not self.index.stale(body):  # superseded while queued: skip
                        return ("job", ref, body)
                self._cond.wait(timeout=max(0.05, due - now))
        return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            item = self._next()
            if item is None:
                return
            kind, (namespace, name), body = item
            self.healthy_at = time.monotonic()
            try:
                if kind == "resync":
                    self._last_resync = time.monotonic()
                    self.resync()
                elif kind == "cache":
                    self.reconcile_cache(namespace, name)
                elif body is not None:
                    self.reconcile(body)
                else:
                    self.reconcile_named(namespace, name)
            except Conflict:
                self.enqueue(namespace, name)
            except Exception:
                log.exception("%s %s/%s failed", kind, namespace, name)

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
        load: dict[str, int] = defaultdict(int)
        for obj in items:
            if _status(obj).get("phase") in (p.SCHEDULED, p.RUNNING):
                node = (_meta(obj).get("labels") or {}).get(p.NODE_LABEL)
                if node:
                    load[node] += 1
        self.load = load
        self._pass = _Pass()
        try:
            for ref in [ref_of(o) for o in sorted(items, key=lambda o: str(_meta(o).get("creationTimestamp")))]:
                if self._stop.is_set():
                    return
                with self._cond:
                    # The latest body; a job in the queue is decided there, soon, on its newest event.
                    current = None if ref in self._queue or ref in self._busy else self.index.open.get(ref)
                if current is None or self._settled(current):
                    continue
                try:
                    self.reconcile(current)
                except Conflict:
                    self.enqueue(*ref)
                except Exception:
                    log.exception("reconcile %s/%s failed", *ref)
        finally:
            self._pass = None
        if time.monotonic() - self._last_stats >= self.cfg.stats_seconds:
            self._last_stats = time.monotonic()
            caches, _ = self.kube.list(p.RESULTCACHES)
            for rc in caches:
                if self.watched(str(_meta(rc).get("namespace"))):
                    self.reconcile_cache(str(_meta(rc)["namespace"]), str(_meta(rc)["name"]), stats=True)

    @staticmethod
    def _settled(obj: Mapping[str, Any]) -> bool:
        return settled(obj)

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
        if self._settled(obj):
            return
        self.refresh_nodes()
        if mapping.is_map(obj):  # a parent of sub-tasks: see mapper.py
            mapper.reconcile_map(self, obj)
            return
        status = _status(obj)
        resolved_now = flight.resolved_for_current_generation(obj) and bool(status.get("cacheKey")) \
            and status.get("observedGeneration") == meta.get("generation")
        phase = status.get("phase")
        if not resolved_now or (phase == p.PENDING and status.get("reason") == p.REASON_RUNTIME_MISMATCH):
            if self._resolvers is not None:
                ref = ref_of(obj)
                with self._cond:
                    self._busy.add(ref)
                self._resolvers.submit(self._resolve_on_pool, ref, obj)
                return
            resolved = self._resolve(obj)  # serves a cache hit itself
            if resolved is None:
                return
            obj = resolved
            phase = _status(obj).get("phase")
        with self._cond:
            looked_up = self._missed.pop(ref_of(obj), None) == meta.get("resourceVersion")
        if phase in (p.SCHEDULED, p.RUNNING):
            self._check_node(obj)
        elif phase in (p.PENDING, p.WAITING):
            self._admit(obj, looked_up)

    def _resolve_on_pool(self, ref: Ref, obj: dict[str, Any]) -> None:
        """Resolve on a pool thread; a job that must be admitted goes back to the worker."""
        then: dict[str, Any] | None = None
        requeue = False
        try:
            then = self._resolve(obj)
            requeue = then is not None
        except Conflict:
            requeue = True  # decide again on a fresh read
        except Exception:
            log.exception("resolve %s/%s failed", *ref)
        finally:
            with self._cond:
                self._busy.discard(ref)
                arrived = self._deferred.pop(ref, then)  # an event while resolving, else our result
                if ref in self._queue or (arrived is not None and self.index.stale(arrived)):
                    arrived = self._queue.get(ref, then)
                if requeue or arrived is not then:
                    self._queue[ref] = arrived
                self._cond.notify()

    # -- resolution ----------------------------------------------------------------------------

    def _store_for(self, obj: Mapping[str, Any]) -> tuple[Store, str] | str:
        """The job's ResultCache store and its URL, or why not (a Waiting message)."""
        namespace = str(_meta(obj)["namespace"])
        name = flight.cache_of(obj)
        with self._cond:  # as the watch last delivered it (kopf enqueues every change)
            rc = self._rcs.get((namespace, name))
        if rc is None:
            rc = self.kube.get(p.RESULTCACHES, namespace, name)
        if rc is None:
            if name != p.DEFAULT_RESULT_CACHE:
                return f"ResultCache '{name}' does not exist in namespace {namespace}: create it"
            rc = self._create_default_cache(namespace)
        spec = (rc.get("spec") or {}).get("store") or {}
        bucket, prefix = spec.get("bucket", p.DEFAULT_BUCKET), spec.get("prefix", "")
        return self.stores.get(bucket, prefix), p.store_url(bucket, prefix)

    def _create_default_cache(self, namespace: str) -> dict[str, Any]:
        body = {"apiVersion": p.API_VERSION, "kind": "ResultCache",
                "metadata": {"name": p.DEFAULT_RESULT_CACHE, "namespace": namespace,
                             "labels": {"app.kubernetes.io/managed-by": p.OPERATOR_COMPONENT}},
                "spec": {"store": {"bucket": p.DEFAULT_BUCKET, "prefix": p.default_store_prefix(namespace)}}}
        created = self.kube.create(p.RESULTCACHES, namespace, body)
        if created is not None:
            with self._cond:
                self._rcs[(namespace, p.DEFAULT_RESULT_CACHE)] = created
            log.info("created ResultCache %s/default", namespace)
            self.kube.event(created, "Created", f"default cache for namespace {namespace}")
            self.enqueue_cache(namespace, p.DEFAULT_RESULT_CACHE)
            return created
        return self.kube.get(p.RESULTCACHES, namespace, p.DEFAULT_RESULT_CACHE) or body

    def _resolve(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Resolve the current generation; returns the updated job when it has a key."""
        meta, status = _meta(obj), _status(obj)
        namespace, generation = str(meta["namespace"]), int(meta.get("generation") or 0)
        now = datetime.now(UTC)
        try:
            found = self._store_for(obj)
        except MemoplaneError as exc:
            self._wait(obj, p.REASON_STORE, str(exc))
            return None
        if isinstance(found, str):
            self._wait(obj, p.REASON_NO_CACHE, found)
            return None
        store, url = found
        profile = str((((obj.get("spec") or {}).get("runtime")) or {}).get("profile") or "python")
        runtime = schedule.runtime_for(self.nodes, profile)
        try:
            outcome = resolve.resolve(obj, runtime, Lookups(self.kube, self.stores, namespace, store), now,
                                      self.cfg.missing_grace_seconds)
        except MemoplaneError as exc:
            self._wait(obj, p.REASON_STORE, str(exc))
            return None
        if isinstance(outcome, resolve.Waiting):
            # Woken when an upstream settles (or at the next resync).
            self.wait_on(obj, [job_topic(namespace, up) for up in resolve.upstream_names(obj)])
            self._wait(obj, outcome.reason, outcome.message)
            return None
        if isinstance(outcome, resolve.Failed):
            self._fail(obj, outcome.reason, outcome.message)
            return None
        job = outcome.job
        manifest = canonical_json(job_to_dict(job))
        digest = digest_bytes(manifest)  # the manifest's blob digest, whether or not it is stored yet
        self._jobs[digest] = job
        key = job.key
        looked = time.monotonic()
        hit = self._lookup(store, key) if flight.policy_of(obj) == "Use" else None
        if hit is None:  # it goes to a node: the agent loads the manifest from the store
            self._put_manifest(store, manifest)
        # The assignment's metadata in one patch, then the status: a crash between them
        # leaves a job whose status is of an older generation, which the next pass resolves
        # again (same digest, same key); the node label is removed, so no agent acts on it.
        updated = self.kube_patch_meta(
            obj, labels={p.KEY_LABEL: p.key_label(key), p.NODE_LABEL: None},
            annotations={p.JOB_DIGEST_ANNOTATION: digest, p.STORE_ANNOTATION: url,
                         p.JOB_GENERATION_ANNOTATION: str(generation)})
        if hit is not None:
            ms = int((time.monotonic() - looked) * 1000)
            done = self._patch(updated, st.resolved_hit(status, generation, key, outcome.input_digests,
                                                        hit.digest, hit.result, ms, now))
            self._served(done, hit)
            return None
        updated = self._patch(updated, st.resolved(status, generation, key, outcome.input_digests, now))
        if flight.policy_of(obj) == "Use":
            with self._cond:  # admission need not look the key up again in this state
                self._missed[ref_of(updated)] = str(_meta(updated).get("resourceVersion"))
        self.kube.event(updated, p.REASON_RESOLVED, f"cache key {key[:15]}… (generation {generation})")
        return updated

    def _put_manifest(self, store: Store, manifest: bytes) -> None:
        digest = store.put_bytes(manifest).digest
        self._put_at[digest] = time.monotonic()

    # -- admission: single flight, cache lookup, scheduling --------------------------------------------

    def _job_of(self, obj: Mapping[str, Any], store: Store) -> Job:
        digest = str((_meta(obj).get("annotations") or {})[p.JOB_DIGEST_ANNOTATION])
        job = self._jobs.get(digest)
        if job is None:
            job = job_from_dict(json.loads(store.get_bytes(digest)))
            self._jobs[digest] = job
        return job

    def _admit(self, obj: dict[str, Any], looked_up: bool = False) -> None:
        """Serve from the cache, wait for the job computing the same key, or schedule.
        `looked_up`: this pass already found the key missing from the cache."""
        meta, status = _meta(obj), _status(obj)
        namespace, name = str(meta["namespace"]), str(meta["name"])
        generation = int(meta.get("generation") or 0)
        now = datetime.now(UTC)
        not_before = retry_at(status, base=self.cfg.backoff_base)
        if not_before is not None and now < not_before:
            return  # backing off; a later resync schedules it
        key = str(status["cacheKey"])
        url = str((meta.get("annotations") or {})[p.STORE_ANNOTATION])
        store = self.stores.by_url(url)
        cache = (namespace, flight.cache_of(obj))
        policy = flight.policy_of(obj)
        memo = self._pass
        if policy == "Use" and not looked_up and not (memo and (url, key) in memo.misses):
            # A stored result is served whoever else computes the key: no flight to consult.
            looked = time.monotonic()
            hit = self._lookup(store, key)
            if hit is not None:
                ms = int((time.monotonic() - looked) * 1000)
                done = self._patch(obj, st.cache_hit(status, generation, hit.digest, hit.result, ms, now))
                self._served(done, hit)
                return
            if memo:
                memo.misses.add((url, key))
        group = memo.groups.get((namespace, key)) if memo else None
        if group is None:
            group, _ = self.kube.list(p.COMPUTEJOBS, namespace, f"{p.KEY_LABEL}={p.key_label(key)}")
            if memo:
                memo.groups[(namespace, key)] = group
        lead = flight.leader(obj, group)
        if _meta(lead).get("uid") != meta.get("uid"):
            self.wait_on(obj, [key_topic(namespace, key)])  # woken when the leader settles
            self._wait(obj, p.REASON_IN_FLIGHT, f"waiting for ComputeJob '{_meta(lead).get('name')}', "
                                                "which computes the same key")
            return
        job = self._job_of(obj, store)
        current = schedule.runtime_for(self.nodes, job.profile)
        if current is not None and current != job.runtime:
            # The agents now run another runtime for this profile: the key must be derived again.
            self._patch(obj, st.pending(status, generation, p.REASON_RUNTIME_MISMATCH,
                                        f"agents now run profile '{job.profile}' as {current[:15]}…", now))
            return
        previous = (meta.get("labels") or {}).get(p.NODE_LABEL)
        node = schedule.pick_node(self.nodes, job.profile, str(job.runtime), self.load, avoid=previous)
        if node is None:
            self._wait(obj, p.REASON_NO_NODE, f"no live agent serves profile '{job.profile}' at runtime "
                                                f"{str(job.runtime)[:15]}…")
            return
        # Re-put the manifest (refreshes its age): a job that waited long must not find it collected.
        digest = str((meta.get("annotations") or {})[p.JOB_DIGEST_ANNOTATION])
        if time.monotonic() - self._put_at.get(digest, float("-inf")) > MANIFEST_REFRESH_SECONDS:
            self._put_manifest(store, canonical_json(job_to_dict(job)))
        attempts = int(status.get("attempts") or 0) + 1
        if memo:
            memo.groups.pop((namespace, key), None)  # this key's flight has a started job now
        labelled = self.kube_patch_meta(obj, labels={p.NODE_LABEL: node})
        reason = p.REASON_SCHEDULED if attempts == 1 else "Rescheduled"
        message = f"assigned to node {node} (attempt {attempts})"
        done = self._patch(labelled, st.scheduled(status, generation, node, attempts, now,
                                                  reason=reason, message=message))
        self.load[node] += 1
        self.metrics.cache_misses.inc()
        with self._cond:
            self._counters[cache]["misses"] += 1
        self.kube.event(done, p.REASON_SCHEDULED, message)
        log.info("%s/%s: key %s -> node %s (attempt %d)", namespace, name, key[3:15], node, attempts)

    def _served(self, done: Mapping[str, Any], hit: Hit) -> None:
        namespace = str(_meta(done)["namespace"])
        cache = (namespace, flight.cache_of(done))
        saved = float(hit.result.provenance.duration_s)
        self.metrics.cache_hits.inc()
        self.metrics.seconds_saved.inc(saved)
        self.metrics.jobs.labels("cached").inc()
        with self._cond:
            self._counters[cache]["hits"] += 1
            self._counters[cache]["saved"] += saved
        self.kube.event(done, p.REASON_CACHE_HIT, f"result {hit.digest[:15]}… for key "
                                                  f"{str(_status(done).get('cacheKey'))[:15]}… from the cache, "
                                                  f"{saved:.2f}s of compute saved")

    def _lookup(self, store: Store, key: str) -> Hit | None:
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

    # -- lost nodes ------------------------------------------------------------------------------

    def _check_node(self, obj: dict[str, Any]) -> None:
        meta, status = _meta(obj), _status(obj)
        node = (meta.get("labels") or {}).get(p.NODE_LABEL)
        if not schedule.node_lost(node, self.nodes) and node:
            return
        generation = int(meta.get("generation") or 0)
        attempts = int(status.get("attempts") or 0)
        backoff_limit = int((obj.get("spec") or {}).get("backoffLimit", 2))
        now = datetime.now(UTC)
        what = f"node {node} lost its lease" if node else "the job has no node"
        self.metrics.reassigned.inc()
        if attempts > backoff_limit:
            self._fail(obj, p.REASON_BACKOFF_LIMIT, f"{what} during attempt {attempts}; "
                                                    f"backoffLimit {backoff_limit} reached")
            return
        updated = self._patch(obj, st.pending(status, generation, p.REASON_REASSIGNED,
                                              f"{what} (attempt {attempts}): rescheduling", now))
        self.kube.event(updated, p.REASON_REASSIGNED, f"{what}: rescheduling", warning=True)
        self._admit(updated)

    # -- writes --------------------------------------------------------------------------------

    def kube_patch_meta(self, obj: Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
        meta = _meta(obj)
        try:
            out = self.kube.patch_meta(p.COMPUTEJOBS, str(meta["namespace"]), str(meta["name"]),
                                       resource_version=meta.get("resourceVersion"), **kwargs)
        except ApiException as exc:
            if exc.status in (404, 409):
                raise Conflict() from None
            raise
        with self._cond:
            self.index.wrote(out)
        return out

    def _patch(self, obj: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
        meta = _meta(obj)
        try:
            out = self.kube.patch_status(p.COMPUTEJOBS, str(meta["namespace"]), str(meta["name"]), patch,
                                         meta.get("resourceVersion"))
        except ApiException as exc:
            if exc.status in (404, 409):
                raise Conflict() from None
            raise
        with self._cond:
            self.index.wrote(out)
        return out

    def _wait(self, obj: dict[str, Any], reason: str, message: str) -> None:
        status = _status(obj)
        generation = int(_meta(obj).get("generation") or 0)
        if (status.get("phase"), status.get("reason"), status.get("message"), status.get("observedGeneration")) \
                == (p.WAITING, reason, message, generation):
            return
        done = self._patch(obj, st.waiting(status, generation, reason, message, datetime.now(UTC)))
        if status.get("reason") != reason:
            self.kube.event(done, reason, message)

    def wait_on(self, obj: Mapping[str, Any], topics: list[Topic]) -> None:
        """Revisit `obj` as soon as any of `topics` settles (a job name or a key)."""
        with self._cond:
            for topic in topics:
                self.index.wait_for(ref_of(obj), topic)

    def _fail(self, obj: dict[str, Any], reason: str, message: str, extra: Mapping[str, Any] | None = None) -> None:
        generation = int(_meta(obj).get("generation") or 0)
        patch = st.failed(_status(obj), generation, reason, message, datetime.now(UTC))
        done = self._patch(obj, {**patch, **(extra or {})})
        self.metrics.jobs.labels("failed").inc()
        self.kube.event(done, st.camel(reason), message, warning=True)

    # -- ResultCache ---------------------------------------------------------------------------------

    def reconcile_cache(self, namespace: str, name: str, stats: bool = False) -> None:
        rc = self.kube.get(p.RESULTCACHES, namespace, name)
        if rc is None or not self.watched(namespace):
            return
        generation = int(_meta(rc).get("generation") or 0)
        status = _status(rc)
        spec = (rc.get("spec") or {}).get("store") or {}
        now = datetime.now(UTC)
        patch: dict[str, Any] = {"observedGeneration": generation}
        try:
            store = self.stores.get(spec.get("bucket", p.DEFAULT_BUCKET), spec.get("prefix", ""))
            if stats or status.get("entries") is None:
                s = store.stats()
                counters = self._counters.pop((namespace, name), {"hits": 0, "misses": 0, "saved": 0.0})
                patch.update({
                    "entries": s.entries, "logicalBytes": s.logical_bytes, "storedBytes": s.stored_bytes,
                    "dedupRatio": round(s.dedup_ratio, 4),
                    "hits": int(status.get("hits") or 0) + int(counters["hits"]),
                    "misses": int(status.get("misses") or 0) + int(counters["misses"]),
                    "computeSecondsSaved": round(float(status.get("computeSecondsSaved") or 0.0)
                                                 + float(counters["saved"]), 3),
                })
            message = f"store {p.store_url(spec.get('bucket', p.DEFAULT_BUCKET), spec.get('prefix', ''))}"
            patch["conditions"] = mark_ready(status.get("conditions"), "StoreReady", message, generation, now)
        except MemoplaneError as exc:
            patch["conditions"] = mark_stalled(status.get("conditions"), p.REASON_STORE, str(exc), generation, now)
        if all(status.get(k) == v for k, v in patch.items() if k != "conditions") and \
                [(c.get("type"), c.get("status"), c.get("message")) for c in status.get("conditions") or []] == \
                [(c.get("type"), c.get("status"), c.get("message")) for c in patch["conditions"]]:
            return
        try:
            self.kube.patch_status(p.RESULTCACHES, namespace, name, patch)
        except ApiException as exc:
            if exc.status != 404:
                raise
