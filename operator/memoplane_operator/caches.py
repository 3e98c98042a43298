"""ResultCaches on the reconciler's worker: which store a job's cache names (creating a
namespace's default cache on first use), what its namespace may do there and whom it trusts,
the hits and misses counted between stats refreshes, and each cache's status (decisions in
memoplane.cluster.resultcache, memoplane.cluster.sharing and memoplane.cluster.trust).

Access (sharing) depends on every cache: it is decided for all at once, again after any
cache is added, removed or has its spec changed (every cache's status is then reconciled
again) and at each full resync (which is when Namespace label changes are seen).

A cache's trust policy is kept until the cache changes or the next full resync (which is
when a change to a Secret or ConfigMap it names is seen); one that cannot be made (a named
Secret missing) is not kept: the waiting job's next visit reads the keys again.

Guarded by the work queue's lock, as the rest of the reconciler's shared state.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from memoplane.cas import Store
from memoplane.cas import audit as audit_log
from memoplane.cluster import protocol as p
from memoplane.cluster import resultcache as rs
from memoplane.cluster import sharing as sh
from memoplane.cluster import spotcheck as sc
from memoplane.cluster import trust as tr
from memoplane.cluster.agentkeys import ClusterKeys
from memoplane.cluster.decide import CreateDefault, Wait, default_cache, missing_cache
from memoplane.cluster.kube import Kube
from memoplane.cluster.stores import Stores
from memoplane.cluster.views import CacheView, cache, job, ref_of
from memoplane.errors import MemoplaneError
from memoplane.trust import TrustPolicy

from .workqueue import WorkQueue

log = logging.getLogger("memoplane.operator")

LANE = "cache"


@dataclass(frozen=True)
class Target:
    """Where a job's hits come from, where its results go and whose attestations make a stored one a hit."""

    store: Store           # where the job's results are written: its cache's location, or (not
    url: str               # a writer there, or readOnly) its namespace's home
    policy: TrustPolicy
    lookup: Store | None   # where hits come from: the cache's location (None: the namespace may not read it)
    lookup_url: str
    access: sh.Access
    quota_reached: str | None = None   # why results are not cached (the cache is at its spec.quota)


