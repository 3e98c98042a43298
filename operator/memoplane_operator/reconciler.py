"""The operator's reconciler: one worker thread over a de-duplicating queue of jobs.

kopf watches ComputeJobs and ResultCaches and enqueues what changed; a resync every
`resync_seconds` (sooner when a job finishes) revisits every unfinished job, refreshes the
agents' leases and, less often, the ResultCaches' stats. One worker makes every decision in
turn, and each decision reads the API server afresh, so single flight is sound (see
memoplane.cluster.flight) and nothing lives only in memory: a restarted operator picks up
where the API server says things are.

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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from memoplane.api.conditions import mark_ready, mark_stalled
from memoplane.canonical import canonical_json
from memoplane.cas import Hit, Store
from memoplane.cluster import flight, resolve, schedule
from memoplane.cluster import protocol as p
from memoplane.cluster import status as st
from memoplane.cluster.kube import Kube
from memoplane.cluster.metrics import OperatorMetrics
from memoplane.cluster.retry import retry_at
from memoplane.cluster.stores import Stores
from memoplane.errors import MemoplaneError, NotFound, StoreCorrupted
from memoplane.jobs import BlobInput, Input, Job, JsonInput, job_from_dict, job_to_dict

log = logging.getLogger("memoplane.operator")

DEEP_VERIFY_MAX_BYTES = 64 << 20  # hits up to this size are re-hashed in full before they are served


@dataclass
class OperatorConfig:
    patterns: list[str] = field(default_factory=list)
    lease_namespace: str = "memoplane-system"
    resync_seconds: float = 2.0
    stats_seconds: float = 30.0
    missing_grace_seconds: float = resolve.MISSING_GRACE_SECONDS
    backoff_base: float = 1.0


class Conflict(Exception):
    """The object changed while we decided: decide again."""


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
        self._queue: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._caches: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._resync_soon = False
        self._last_resync = 0.0
        self._last_leases = 0.0
        self._last_stats = 0.0
        self._jobs: dict[str, Job] = {}       # job manifest digest -> Job (immutable: safe to keep)
        self._counters: dict[tuple[str, str], dict[str, float]] = defaultdict(
            lambda: {"hits": 0, "misses": 0, "saved": 0.0})
        self._thread: threading.Thread | None = None
        self.healthy_at = time.monotonic()

    # -- queue -----------------------------------------------------------------------------

    def watched(self, namespace: str) -> bool:
        return p.namespace_matches(self.cfg.patterns, namespace)

    def enqueue(self, namespace: str, name: str) -> None:
        with self._cond:
            self._queue[(namespace, name)] = None
            self._cond.notify()

    def enqueue_cache(self, namespace: str, name: str) -> None:
        with self._cond:
            self._caches[(namespace, name)] = None
            self._cond.notify()

    def request_resync(self) -> None:
        with self._cond:
            self._resync_soon = True
            self._cond.notify()

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

    def live(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and \
            time.monotonic() - self.healthy_at < max(60.0, 10 * self.cfg.resync_seconds)

    def _next(self) -> tuple[str, tuple[str, str]] | None:
        with self._cond:
            while not self._stop.is_set():
                now = time.monotonic()
                due = self._last_resync + self.cfg.resync_seconds
                if now >= due or (self._resync_soon and now - self._last_resync >= 0.5):
                    return ("resync", ("", ""))
                if self._caches:
                    return ("cache", self._caches.popitem(last=False)[0])
                if self._queue:
                    return ("job", self._queue.popitem(last=False)[0])
                wait = due - now if not self._resync_soon else min(due - now, 0.5)
                self._cond.wait(timeout=max(0.05, wait))
        return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            item = self._next()
            if item is None:
                return
            kind, (namespace, name) = item
            self.healthy_at = time.monotonic()
            try:
                if kind == "resync":
                    self._resync_soon = False
                    self._last_resync = time.monotonic()
                    self.resync()
                elif kind == "cache":
                    self.reconcile_cache(namespace, name)
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
        items, _ = self.kube.list(p.COMPUTEJOBS)
        items = [o for o in items if self.watched(str(_meta(o).get("namespace")))]
        load: dict[str, int] = defaultdict(int)
        for obj in items:
            if _status(obj).get("phase") in (p.SCHEDULED, p.RUNNING):
                node = (_meta(obj).get("labels") or {}).get(p.NODE_LABEL)
                if node:
                    load[node] += 1
        self.load = load
        for obj in sorted(items, key=lambda o: str(_meta(o).get("creationTimestamp"))):
            if self._stop.is_set():
                return
            if not self._settled(obj):
                try:
                    self.reconcile(obj)
                except Conflict:
                    self.enqueue(str(_meta(obj)["namespace"]), str(_meta(obj)["name"]))
                except Exception:
                    log.exception("reconcile %s/%s failed", _meta(obj).get("namespace"), _meta(obj).get("name"))
        if time.monotonic() - self._last_stats >= self.cfg.stats_seconds:
            self._last_stats = time.monotonic()
            caches, _ = self.kube.list(p.RESULTCACHES)
            for rc in caches:
                if self.watched(str(_meta(rc).get("namespace"))):
                    self.reconcile_cache(str(_meta(rc)["namespace"]), str(_meta(rc)["name"]), stats=True)

    @staticmethod
    def _settled(obj: Mapping[str, Any]) -> bool:
        status = _status(obj)
        return status.get("phase") in p.TERMINAL and status.get("observedGeneration") == _meta(obj).get("generation")

    # -- ComputeJob ---------------------------------------------------------------------------

    def reconcile_named(self, namespace: str, name: str) -> None:
        obj = self.kube.get(p.COMPUTEJOBS, namespace, name)
        if obj is not None:
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
            if (meta.get("labels") or {}).get(p.KEY_LABEL):
                self.request_resync()  # followers and downstream jobs may proceed now
            return
        self.refresh_nodes()
        status = _status(obj)
        resolved_now = flight.resolved_for_current_generation(obj) and bool(status.get("cacheKey")) \
            and status.get("observedGeneration") == meta.get("generation")
        phase = status.get("phase")
        if not resolved_now or (phase == p.PENDING and status.get("reason") == p.REASON_RUNTIME_MISMATCH):
            obj = self._resolve(obj)
            if obj is None:
                return
            phase = _status(obj).get("phase")
        if phase in (p.SCHEDULED, p.RUNNING):
            self._check_node(obj)
        elif phase in (p.PENDING, p.WAITING):
            self._admit(obj)

    # -- resolution ----------------------------------------------------------------------------

    def _store_for(self, obj: Mapping[str, Any]) -> tuple[Store, str] | str:
        """The job's ResultCache store and its URL, or why not (a Waiting message)."""
        namespace = str(_meta(obj)["namespace"])
        name = flight.cache_of(obj)
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
            self._wait(obj, outcome.reason, outcome.message)
            return None
        if isinstance(outcome, resolve.Failed):
            self._fail(obj, outcome.reason, outcome.message)
            return None
        job = outcome.job
        manifest = store.put_bytes(canonical_json(job_to_dict(job)))
        self._jobs[manifest.digest] = job
        key = job.key
        # The assignment's metadata in one patch, then the status: a crash between them
        # leaves a Pending job that the next pass resolves again (same digest, same key).
        updated = self.kube_patch_meta(
            obj, labels={p.KEY_LABEL: p.key_label(key), p.NODE_LABEL: None},
            annotations={p.JOB_DIGEST_ANNOTATION: manifest.digest, p.STORE_ANNOTATION: url,
                         p.JOB_GENERATION_ANNOTATION: str(generation)})
        updated = self._patch(updated, st.resolved(status, generation, key, outcome.input_digests, now))
        self.kube.event(updated, p.REASON_RESOLVED, f"cache key {key[:15]}… (generation {generation})")
        return updated

    # -- admission: single flight, cache lookup, scheduling --------------------------------------------

    def _job_of(self, obj: Mapping[str, Any], store: Store) -> Job:
        digest = str((_meta(obj).get("annotations") or {})[p.JOB_DIGEST_ANNOTATION])
        job = self._jobs.get(digest)
        if job is None:
            job = job_from_dict(json.loads(store.get_bytes(digest)))
            self._jobs[digest] = job
        return job

    def _admit(self, obj: dict[str, Any]) -> None:
        meta, status = _meta(obj), _status(obj)
        namespace, name = str(meta["namespace"]), str(meta["name"])
        generation = int(meta.get("generation") or 0)
        now = datetime.now(UTC)
        not_before = retry_at(status, base=self.cfg.backoff_base)
        if not_before is not None and now < not_before:
            return  # backing off; a later resync schedules it
        key = str(status["cacheKey"])
        group, _ = self.kube.list(p.COMPUTEJOBS, namespace, f"{p.KEY_LABEL}={p.key_label(key)}")
        lead = flight.leader(obj, group)
        if _meta(lead).get("uid") != meta.get("uid"):
            self._wait(obj, p.REASON_IN_FLIGHT, f"waiting for ComputeJob '{_meta(lead).get('name')}', "
                                                "which computes the same key")
            return
        store = self.stores.by_url(str((meta.get("annotations") or {})[p.STORE_ANNOTATION]))
        cache = (namespace, flight.cache_of(obj))
        policy = flight.policy_of(obj)
        if policy == "Use":
            started = time.monotonic()
            hit = self._lookup(store, key)
            if hit is not None:
                ms = int((time.monotonic() - started) * 1000)
                done = self._patch(obj, st.cache_hit(status, generation, hit.digest, hit.result, ms, now))
                saved = float(hit.result.provenance.duration_s)
                self.metrics.cache_hits.inc()
                self.metrics.seconds_saved.inc(saved)
                self.metrics.jobs.labels("cached").inc()
                self._counters[cache]["hits"] += 1
                self._counters[cache]["saved"] += saved
                self.kube.event(done, p.REASON_CACHE_HIT, f"result {hit.digest[:15]}… from the cache, "
                                                          f"{saved:.2f}s of compute saved")
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
        store.put_bytes(canonical_json(job_to_dict(job)))
        attempts = int(status.get("attempts") or 0) + 1
        labelled = self.kube_patch_meta(obj, labels={p.NODE_LABEL: node})
        reason = p.REASON_SCHEDULED if attempts == 1 else "Rescheduled"
        message = f"assigned to node {node} (attempt {attempts})"
        done = self._patch(labelled, st.scheduled(status, generation, node, attempts, now,
                                                  reason=reason, message=message))
        self.load[node] += 1
        self.metrics.cache_misses.inc()
        self._counters[cache]["misses"] += 1
        self.kube.event(done, p.REASON_SCHEDULED, message)
        log.info("%s/%s: key %s -> node %s (attempt %d)", namespace, name, key[3:15], node, attempts)

    def _lookup(self, store: Store, key: str) -> Hit | None:
        hit = store.get_ref(key)
        if hit is not None and hit.result.logical_size <= DEEP_VERIFY_MAX_BYTES:
            hit = store.get_ref(key, deep=True)  # re-hash every chunk: a damaged one is never served
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
            return self.kube.patch_meta(p.COMPUTEJOBS, str(meta["namespace"]), str(meta["name"]),
                                        resource_version=meta.get("resourceVersion"), **kwargs)
        except ApiException as exc:
            if exc.status in (404, 409):
                raise Conflict() from None
            raise

    def _patch(self, obj: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
        meta = _meta(obj)
        try:
            return self.kube.patch_status(p.COMPUTEJOBS, str(meta["namespace"]), str(meta["name"]), patch,
                                          meta.get("resourceVersion"))
        except ApiException as exc:
            if exc.status in (404, 409):
                raise Conflict() from None
            raise

    def _wait(self, obj: dict[str, Any], reason: str, message: str) -> None:
        status = _status(obj)
        generation = int(_meta(obj).get("generation") or 0)
        if (status.get("phase"), status.get("reason"), status.get("message"), status.get("observedGeneration")) \
                == (p.WAITING, reason, message, generation):
            return
        done = self._patch(obj, st.waiting(status, generation, reason, message, datetime.now(UTC)))
        if status.get("reason") != reason:
            self.kube.event(done, reason, message)

    def _fail(self, obj: dict[str, Any], reason: str, message: str) -> None:
        generation = int(_meta(obj).get("generation") or 0)
        done = self._patch(obj, st.failed(_status(obj), generation, reason, message, datetime.now(UTC)))
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
