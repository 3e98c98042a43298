"""GMemSeed reconciler: its own worker (workqueue.py), beside the ComputeJob reconciler.

For each seed (decisions in memoplane.cluster.seeds): validate the spec, open its overlay
(the operator is the seed's only writer, so an open seed is kept between passes), apply the
batches writers left in its inbox, seal them into the store, compact past a threshold, put
the overlay blob that jobs receive, write status, and only then delete the applied
batches. A resync revisits every seed now and then (an inbox batch whose annotation touch
was lost is still applied).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from memoplane.cas import Store
from memoplane.cluster import protocol as p
from memoplane.cluster import seeds as sd
from memoplane.cluster.kube import Kube
from memoplane.cluster.stores import Stores
from memoplane.errors import MemoplaneError, NotFound, StoreCorrupted
from memoplane.gmem import GMemParams, GMemStore, StoredGMem
from memoplane.gmem.engine import from_bits
from memoplane.gmem.log import HEADER_SIZE, RECORD, parse
from memoplane.gmem.persist import params_digest, params_document
from memoplane.gmem.transfer import overlay_npy
from memoplane.leftovers import temp_prefix

from .workqueue import Lane, WorkQueue

log = logging.getLogger("memoplane.operator.gmemseed")

Ref = tuple[str, str]  # (namespace, name); a drop: (namespace, uid)

SEED_LANE, DROP_LANE = "seed", "drop"


class SeedReconciler:
    def __init__(self, kube: Kube, stores: Stores, patterns: list[str], resync_seconds: float = 10.0) -> None:
        self.kube, self.stores, self.patterns = kube, stores, patterns
        self.resync_seconds = resync_seconds
        # The active log segments: sealed before every status write, so never the only copy.
        self.local_dir = tempfile.mkdtemp(prefix=temp_prefix("gmem"))
        self.work = WorkQueue("gmemseeds", [Lane(DROP_LANE), Lane(SEED_LANE)], resync_seconds,
                              max(120.0, 10 * resync_seconds), log)
        self._open: dict[tuple[str, str], tuple[GMemParams, StoredGMem]] = {}  # (namespace, uid)
        self._states: dict[tuple[str, str], sd.SeedState] = {}

    @property
    def healthy_at(self) -> float:
        return self.work.healthy_at

    # -- queue -------------------------------------------------------------------------------

    def enqueue(self, namespace: str, name: str) -> None:
        self.work.put(SEED_LANE, (namespace, name))

    def deleted(self, body: Mapping[str, Any]) -> None:
        """A deleted seed: its objects in the store go (before any seed is reconciled)."""
        meta = body.get("metadata") or {}
        if meta.get("uid"):
            self.work.put(DROP_LANE, (str(meta.get("namespace")), str(meta["uid"])), body)

    def start(self) -> None:
        self.work.start(self._handle, self.resync)

    def stop(self) -> None:
        self.work.stop()
        for _, seed in self._open.values():
            seed.close()
        shutil.rmtree(self.local_dir, ignore_errors=True)

    def live(self) -> bool:
        return self.work.live()

    def _handle(self, lane: str, ref: Ref, body: Mapping[str, Any] | None) -> None:
        if lane == DROP_LANE and body is not None:
            self.drop(body)
        else:
            self.reconcile(*ref)

    def resync(self) -> None:
        listed, _ = self.kube.list(p.GMEMSEEDS)
        for obj in listed:
            meta = obj.get("metadata") or {}
            if p.namespace_matches(self.patterns, str(meta.get("namespace"))):
                self.enqueue(str(meta["namespace"]), str(meta["name"]))

    # -- one seed ------------------------------------------------------------------------------

    def reconcile(self, namespace: str, name: str) -> None:
        obj = self.kube.get(p.GMEMSEEDS, namespace, name)
        if obj is None or not p.namespace_matches(self.patterns, namespace):
            return
        meta, status = obj.get("metadata") or {}, obj.get("status") or {}
        generation, uid = int(meta.get("generation") or 0), str(meta["uid"])
        now = datetime.now(UTC)
        params = sd.parse_seed(obj)
        if isinstance(params, str):
            self._write(obj, sd.stalled(status, generation, p.REASON_INVALID, params, now), p.REASON_INVALID)
            return
        bucket, prefix = sd.location(namespace)
        try:
            store = self.stores.get(bucket, prefix)
            opened = self._seed(namespace, uid, params, store)
            if isinstance(opened, str):
                self._write(obj, sd.stalled(status, generation, sd.REASON_PARAMS_CHANGED, opened, now),
                            sd.REASON_PARAMS_CHANGED)
                return
            gstore = GMemStore.of(store)
            batches = gstore.queued(sd.store_name(uid))
            state = self._states.get((namespace, uid))
            if batches or state is None:
                self._apply(obj, opened, params, store, batches)
                state = self._state(opened, store, p.store_url(bucket, prefix))
                self._states[(namespace, uid)] = state
            patch = sd.ready(status, generation, state, now)
            if status.get("digest") != state.digest:
                self.kube.event(obj, "OverlayUpdated", f"version {state.version}, digest {state.digest[:15]}…, "
                                                       f"{state.overlay_entries} overlay entries")
            self._write(obj, patch)
            for batch in batches:  # applied, sealed and visible in status: only now forgotten
                gstore.unqueue(batch)
        except MemoplaneError as exc:
            # The store is down or damaged: forget what is open (reopened from the store next time).
            self._forget(namespace, uid)
            self._write(obj, sd.reconciling(status, generation, p.REASON_STORE, str(exc), now), p.REASON_STORE)

    def _seed(self, namespace: str, uid: str, params: GMemParams, store: Store) -> StoredGMem | str:
        """The open seed, or why its parameters cannot be used (a changed spec)."""
        cached = self._open.get((namespace, uid))
        if cached is not None:
            if cached[0] == params:
                return cached[1]
            self._forget(namespace, uid)
        name = sd.store_name(uid)
        gstore = GMemStore.of(store, f"{self.local_dir}/{namespace}")
        bound = gstore.bound_document(name)
        if bound is not None and bound != params_document(params):
            return sd.params_changed_message(bound.decode())
        seed, report = gstore.open(name, params)
        if report.dropped_records:
            log.warning("gmemseed %s/%s: dropped %d records of a torn batch", namespace, uid, report.dropped_records)
        self._open[(namespace, uid)] = (params, seed)
        return seed

    def _apply(self, obj: Mapping[str, Any], seed: StoredGMem, params: GMemParams, store: Store,
               batches: list[str]) -> None:
        """Apply inbox batches in order, seal them into the store, compact when due."""
        want = params_digest(params)
        for batch in batches:
            try:
                replay = parse(GMemStore.of(store).read_batch(batch), batch)
                if replay.dropped_bytes or replay.header.params_digest != want:
                    raise StoreCorrupted(f"{batch}: damaged, or written for other parameters", "write again")
            except NotFound:
                continue
            except StoreCorrupted as exc:
                self.kube.event(obj, "WriteRejected", str(exc), warning=True)
                continue
            seed.gmem.write_many(replay.addrs, from_bits(replay.bits, seed.gmem.dtype))
        seed.seal()
        objects = _objects(seed)
        last_snapshot = max((n for kind, n, _ in objects if kind == "snapshot"), default=0)
        after = [size for kind, n, size in objects if kind == "log" and n > last_snapshot]
        records = sum((size - HEADER_SIZE) // RECORD.itemsize for size in after)
        if sd.compaction_due(len(after), records):
            seed.compact()

    def _state(self, seed: StoredGMem, store: Store, url: str) -> sd.SeedState:
        status = seed.status()
        data = overlay_npy(seed.gmem.overlay)
        blob = None
        if data is not None:
            ref = store.put_bytes(data)
            blob = (ref.digest, ref.size)
        return sd.SeedState(status["digest"], status["version"], status["overlayEntries"], url, blob)

    def _write(self, obj: Mapping[str, Any], patch: dict[str, Any], event_reason: str | None = None) -> None:
        meta, status = obj.get("metadata") or {}, obj.get("status") or {}
        if sd.unchanged(status, patch):
            return
        try:
            self.kube.patch_status(p.GMEMSEEDS, str(meta["namespace"]), str(meta["name"]), patch)
        except ApiException as exc:
            if exc.status != 404:
                raise
            return
        if event_reason is not None:
            message = next((c.get("message") for c in patch["conditions"] if c.get("type") == "Ready"), "")
            self.kube.event(obj, event_reason, str(message), warning=True)

    def _forget(self, namespace: str, uid: str) -> None:
        cached = self._open.pop((namespace, uid), None)
        self._states.pop((namespace, uid), None)
        if cached is not None:
            cached[1].close()

    def drop(self, body: Mapping[str, Any]) -> None:
        """A deleted GMemSeed: its overlay, logs, snapshots and inbox go too."""
        meta = body.get("metadata") or {}
        namespace, uid = str(meta.get("namespace")), str(meta.get("uid"))
        self._forget(namespace, uid)
        store = self.stores.get(*sd.location(namespace))
        name = sd.store_name(uid)
        GMemStore.of(store, f"{self.local_dir}/{namespace}").drop(name)  # inbox, segments, params
        log.info("gmemseed %s/%s deleted: dropped gmem/%s", namespace, meta.get("name"), name)


def _objects(seed: StoredGMem) -> list[tuple[str, int, int]]:
    """(kind, number, size) of the seed's logs and snapshots in the store."""
    return seed.store.segment_sizes(seed.name)


def register(registry: kopf.OperatorRegistry, seeds: SeedReconciler) -> None:
    @kopf.on.startup(registry=registry)
    def start_seeds(**_: Any) -> None:
        seeds.start()

    @kopf.on.cleanup(registry=registry)
    def stop_seeds(**_: Any) -> None:
        seeds.stop()

    @kopf.on.event(p.GROUP, p.VERSION, p.GMEMSEEDS, registry=registry)
    def seed_event(event: kopf.RawEvent, namespace: str | None, name: str, **_: Any) -> None:
        if event.get("type") == "DELETED":
            seeds.deleted(event.get("object") or {})
        elif namespace:
            seeds.enqueue(namespace, name)

    @kopf.on.probe(id="gmemseeds", registry=registry)
    def seeds_alive(**_: Any) -> bool:
        if not seeds.live():
            raise kopf.PermanentError("the GMemSeed reconciler thread is stalled or dead")
        return True
