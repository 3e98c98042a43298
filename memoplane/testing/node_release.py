"""memoplane as its chart installs it on the local node (`hack/cluster up --with-node --with-memoplane`):
the release, its pods, the agents' run counters, and ComputeJobs applied and awaited through the API
server. Shared by the node's fault and hostile tests and bench/pod.py; the install itself is the
command's, so these work with whatever values it chooses.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memoplane.api.specs import computejob_manifest
from memoplane.cas import Store
from memoplane.cluster import protocol as p
from memoplane.cluster.kube import Kube, load_config
from memoplane.cluster.stores import Stores
from memoplane.history import RunRecord
from memoplane.testing import build, cluster, node_chart

AGENT, OPERATOR = "agent", "operator"  # the chart's app.kubernetes.io/component labels
_RUNS = re.compile(r'^memoplane_agent_runs_total\{outcome="(\w+)"\}\s+([0-9.e+]+)$', re.M)
Obj = dict[str, Any]


class ReleaseError(cluster.ClusterError):
    """The chart's release on the node is missing or not as expected."""


def _hack_cluster(directory: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MEMOPLANE_CLUSTER_DIR": str(directory)}
    return subprocess.run([str(build.REPO_ROOT / "hack" / "cluster"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def up(directory: Path) -> cluster.ClusterInfo:
    """`hack/cluster up --with-node --with-memoplane` on `directory`: the node with the chart installed."""
    proc = _hack_cluster(directory, "up", "--with-node", "--with-memoplane", timeout=1200)
    info = cluster.load_info(directory)
    if proc.returncode != 0 or info is None:
        raise ReleaseError(f"hack/cluster up --with-node --with-memoplane exited {proc.returncode}:\n"
                           f"{proc.stderr[-3000:]}")
    return info


def down(directory: Path) -> str:
    """`hack/cluster down` on `directory`; returns what it said."""
    proc = _hack_cluster(directory, "down", timeout=300)
    return proc.stderr


@dataclass(frozen=True)
class Release:
    info: cluster.ClusterInfo
    name: str
    namespace: str

    def kubectl(self, *args: str, stdin: str | None = None, timeout: float = 120
                ) -> subprocess.CompletedProcess[str]:
        argv = ["kubectl", f"--kubeconfig={self.info.kubeconfig}", "-n", self.namespace, *args]
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise ReleaseError(f"{' '.join(argv[2:])} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def pods(self, component: str) -> list[Obj]:
        """The component's pods that are not being deleted."""
        selector = f"app.kubernetes.io/instance={self.name},app.kubernetes.io/component={component}"
        items: list[Obj] = json.loads(self.kubectl("get", "pods", "-l", selector, "-o", "json").stdout)["items"]
        return [pod for pod in items if not pod["metadata"].get("deletionTimestamp")]

    def wait_ready(self, component: str, timeout: float = 300.0, not_uid: str | None = None) -> Obj:
        """A Ready pod of the component (other than the pod `not_uid`), once there is one."""
        deadline = time.monotonic() + timeout
        while True:
            for pod in self.pods(component):
                if pod["metadata"]["uid"] != not_uid and pod_ready(pod):
                    return pod
            if time.monotonic() > deadline:
                raise ReleaseError(f"no Ready {component} pod of {self.name} within {timeout:.0f}s:\n"
                                   f"{self.describe()}")
            time.sleep(0.5)

    def describe(self) -> str:
        """Pods and recent events of the release's namespace, for a failure message."""
        try:
            pods = self.kubectl("get", "pods", "-o", "wide").stdout
            events = self.kubectl("get", "events", "--sort-by=.lastTimestamp").stdout
        except (ReleaseError, subprocess.TimeoutExpired) as exc:
            return f"(cannot describe the release: {exc})"
        return f"pods:\n{pods}\nevents:\n{events[-3000:]}"

    def delete_pod(self, pod: Obj, *, force: bool = False) -> None:
        grace = ["--grace-period=0", "--force"] if force else []
        self.kubectl("delete", "pod", pod["metadata"]["name"], "--wait=false", *grace)


def find_release(info: cluster.ClusterInfo) -> Release:
    """The chart's release on the node, once `up` installed it."""
    listed = node_chart.helm(info, "status", node_chart.RELEASE)
    if listed.returncode != 0:
        raise ReleaseError(f"no release {node_chart.RELEASE} in {node_chart.NAMESPACE}: {listed.stderr.strip()}")
    return Release(info, node_chart.RELEASE, node_chart.NAMESPACE)


def pod_ready(pod: Obj) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def restarts(pod: Obj) -> int:
    return sum(int(c.get("restartCount", 0)) for c in (pod.get("status") or {}).get("containerStatuses") or [])


def _http_port(pod: Obj) -> int:
    for container in pod["spec"]["containers"]:
        for port in container.get("ports") or []:
            if port.get("name") == "http":
                return int(port["containerPort"])
    raise ReleaseError(f"pod {pod['metadata']['name']} has no port named http")


def agent_runs(pod: Obj) -> float:
    """Jobs the agent pod ran in a sandbox since its container started (succeeded + failed)."""
    url = f"http://{pod['status']['podIP']}:{_http_port(pod)}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return sum(float(value) for _, value in _RUNS.findall(text))


# -- ComputeJobs ---------------------------------------------------------------------------


def job(name: str, source: str, inputs: dict[str, Any], *, salt: str | None = None, **spec: Any) -> Obj:
    """A Python ComputeJob; `salt` (cache.version, default: new each call) keeps its key its own."""
    body: Obj = {"python": {"source": source, "entrypoint": "main"},
                 "inputs": [{"name": k, "value": v} for k, v in inputs.items()],
                 "cache": {"version": salt or uuid.uuid4().hex[:12]}, **spec}
    return computejob_manifest(name, None, body)


def status(obj: Obj) -> Obj:
    return obj.get("status") or {}


def namespace_store(stores: Stores, namespace: str) -> Store:
    """The store of the namespace's default ResultCache."""
    return stores.get(p.DEFAULT_BUCKET, p.default_store_prefix(namespace))


def run_records(store: Store, namespace: str, name: str) -> dict[str, RunRecord]:
    """The job's run records (one per settled run), by run id."""
    found = {}
    for run_id in store.run_record_ids():
        data = store.run_record(run_id)
        record = RunRecord.from_json(data) if data is not None else None
        if record is not None and (record.job.namespace, record.job.name) == (namespace, name):
            found[run_id] = record
    return found


def final(obj: Obj) -> bool:
    """A final phase for the object's current generation."""
    status = obj.get("status") or {}
    return status.get("phase") in p.TERMINAL and status.get("observedGeneration") == obj["metadata"]["generation"]


@dataclass(frozen=True)
class Jobs:
    kube: Kube

    @classmethod
    def connect(cls, info: cluster.ClusterInfo) -> Jobs:
        return cls(Kube(load_config(info.kubeconfig)))

    def apply(self, namespace: str, *manifests: Obj) -> None:
        for manifest in manifests:
            body = {**manifest, "metadata": {**manifest["metadata"], "namespace": namespace}}
            if self.kube.create(p.COMPUTEJOBS, namespace, body) is None:
                raise ReleaseError(f"ComputeJob {namespace}/{manifest['metadata']['name']} exists")

    def get(self, namespace: str, name: str) -> Obj:
        obj = self.kube.get(p.COMPUTEJOBS, namespace, name)
        if obj is None:
            raise ReleaseError(f"ComputeJob {namespace}/{name} does not exist")
        return obj

    def wait(self, namespace: str, name: str, until: Callable[[Obj], bool] = final, timeout: float = 300.0) -> Obj:
        """Poll until `until(obj)`; raises TimeoutError with the last status."""
        deadline = time.monotonic() + timeout
        obj = self.get(namespace, name)
        while not until(obj):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ComputeJob {namespace}/{name} not there in {timeout:.0f}s; "
                                   f"status: {json.dumps(obj.get('status'))}")
            time.sleep(0.25)
            obj = self.get(namespace, name)
        return obj

    def wait_all(self, namespace: str, names: list[str], timeout: float = 600.0) -> dict[str, Obj]:
        deadline = time.monotonic() + timeout
        return {n: self.wait(namespace, n, timeout=max(1.0, deadline - time.monotonic())) for n in names}