class ResultCaches:
    def __init__(self, kube: Kube, stores: Stores, work: WorkQueue, watched: Callable[[str], bool],
                 cluster_keys: Callable[[], ClusterKeys]) -> None:
        self.kube, self.stores, self.work, self.watched = kube, stores, work, watched
        self.cluster_keys = cluster_keys  # the operator's and the agents' keys, as known now
        self._seen: dict[tuple[str, str], dict[str, Any]] = {}   # as the watch last delivered them
        self._policies: dict[tuple[str, str], TrustPolicy] = {}
        self._counters: dict[tuple[str, str], rs.Counters] = defaultdict(rs.no_counts)
        self._access: dict[tuple[str, str], sh.Access] | None = None   # None: decide again
        self._access_basis: dict[tuple[str, str], tuple[str, str, str]] = {}   # the caches as last decided on
        self._access_epoch = 0   # bumped whenever the decisions go stale

    # -- watch events ---------------------------------------------------------------------------

    def changed(self, namespace: str, name: str, body: dict[str, Any] | None = None) -> None:
        with self.work.cond:
            if body is not None:
                self._seen[(namespace, name)] = body
            self._policies.pop((namespace, name), None)
            if body is None or self._access_basis.get((namespace, name)) != sh.basis(body):
                self._forget_access()
            self.work.lanes[LANE].put((namespace, name))
            self.work.cond.notify()

    def deleted(self, namespace: str, name: str) -> None:
        with self.work.cond:
            self._seen.pop((namespace, name), None)
            self._policies.pop((namespace, name), None)
            self._forget_access()
            self.work.cond.notify()

    def forget_policies(self) -> None:
        """Read every cache's trusted keys afresh (a Secret or ConfigMap may have changed, an agent's key
        may be new), and decide access again (a Namespace's labels may have changed)."""
        with self.work.cond:
            self._policies.clear()
            self._access, self._access_epoch = None, self._access_epoch + 1

    def _forget_access(self) -> None:
        """Every cache's access is decided again, and its status with it (caller holds the lock)."""
        if self._access is not None:
            for ref in self._seen:
                self.work.lanes[LANE].put(ref)
        self._access, self._access_epoch = None, self._access_epoch + 1

    # -- access (sharing) -----------------------------------------------------------------------

    def access_of(self, rc: Mapping[str, Any]) -> sh.Access:
        """What the cache's namespace may do in its location, decided with every other cache."""
        ref = ref_of(rc)
        with self.work.cond:
            decided, epoch = self._access, self._access_epoch
        if decided is None or ref not in decided:
            listed, _ = self.kube.list(p.RESULTCACHES)
            bodies: list[Mapping[str, Any]] = [c for c in listed if self.watched(cache(c).meta.namespace)]
            if ref not in {ref_of(b) for b in bodies}:
                bodies.append(rc)   # as the caller sees it (a cache just created may not be listed yet)
            decided = sh.decide_access(bodies, self.kube.namespace_labels() if sh.selects_by_labels(bodies) else {})
            with self.work.cond:
                if epoch == self._access_epoch:
                    self._access, self._access_basis = decided, {ref_of(b): sh.basis(b) for b in bodies}
        return decided[ref]

    def reader_denied(self, upstream: Mapping[str, Any], reader: str) -> str:
        """Why namespace `reader` may not use the result of `upstream` (a job of another namespace)."""
        view = job(upstream)
        namespace, name = view.ref
        if not self.watched(namespace):
            return f"namespace {namespace} is not one this operator serves: its jobs are not shared here"
        with self.work.cond:
            rc = self._seen.get((namespace, view.spec.result_cache))
        if rc is None:
            rc = self.kube.get(p.RESULTCACHES, namespace, view.spec.result_cache)
        labels = self.kube.namespace_labels() if rc is not None and sh.selects_by_labels([rc]) else {}
        return sh.upstream_denied((namespace, name), view.spec.result_cache, rc, reader, labels)

    # -- counters -------------------------------------------------------------------------------

    def count_hit(self, namespace: str, cache: str, saved: float) -> None:
        with self.work.cond:
            self._counters[(namespace, cache)]["hits"] += 1
            self._counters[(namespace, cache)]["saved"] += saved

    def count_miss(self, namespace: str, cache: str) -> None:
        with self.work.cond:
            self._counters[(namespace, cache)]["misses"] += 1

    def result_buckets(self) -> set[str]:
        """The buckets results are kept in: the default one and every cache's the watch delivered."""
        with self.work.cond:
            return {p.DEFAULT_BUCKET, *(cache(rc).bucket for rc in self._seen.values())}

    # -- a job's store --------------------------------------------------------------------------

    def store_for(self, obj: Mapping[str, Any]) -> Target | Wait:
        """The job's ResultCache store, its URL and trust policy, or why the job waits for it."""
        rc = self._cache_of(obj)
        if isinstance(rc, Wait):
            return rc
        policy = self._policy(rc)
        if isinstance(policy, Wait):
            return policy
        found, access = cache(rc), self.access_of(rc)
        own = self.stores.of_cache(found, owner=access.usable and not access.guest)
        home = p.default_store_prefix(found.meta.namespace)
        store, url = (own, found.store_url) if access.write else \
            (self.stores.get(p.DEFAULT_BUCKET, home), p.store_url(p.DEFAULT_BUCKET, home))
        quota = rs.quota_reached(found) if access.write else None   # the quota bounds the cache's location only
        return Target(store, url, policy, own if access.read else None, found.store_url, access, quota)

    def reexecute_for(self, obj: Mapping[str, Any]) -> sc.Reexecute | None:
        """The job's cache's trust.reexecute (None: no spot checks)."""
        rc = self._cache_of(obj)
        return None if isinstance(rc, Wait) else sc.reexecute_of(rc)

    def _cache_of(self, obj: Mapping[str, Any]) -> dict[str, Any] | Wait:
        view = job(obj)
        namespace, name = view.meta.namespace, view.spec.result_cache
        with self.work.cond:  # as the watch last delivered it (kopf enqueues every change)
            rc = self._seen.get((namespace, name))
        if rc is None:
            rc = self.kube.get(p.RESULTCACHES, namespace, name)
        if rc is None:
            missing = missing_cache(namespace, name)
            if isinstance(missing, Wait):
                return missing
            rc = self._create_default(missing)
        return rc

    def _policy(self, rc: Mapping[str, Any]) -> TrustPolicy | Wait:
        """The cache's trust policy (kept until the cache changes or the next full resync)."""
        meta = cache(rc).meta
        ref = (meta.namespace, meta.name)
        with self.work.cond:
            kept = self._policies.get(ref)
        if kept is not None:
            return kept
        objects = {source: self._read(meta.namespace, source) for source in tr.key_sources(rc)}
        policy = tr.effective_policy(rc, objects, self.cluster_keys())
        if isinstance(policy, tr.Unusable):  # not kept: the waiting job's next visit reads the keys again
            return Wait(p.REASON_TRUST_KEYS, f"ResultCache '{meta.name}': {policy.message}")
        with self.work.cond:
            self._policies[ref] = policy
        return policy

    def _read(self, namespace: str, source: tr.KeySource) -> dict[str, Any] | None:
        if source.kind == tr.SECRET:
            return self.kube.get_secret(namespace, source.name)
        return self.kube.get_config_map(namespace, source.name)

    def _create_default(self, wanted: CreateDefault) -> dict[str, Any]:
        namespace = wanted.namespace
        body = default_cache(namespace)
        created = self.kube.create(p.RESULTCACHES, namespace, body)
        if created is not None:
            with self.work.cond:
                self._seen[(namespace, p.DEFAULT_RESULT_CACHE)] = created
            log.info("created ResultCache %s/default", namespace)
            self.kube.event(created, "Created", f"default cache for namespace {namespace}")
            self.changed(namespace, p.DEFAULT_RESULT_CACHE)
            return created
        return self.kube.get(p.RESULTCACHES, namespace, p.DEFAULT_RESULT_CACHE) or body

    # -- status ---------------------------------------------------------------------------------

    def refresh_stats(self) -> None:
        """Every watched cache's status, with the hits and misses counted since the last refresh."""
        caches, _ = self.kube.list(p.RESULTCACHES)
        for rc in caches:
            meta = cache(rc).meta
            if self.watched(meta.namespace):
                self.reconcile(meta.namespace, meta.name, stats=True)

    @staticmethod
    def _record_revocations(view: CacheView, store: Store) -> dict[str, Any]:
        """Append each revocation new in the cache's spec to its store's audit log (if it keeps
        one); the status remembers which were, so a restart records none twice."""
        new = rs.newly_revoked(view)
        for keyid in new:
            store.audit(audit_log.REVOCATION, keyid=keyid, cache=f"{view.meta.namespace}/{view.meta.name}")
        return {"revocationsRecorded": sorted(set(view.revoked))} if new or view.revocations_recorded else {}

    def reconcile(self, namespace: str, name: str, stats: bool = False) -> None:
        rc = self.kube.get(p.RESULTCACHES, namespace, name)
        if rc is None or not self.watched(namespace):
            return
        view = cache(rc)
        generation, status, bucket, prefix = view.meta.generation, view.status, view.bucket, view.prefix
        now = datetime.now(UTC)
        patch: dict[str, Any] = {"observedGeneration": generation}
        access = self.access_of(rc)
        try:
            store = self.stores.of_cache(view, owner=access.usable and not access.guest)
            if access.read and stats:  # the size figures are the retention worker's (retention.py)
                with self.work.cond:
                    counters = self._counters.pop((namespace, name), rs.no_counts())
                patch.update(rs.counter_fields(status, counters))
            if access.write:
                patch.update(self._record_revocations(view, store))
            conditions = rs.ready(status, generation, bucket, prefix, now) if access.usable else \
                rs.stalled(status, generation, access.why, now, sh.stalled_reason(access))
            patch["conditions"] = rs.with_quota(conditions, view, generation, now)
        except MemoplaneError as exc:
            patch["conditions"] = rs.stalled(status, generation, str(exc), now)
        if rs.unchanged(status, patch):
            return
        try:
            self.kube.patch_status(p.RESULTCACHES, namespace, name, patch)
        except ApiException as exc:
            if exc.status != 404:
                raise
