"""A cache-miss ComputeJob through the agent pod on the real node, against the same job through
the agent as a host process, in the same run (issue 15); and `helm install` to the first job Ready.

    flock /tmp/memoplane-node.lock python bench/pod.py [--quick] [-n N]

One node runs per machine (fixed host paths): hold the lock for the run. The run brings up its own
set with the chart installed (`hack/cluster up --with-node --with-memoplane` in
$MEMOPLANE_CLUSTER_DIR-podbench) and stops it at the end. Then, on that set:

1. `helm uninstall` the release, apply a first cache-miss job, then time `helm install` (the same
   values, the operator watching only the benchmark's namespace) until that job is Ready. Baseline:
   a plain pod (the node's toolbox image) from create to Ready on the same node, just before.
2. The operator and two agents as host processes (bench/_cluster.stack, as `--with-memoplane`
   without `--with-node` starts them) next to the release, on the same API server and MinIO,
   each watching its own namespace. n cache-miss jobs (a new key each), interleaved one by one
   pod / host, apply -> Ready seen by a watch; p50 and p99 each, ratio pod / host.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cluster import Watcher, load_note, quantile_ms, ready, stack
from _common import emit, metric

from memoplane.cluster.kube import Kube
from memoplane.testing import cluster, node_chart, node_images, node_release

SOURCE = "def main(i):\n    return i + 1\n"


def _pod_status(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    """The pod as the API serves it (camelCase keys, as node_release reads them)."""
    pod: dict[str, Any] = kube.core.api_client.sanitize_for_serialization(
        kube.core.read_namespaced_pod_status(name, namespace))
    return pod


def _toolbox_pod_seconds(kube: Kube, namespace: str) -> float:
    """Create -> Ready of a plain pod on the node: what any pod costs to start here."""
    name = f"toolbox-{uuid.uuid4().hex[:5]}"
    body: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"hostNetwork": True, "terminationGracePeriodSeconds": 0, "containers": [{
                "name": "toolbox", "image": node_images.TOOLBOX_IMAGE, "imagePullPolicy": "Never",
                "command": ["sleep", "3600"]}]}}
    t = time.perf_counter()
    kube.core.create_namespaced_pod(namespace, body)  # type: ignore[arg-type]  # the client takes a dict too
    while not node_release.pod_ready(_pod_status(kube, namespace, name)):
        time.sleep(0.05)
    seconds = time.perf_counter() - t
    kube.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
    return seconds


def _job(name: str, i: int, salt: str) -> dict[str, Any]:
    return node_release.job(name, SOURCE, {"i": i}, salt=salt)


def _create(jobs: node_release.Jobs, namespace: str, manifest: dict[str, Any]) -> float:
    """Create the job; returns the time just before the call."""
    t = time.perf_counter()
    jobs.apply(namespace, manifest)
    return t


def _reinstall(info: cluster.ClusterInfo, jobs: node_release.Jobs, seen: Watcher, salt: str) -> tuple[float, float]:
    """helm uninstall; a first job applied (the CRDs stay: crds.keep); then helm install with the same
    values, the operator watching only `seen`'s namespace. Returns the seconds from the install's
    start to that job Ready, and the seconds helm itself took (--wait: every pod Ready)."""
    node_chart.uninstall(info)
    _create(jobs, seen.namespace, _job("first", 0, salt))
    helm_s: list[float] = []
    t = time.perf_counter()
    installing = threading.Thread(target=lambda: helm_s.append(
        node_chart.install(info, {"watchNamespaces": seen.namespace})))
    installing.start()
    ready_s = seen.wait("first", timeout=600) - t
    installing.join()
    if not helm_s:
        raise RuntimeError("helm install failed (its error is above)")
    return ready_s, helm_s[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("-n", type=int, default=None)
    args = parser.parse_args()
    n = args.n or (8 if args.quick else 30)
    salt, host_salt = uuid.uuid4().hex[:12], uuid.uuid4().hex[:12]  # keys of their own: every job a miss
    directory = Path(f"{cluster.state_dir()}-podbench")
    os.environ["MEMOPLANE_CLUSTER_DIR"] = str(directory)  # bench/_cluster.stack reuses this set
    t = time.perf_counter()
    info = node_release.up(directory)
    up_s = time.perf_counter() - t
    try:
        jobs = node_release.Jobs.connect(info)
        pod_ns = f"podbench-{uuid.uuid4().hex[:5]}"
        jobs.kube.ensure_namespace(pod_ns)
        toolbox_s = _toolbox_pod_seconds(jobs.kube, pod_ns)
        pod_jobs = Watcher(jobs.kube, pod_ns, ready(cached=False))
        install_s, helm_s = _reinstall(info, jobs, pod_jobs, salt)
        with stack("pod") as host:
            host_jobs = Watcher(host.kube, host.ns, ready(cached=False))
            for i in range(1, 4):  # warm both paths (sandbox pools, connections) untimed
                _create(jobs, pod_ns, _job(f"w{i}", -i, salt))
                pod_jobs.wait(f"w{i}", timeout=300)
                host.create(host.ns, _job(f"w{i}", -i, host_salt))
                host_jobs.wait(f"w{i}", timeout=300)
            pod_s: list[float] = []
            host_s: list[float] = []
            for i in range(1, n + 1):
                name = f"miss-{i:04d}"
                start = _create(jobs, pod_ns, _job(name, i, salt))
                pod_s.append(pod_jobs.wait(name) - start)
                start = time.perf_counter()
                host.create(host.ns, _job(name, i, host_salt))
                host_s.append(host_jobs.wait(name) - start)
            for w in (pod_jobs, host_jobs):
                w.close()
    finally:
        node_release.down(directory)
    metrics = {}
    for q in (50, 99):
        ours, base = quantile_ms(pod_s, q), quantile_ms(host_s, q)
        metrics[f"pod_miss_apply_to_ready_p{q}"] = metric(round(ours, 2), "ms", f"host_process_agent_p{q}",
                                                          round(base, 2))
        print(f"p{q}: cache-miss job apply->Ready through the agent pod {ours:7.1f} ms   "
              f"agent as a host process {base:7.1f} ms")
    metrics["helm_install_to_first_job_ready"] = metric(round(install_s, 2), "s", "toolbox_pod_create_to_ready",
                                                        round(toolbox_s, 2))
    print(f"helm install -> first job Ready {install_s:.1f} s (helm install --wait alone {helm_s:.1f} s)   "
          f"a toolbox pod create -> Ready {toolbox_s:.1f} s   "
          f"(hack/cluster up --with-node --with-memoplane took {up_s:.1f} s)")
    print(f"{n} misses each, {load_note()}")
    emit("pod", metrics)


if __name__ == "__main__":
    main()
