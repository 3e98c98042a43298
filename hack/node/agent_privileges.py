"""Which of the agent's privileges this real runtime needs: the chart on the node, one privilege taken away at a
time (README.md "Agent privileges" holds the table this prints).

    flock /tmp/memoplane-node.lock python3 hack/node/agent_privileges.py   # MEMOPLANE_CLUSTER_DIR: a private set

For each variant: `helm upgrade` with agent.capabilities / seccompProfile / appArmorProfile changed, then the
new agent pod either turns Ready (then one ComputeJob runs and its recorded isolation is printed) or fails
(its last log lines are printed). One JSON line per variant; the set is brought down at the end.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from memoplane.testing import cluster, node_chart

CAPS = ["SYS_ADMIN", "SYS_PTRACE", "SETUID", "SETGID", "MKNOD"]
_JOB = """
apiVersion: memoplane.io/v1alpha1
kind: ComputeJob
metadata: {name: probe-%d}
spec:
  python:
    source: |
      def main(x):
          return x + 1
  inputs: [{name: x, value: %d}]
"""


def _variants() -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = [("all five, Unconfined", {})]
    out += [(f"without {cap}", {"capabilities": [c for c in CAPS if c != cap]}) for cap in CAPS]
    out.append(("seccomp RuntimeDefault", {"seccompProfile": {"type": "RuntimeDefault"}}))
    out.append(("appArmor RuntimeDefault", {"appArmorProfile": {"type": "RuntimeDefault"}}))
    return out


def _agent_pod(info: cluster.ClusterInfo, old: set[str]) -> dict[str, Any] | None:
    pods = json.loads(node_chart.kubectl(info, "-n", node_chart.NAMESPACE, "get", "pods", "-o", "json",
                                         "-l", "app.kubernetes.io/component=agent").stdout)["items"]
    fresh = [p for p in pods if p["metadata"]["name"] not in old and not p["metadata"].get("deletionTimestamp")]
    return fresh[0] if fresh else None


def _outcome(info: cluster.ClusterInfo, old: set[str], deadline_s: float = 120.0) -> tuple[str, dict[str, Any]]:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        pod = _agent_pod(info, old)
        if pod is not None:
            statuses = pod["status"].get("containerStatuses", [])
            if statuses and statuses[0].get("ready"):
                return "Ready", pod
            if statuses and (statuses[0].get("restartCount", 0) > 0 or "terminated" in statuses[0]["state"]):
                return "failed", pod
            waiting = statuses[0]["state"].get("waiting", {}) if statuses else {}
            if waiting.get("reason") in ("CreateContainerError", "RunContainerError", "CreateContainerConfigError"):
                return f"failed: {waiting.get('message', '')}", pod
        time.sleep(2)
    return "no verdict in time", _agent_pod(info, old) or {}


def _job_isolation(info: cluster.ClusterInfo, n: int) -> dict[str, Any]:
    ns = "privileges"
    node_chart.kubectl(info, "create", "namespace", ns)
    applied = node_chart.kubectl(info, "apply", "-n", ns, "-f", "-", stdin=_JOB % (n, n))
    if applied.returncode != 0:
        return {"phase": f"not applied: {applied.stderr.strip()}"}
    end = time.monotonic() + 120
    while time.monotonic() < end:
        got = node_chart.kubectl(info, "-n", ns, "get", "computejob", f"probe-{n}", "-o", "json")
        job = json.loads(got.stdout) if got.returncode == 0 else {}
        status = job.get("status", {})
        if status.get("phase") in ("Succeeded", "Failed"):
            return {"phase": status["phase"], "message": status.get("message", "")[:300]}
        time.sleep(2)
    return {"phase": "not done in 120s"}


def main() -> int:
    directory = cluster.state_dir()
    info = cluster.up(directory, with_node=True).info
    try:
        node_chart.install(info)
        for n, (name, agent) in enumerate(_variants()):
            old = {p["metadata"]["name"] for p in json.loads(node_chart.kubectl(
                info, "-n", node_chart.NAMESPACE, "get", "pods", "-o", "json").stdout)["items"]}
            values = node_chart._merge(node_chart.node_values(info, node_chart.ChartPorts.for_state(directory)),
                                       {"agent": {**agent, "podAnnotations": {"memoplane.io/variant": str(n)}}})
            path = Path(info.state_dir) / "chart-values.json"
            path.write_text(json.dumps(values))
            proc = node_chart.helm(info, "upgrade", node_chart.RELEASE, str(node_chart.CHART), "-f", str(path))
            if proc.returncode != 0:
                print(json.dumps({"variant": name, "helm": proc.stderr.strip()}), flush=True)
                continue
            verdict, pod = _outcome(info, old)
            logs = ""
            if pod:
                logs = node_chart.kubectl(info, "-n", node_chart.NAMESPACE, "logs", pod["metadata"]["name"],
                                          "--tail=6").stdout
                if not logs.strip():
                    logs = node_chart.kubectl(info, "-n", node_chart.NAMESPACE, "logs", pod["metadata"]["name"],
                                              "--previous", "--tail=6").stdout
            job = _job_isolation(info, n) if verdict == "Ready" else {}
            print(json.dumps({"variant": name, "agent": verdict, "job": job,
                              "logs": logs.strip().splitlines()[-6:]}), flush=True)
    finally:
        cluster.down(directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
