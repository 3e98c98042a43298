"""Shared by the cluster benchmarks (hit_latency, throughput, miss_latency): a private
memoplane stack and a watch that timestamps when jobs become Ready.

`stack()` reuses the control plane running in MEMOPLANE_CLUSTER_DIR (or starts one and
stops it again at the end), starts the operator and two agents as local processes scoped
to the benchmark's own namespaces, and at the end stops only those processes (by their
pid records) and deletes only its namespaces. The raw namespace (`Bench.raw_ns`) is not
watched by the operator: objects there measure the API server alone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import watch

from memoplane.api.specs import computejob_manifest
from memoplane.cluster import protocol as p
from memoplane.cluster.kube import Kube, load_config
from memoplane.testing import cluster, processes

NODES = ("node-a", "node-b")
Pred = Callable[[dict[str, Any]], bool]


def ready(cached: bool | None) -> Pred:
    """Succeeded for the current generation, Ready=True, and (unless None) cached as given."""
    def check(obj: dict[str, Any]) -> bool:
        s = obj.get("status") or {}
        if s.get("phase") != p.SUCCEEDED or s.get("observedGeneration") != obj["metadata"].get("generation"):
            return False
        if cached is not None and s.get("cached") is not cached:
            return False
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in s.get("conditions") or ())
    return check


def failed(obj: dict[str, Any]) -> bool:
    return (obj.get("status") or {}).get("phase") == p.FAILED


class Watcher:
    """One watch over a namespace's ComputeJobs; records (perf_counter) when each job first
    satisfies `pred`. Observing through a watch is what a client (kubectl wait) does."""

    def __init__(self, kube: Kube, namespace: str, pred: Pred) -> None:
        self.kube, self.namespace, self.pred = kube, namespace, pred
        self.seen: dict[str, float] = {}
        self.failures: dict[str, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        _, rv = self._list()
        self._rv = rv
        self._thread = threading.Thread(target=self._run, name=f"watch-{namespace}", daemon=True)
        self._thread.start()

    def _list(self) -> tuple[list[dict[str, Any]], str]:
        out = self.kube.custom.list_namespaced_custom_object(p.GROUP, p.VERSION, self.namespace, p.COMPUTEJOBS)
        return list(out.get("items") or []), str(out["metadata"]["resourceVersion"])

    def _run(self) -> None:
        while not self._stop.is_set():
            w = watch.Watch()
            try:
                for event in w.stream(self.kube.custom.list_namespaced_custom_object, p.GROUP, p.VERSION,
                                      self.namespace, p.COMPUTEJOBS, resource_version=self._rv,
                                      timeout_seconds=60, allow_watch_bookmarks=True):
                    obj = event["object"]
                    now = time.perf_counter()
                    self._rv = obj["metadata"]["resourceVersion"]
                    if event["type"] not in ("ADDED", "MODIFIED"):
                        continue
                    name = obj["metadata"]["name"]
                    if name not in self.seen and (self.pred(obj) or failed(obj)):
                        with self._cond:
                            if failed(obj):
                                self.failures[name] = obj.get("status") or {}
                            self.seen[name] = now
                            self._cond.notify_all()
                    if self._stop.is_set():
                        return
            except Exception as exc:  # noqa: BLE001 - a dropped watch: resume from the last resourceVersion
                if "410" in str(exc):
                    _, self._rv = self._list()
                time.sleep(0.05)
            finally:
                w.stop()

    def wait(self, names: list[str] | str, timeout: float = 300.0) -> float:
        """Block until every name was seen; returns the latest time seen."""
        wanted = [names] if isinstance(names, str) else names
        deadline = time.monotonic() + timeout
        with self._cond:
            while not all(n in self.seen for n in wanted):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [n for n in wanted if n not in self.seen]
                    raise TimeoutError(f"{len(missing)} jobs not Ready in {timeout:.0f}s, e.g. {missing[:3]}")
                self._cond.wait(timeout=min(left, 1.0))
        bad = {n: self.failures[n] for n in wanted if n in self.failures}
        if bad:
            name, status = next(iter(bad.items()))
            raise RuntimeError(f"{len(bad)} jobs failed, e.g. {name}: {status.get('reason')}: {status.get('message')}")
        return max(self.seen[n] for n in wanted)

    def close(self) -> None:
        self._stop.set()


@dataclass
class Bench:
    kube: Kube
    ns: str          # watched by the operator
    raw_ns: str      # not watched: the API server alone
    cfg: processes.StackConfig

    def job(self, name: str, source: str, inputs: dict[str, Any], salt: str) -> dict[str, Any]:
        body = {"python": {"source": source, "entrypoint": "main"},
                "inputs": [{"name": k, "value": v} for k, v in inputs.items()], "cache": {"version": salt}}
        return computejob_manifest(name, None, body)

    def create(self, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
        body = {**manifest, "metadata": {**manifest["metadata"], "namespace": namespace}}
        out = self.kube.create(p.COMPUTEJOBS, namespace, body)
        if out is None:
            raise RuntimeError(f"{namespace}/{manifest['metadata']['name']} exists")
        return out

    def raw_round_trip(self, manifest: dict[str, Any]) -> None:
        """What a cache hit minimally costs on the API server: create the object, then
        write a Ready status to it (the watch then sees it)."""
        created = self.create(self.raw_ns, manifest)
        self.kube.patch_status(p.COMPUTEJOBS, self.raw_ns, created["metadata"]["name"], ready_status(),
                               created["metadata"]["resourceVersion"])


def ready_status() -> dict[str, Any]:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"phase": p.SUCCEEDED, "cached": True, "observedGeneration": 1, "reason": p.REASON_CACHE_HIT,
            "result": {"digest": "b3:" + "0" * 64, "size": 1, "value": 1},
            "conditions": [{"type": "Ready", "status": "True", "reason": p.REASON_CACHE_HIT, "message": "raw",
                            "lastTransitionTime": now, "observedGeneration": 1}]}


@contextlib.contextmanager
def stack(label: str, extra_env: dict[str, str] | None = None) -> Iterator[Bench]:
    """Control plane (reused if up), operator + 2 agents in a scratch directory (with `extra_env`),
    and the benchmark's two namespaces; everything this started is stopped at the end."""
    directory = cluster.state_dir()
    up = cluster.up(directory, owner=f"bench:{os.getpid()}")
    info = up.info
    prefix = f"mpb-{label}-{uuid.uuid4().hex[:5]}-"
    tmp = tempfile.mkdtemp(prefix="memoplane-bench-")
    cfg = processes.StackConfig(directory=Path(tmp), env=info.env(), watch_namespaces=prefix + "*",
                                lease_namespace=prefix + "system", extra_env=extra_env or {})
    kube = Kube(load_config(info.kubeconfig))
    namespaces = [prefix + "jobs", prefix.replace("mpb-", "mpr-", 1) + "raw"]
    ok = False
    try:
        processes.up(cfg, NODES)
        for name in namespaces:
            kube.ensure_namespace(name)
        yield Bench(kube, namespaces[0], namespaces[1], cfg)
        ok = True
    finally:
        processes.down(cfg.directory)
        for name in namespaces:
            # The local control plane has no namespace controller: a deleted namespace keeps
            # its objects, and the next run's lists would carry them. Delete the jobs first.
            with contextlib.suppress(Exception):
                kube.custom.delete_collection_namespaced_custom_object(p.GROUP, p.VERSION, name, p.COMPUTEJOBS)
            with contextlib.suppress(Exception):
                kube.custom.delete_collection_namespaced_custom_object(p.GROUP, p.VERSION, name, p.RESULTCACHES)
            with contextlib.suppress(Exception):
                kube.core.delete_namespace(name)
        if not up.already_running:
            cluster.down(directory)
        if ok:  # keep the processes' logs of a failed run
            shutil.rmtree(tmp, ignore_errors=True)


def quantile_ms(samples: list[float], q: int) -> float:
    """q-th percentile (1..99) in milliseconds."""
    if len(samples) < 2:
        return samples[0] * 1000
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1] * 1000


def load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min) {five:.2f} (5 min) on {os.cpu_count()} cpus"
