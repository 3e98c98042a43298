"""What the operator's job modules (resolution, admission, hits, mapper) may do: read the
API server and the stores, write a job with a resourceVersion precondition, post Events,
register what a job waits for, and apply a decision (memoplane.cluster.decide) that says
wait or fail. The Reconciler builds one Context and hands it to them; they never see the
Reconciler itself.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from memoplane.cas import ResultManifest, Store
from memoplane.chunkmap.tree import Node
from memoplane.cluster import protocol as p
from memoplane.cluster import schedule
from memoplane.cluster import status as st
from memoplane.cluster.decide import Fail, Wait
from memoplane.cluster.index import JobIndex, Topic
from memoplane.cluster.kube import Kube
from memoplane.cluster.mapping import Known
from memoplane.cluster.metrics import OperatorMetrics
from memoplane.cluster.propagate import EdgeIndex, held
from memoplane.cluster.stores import Stores
from memoplane.cluster.views import job
from memoplane.jobs import BlobInput
from memoplane.settings import ObjectGrant, OperatorSettings
from memoplane.trust import SigningKey, TrustPolicy

from .caches import ResultCaches
from .job_manifests import JobManifests
from .lookups import Lookups
from .retention import UsageRecorder
from .streaks import Streaks


class Conflict(Exception):
    """The object changed while we decided: decide again."""


@dataclass
class Fleet:
    """The nodes as of the last lease read, and the jobs assigned to each and not yet seen
    finish (the leases' running counts lag)."""

    nodes: list[schedule.NodeView] = field(default_factory=list)
    load: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))


@dataclass
class Pass:
    """Reads shared by the decisions of one resync pass (hundreds of jobs may wait on one
    key): the single-flight list of a key, until this pass schedules one of its jobs, and
    the (store, key)s found missing from the cache (a hit arriving meanwhile is served by the
    wake-up of the job that computed it, or by the next pass)."""

    groups: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    misses: set[tuple[str, str]] = field(default_factory=set)


@dataclass
class MapMemory:
    """What a spec.map parent found out about its element keys (mapper.py), kept across its
    passes and generations so that a pass looks up only keys it has not seen: a key's result
    never changes, and a result that can no longer be read is forgotten and looked up again."""

    source: tuple[str, TrustPolicy] | None = None   # (lookup store URL, trust policy) the hits were judged by
    known: dict[str, Known] = field(default_factory=dict)               # element key -> its result
    manifests: dict[str, ResultManifest] = field(default_factory=dict)  # result digest -> manifest read
    # spec.map.overChunks (chunker.py): (blob digest, chunk target) -> the combine tree and its chunks, split once
    chunked: dict[tuple[str, int], tuple[Node, dict[str, BlobInput]]] = field(default_factory=dict)

    def keep_only(self, keys: Mapping[str, Any]) -> None:
        self.known = {k: v for k, v in self.known.items() if k in keys}
        wanted = {v.digest for v in self.known.values()}
        self.manifests = {d: m for d, m in self.manifests.items() if d in wanted}


@dataclass
class Context:
    settings: OperatorSettings
    kube: Kube
    stores: Stores
    caches: ResultCaches
    manifests: JobManifests
    metrics: OperatorMetrics
    index: JobIndex
    lock: threading.Condition     # guards `index` (the work queue's)
    signer: SigningKey            # attests what the operator computes itself (map lists)
    object_grants: tuple[ObjectGrant, ...]  # the fromObject allowlist (memoplane.cluster.objectinputs)
    usage: UsageRecorder          # hits and writes, for the usage index (retention.py)
    fleet: Fleet = field(default_factory=Fleet)
    memo: Pass | None = None      # set during a resync pass
    streaks: Streaks = field(default_factory=Streaks)  # trust.reexecute's agreement streaks, per store
    edges: EdgeIndex = field(default_factory=EdgeIndex)  # fromJob edges of every watched job (guarded by `lock`)
    maps: dict[str, MapMemory] = field(default_factory=dict)  # spec.map parents' memory, by uid (worker only)

    def lookups(self, namespace: str, store: Store) -> Lookups:
        """What resolving a job of `namespace` whose results go to `store` reads."""
        return Lookups(self.kube, self.stores, namespace, store, self.caches, self.object_grants)

    # -- writes ------------------------------------------------------------------------------

    def _written(self, write: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run a write with a resourceVersion precondition; a 404 or 409 means decide again."""
        try:
            out = write()
        except ApiException as exc:
            if exc.status in (404, 409):
                raise Conflict() from None
            raise
        with self.lock:
            self.index.wrote(out)
            self.edges.observe(out)
        return out

    def patch_meta(self, obj: Mapping[str, Any], *, labels: Mapping[str, str | None] | None = None,
                   annotations: Mapping[str, str | None] | None = None) -> dict[str, Any]:
        meta = job(obj).meta
        return self._written(lambda: self.kube.patch_meta(
            p.COMPUTEJOBS, meta.namespace, meta.name, labels=labels, annotations=annotations,
            resource_version=meta.resource_version))

    def patch(self, obj: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
        meta = job(obj).meta
        return self._written(lambda: self.kube.patch_status(
            p.COMPUTEJOBS, meta.namespace, meta.name, patch, meta.resource_version))

    def event(self, obj: Mapping[str, Any], reason: str, message: str, *, warning: bool = False) -> None:
        self.kube.event(obj, reason, message, warning=warning)

    def wait_on(self, obj: Mapping[str, Any], topics: tuple[Topic, ...] | list[Topic]) -> None:
        """Revisit `obj` as soon as any of `topics` settles (a job name or a key)."""
        with self.lock:
            for topic in topics:
                self.index.wait_for(job(obj).ref, topic)

    # -- decisions ---------------------------------------------------------------------------

    def wait(self, obj: Mapping[str, Any], decision: Wait) -> None:
        """Waiting with the decision's reason (unless the status says so already). A held job
        keeps its hold (memoplane.cluster.propagate) until it resolves: only the wait is registered."""
        self.wait_on(obj, decision.topics)
        if held(obj):
            return
        view = job(obj)
        status, generation = view.status.raw, view.meta.generation
        if st.already_waiting(status, generation, decision.reason, decision.message):
            return
        done = self.patch(obj, st.waiting(status, generation, decision.reason, decision.message, datetime.now(UTC)))
        if view.status.reason != decision.reason:
            self.event(done, decision.reason, decision.message)

    def fail(self, obj: Mapping[str, Any], decision: Fail) -> None:
        view = job(obj)
        patch = st.failed(view.status.raw, view.meta.generation, decision.reason, decision.message,
                          datetime.now(UTC))
        done = self.patch(obj, {**patch, **decision.extra})
        self.metrics.jobs.labels("failed").inc()
        self.event(done, st.camel(decision.reason), decision.message, warning=True)
