"""The memoplane stack on the local control plane: the operator and two agents as local
processes (memoplane.testing.processes), scoped to this session's namespaces so that
several sessions can share one API server. A component that cannot start fails the tests.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from openlineage_check import LineageReceiver

from memoplane.cas import Store
from memoplane.cluster import protocol as p
from memoplane.cluster.kube import Kube, load_config
from memoplane.cluster.stores import Stores, StoreSettings
from memoplane.settings import CHUNK_TASK_BYTES_ENV, OBJECT_INPUTS_ENV, OPENLINEAGE_URL_ENV
from memoplane.testing import cluster, processes

SESSION = uuid.uuid4().hex[:6]
PREFIX = f"mpt-{SESSION}-"
NODES = ("node-a", "node-b")
# The stack's fromObject allowlist (the chart's objectInputs): every namespace may read
# s3://INPUTS_BUCKET/OPEN_PREFIX..., nothing else.
INPUTS_BUCKET = "mpt-inputs"
OPEN_PREFIX = "open/"
OBJECT_INPUTS = json.dumps([{"namespaces": "*", "bucket": INPUTS_BUCKET, "prefix": OPEN_PREFIX}])
_METRIC = re.compile(r'^memoplane_agent_runs_total\{outcome="(\w+)"\}\s+([0-9.e+]+)$', re.M)


@dataclass
class Stack:
    cfg: processes.StackConfig
    kube: Kube
    stores: Stores
    lineage: LineageReceiver | None = None   # the OpenLineage endpoint the operator and agents send to

    def ensure(self) -> None:
        """Start whatever is not running (a test may have killed a process)."""
        try:
            processes.up(self.cfg, NODES)
        except processes.ProcessError as exc:
            pytest.fail(f"the memoplane stack cannot start: {exc}", pytrace=False)

    def proc(self, name: str) -> processes.Proc:
        proc = processes.load(self.cfg.directory, name)
        assert proc is not None, f"{name} is not running"
        return proc

    def agent_runs(self, node: str) -> float:
        """Jobs the agent ran in a sandbox since it started (succeeded + failed)."""
        with urllib.request.urlopen(self.proc(processes.AGENT_PREFIX + node).url("http", "/metrics"),
                                    timeout=5) as response:
            text = response.read().decode()
        return sum(float(v) for _, v in _METRIC.findall(text))

    def total_runs(self) -> float:
        return sum(self.agent_runs(n) for n in NODES)

    def kill_agent(self, node: str) -> None:
        processes.kill(self.cfg.directory, processes.AGENT_PREFIX + node)

    def kill_operator(self) -> None:
        processes.kill(self.cfg.directory, processes.OPERATOR)

    def start_operator(self) -> None:
        try:
            processes.start_operator(self.cfg)
        except processes.ProcessError as exc:
            pytest.fail(str(exc), pytrace=False)

    def store(self, namespace: str) -> Store:
        return self.stores.get(p.DEFAULT_BUCKET, p.default_store_prefix(namespace))

    # -- jobs ----------------------------------------------------------------------------

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        obj = self.kube.get(p.COMPUTEJOBS, namespace, name)
        assert obj is not None, f"ComputeJob {namespace}/{name} does not exist"
        return obj

    def wait(self, namespace: str, name: str, until: Callable[[dict[str, Any]], bool] | None = None,
             timeout: float = 120.0) -> dict[str, Any]:
        """Poll until `until(obj)` (default: a final phase for the current generation)."""
        def final(obj: dict[str, Any]) -> bool:
            status = obj.get("status") or {}
            return status.get("phase") in p.TERMINAL and \
                status.get("observedGeneration") == obj["metadata"]["generation"]
        check = until or final
        deadline = time.monotonic() + timeout
        obj = self.get(namespace, name)
        while not check(obj):
            if time.monotonic() > deadline:
                raise AssertionError(f"ComputeJob {namespace}/{name} did not get there in {timeout:.0f}s; "
                                     f"status: {json.dumps(obj.get('status'), indent=1)}\n"
                                     f"{self.logs()}")
            time.sleep(0.25)
            obj = self.get(namespace, name)
        return obj

    def wait_all(self, namespace: str, names: list[str], timeout: float = 180.0) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        return {n: self.wait(namespace, n, timeout=max(1.0, deadline - time.monotonic())) for n in names}

    def apply(self, namespace: str, *manifests: dict[str, Any]) -> None:
        for manifest in manifests:
            body = {**manifest, "metadata": {**manifest["metadata"], "namespace": namespace}}
            assert self.kube.create(p.COMPUTEJOBS, namespace, body) is not None, f"{body['metadata']} exists"

    def events(self, namespace: str, name: str, reason: str) -> list[str]:
        """The messages of the Events with `reason` posted about the object `name`."""
        items = self.kube.core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
        return [e.message for e in items if e.reason == reason]

    def eventually_events(self, namespace: str, name: str, reason: str, timeout: float = 30.0) -> list[str]:
        """Events are posted in the background: wait (with a deadline) for the first ones."""
        deadline = time.monotonic() + timeout
        while not (found := self.events(namespace, name, reason)):
            assert time.monotonic() < deadline, f"no {reason} Event on {namespace}/{name}"
            time.sleep(0.25)
        return found

    def logs(self, lines: int = 15) -> str:
        out = []
        for name in processes.names(self.cfg.directory):
            proc = processes.load(self.cfg.directory, name)
            if proc:
                out.append(f"--- {name}:\n{processes.log_tail(proc, lines)}")
        return "\n".join(out)


CHUNK_TASK_BYTES = 4096   # spec.map.overChunks: small chunks, so a table of a few thousand rows has many


@pytest.fixture(scope="session")
def stack(control_plane: cluster.ClusterInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    directory = Path(tmp_path_factory.mktemp("memoplane-stack"))
    lineage = LineageReceiver()
    cfg = processes.StackConfig(
        directory=directory, env=control_plane.env(), watch_namespaces=PREFIX + "*",
        lease_namespace=PREFIX + "system",
        extra_env={"MEMOPLANE_BACKOFF_BASE": "0.2", "MEMOPLANE_STATS_SECONDS": "3",
                   "MEMOPLANE_RESYNC_SECONDS": "1", "MEMOPLANE_RETENTION_SECONDS": "1",
                   # retention and sweeps only touch caches with spec.retention: test_retention.py's
                   "MEMOPLANE_RETENTION_GRACE_SECONDS": "2", "MEMOPLANE_GC_GRACE_SECONDS": "2", OBJECT_INPUTS_ENV: OBJECT_INPUTS,
                   # demotion only touches caches with spec.tiers: test_cold_tier.py's
                   "MEMOPLANE_DEMOTE_SECONDS": "1",
                   OPENLINEAGE_URL_ENV: lineage.url,
                   CHUNK_TASK_BYTES_ENV: str(CHUNK_TASK_BYTES)})
    stores = Stores(StoreSettings.from_env(control_plane.env()))
    stack = Stack(cfg, Kube(load_config(control_plane.kubeconfig)), stores, lineage)
    try:
        stack.ensure()
        yield stack
    finally:
        processes.down(directory)
        lineage.close()
        stores.close()
        for ns in stack.kube.core.list_namespace().items:
            if ns.metadata.name.startswith(PREFIX):
                stack.kube.core.delete_namespace(ns.metadata.name)


@pytest.fixture
def ns(stack: Stack) -> Iterator[str]:
    stack.ensure()
    name = PREFIX + uuid.uuid4().hex[:6]
    stack.kube.ensure_namespace(name)
    yield name
    stack.kube.core.delete_namespace(name)
