"""charts/memoplane installed onto the local node (`hack/cluster up --with-node --with-memoplane`).

The node (node.py) has no pod network: no CNI plugin but loopback and no kube-proxy. So the chart's pods
run with `hostNetwork: true` on ports of this state directory's own (ChartPorts, clear of the control
plane's slot and of the ephemeral range the host-process stack draws from), reach the API server at
127.0.0.1 (`apiServer` values: the `kubernetes` Service's ClusterIP does not route) and the set's MinIO
on loopback as an external S3 endpoint. The image is the one `hack/cluster image` builds from Debian's
packages, imported into the node's containerd (`pullPolicy: Never`: nothing is pulled).
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from memoplane.testing import build, cluster, image, node
from memoplane.testing.pidfiles import ClusterError

RELEASE = "memoplane"
NAMESPACE = "memoplane-system"
CHART = build.REPO_ROOT / "charts" / "memoplane"
# Above the control planes' slots (cluster._PORT_RANGE ends at 29000), below the ephemeral range (32768+).
_CHART_PORT_FIRST = 29000
_CHART_PORTS_PER_SLOT = 4
_HELM_TIMEOUT = "6m"


class ChartError(ClusterError):
    """The chart cannot be installed on the node; the message names the step and what the pods said."""


@dataclass(frozen=True)
class ChartPorts:
    """The node ports of the chart's hostNetwork pods, one block per state directory."""

    operator_metrics: int
    operator_health: int
    agent_http: int
    agent_sessions: int

    @classmethod
    def for_state(cls, directory: Path) -> ChartPorts:
        slot = (cluster.port_base(directory) - cluster._PORT_RANGE[0]) // cluster._PORT_STRIDE
        first = _CHART_PORT_FIRST + slot * _CHART_PORTS_PER_SLOT
        return cls(first, first + 1, first + 2, first + 3)

    def all(self) -> list[int]:
        return list(asdict(self).values())


def node_key_dir(directory: Path) -> Path:
    return node.paths(directory).root / "agent-node-key"


def node_values(info: cluster.ClusterInfo, ports: ChartPorts) -> dict[str, Any]:
    """The values this node needs; everything else is the chart's default."""
    return {
        "image": {"repository": image.IMAGE_NAME, "tag": image.project_version(), "pullPolicy": "Never"},
        "hostNetwork": True,
        "apiServer": {"host": "127.0.0.1", "port": info.ports.apiserver},
        "operator": {"metricsPort": ports.operator_metrics, "healthPort": ports.operator_health},
        # The node's signing key in the state directory, not the chart's /var/lib default: `down` removes it.
        "agent": {"httpPort": ports.agent_http, "nodeKey": {"hostPath": str(node_key_dir(Path(info.state_dir)))}},
        "api": {"sessions": {"port": ports.agent_sessions}},
        "objectStore": {"minio": {"enabled": False},
                        "external": {"endpoint": info.s3_endpoint, "accessKey": info.s3_access_key,
                                     "secretKey": info.s3_secret_key}},
    }


def helm(info: cluster.ClusterInfo, *args: str, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
    argv = [str(build.ensure_binary("helm")), f"--kubeconfig={info.kubeconfig}", "--namespace", NAMESPACE, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def kubectl(info: cluster.ClusterInfo, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = ["kubectl", f"--kubeconfig={info.kubeconfig}", *args]
    return subprocess.run(argv, capture_output=True, text=True, input=stdin, timeout=120, check=False)


def import_project_image(info: cluster.ClusterInfo) -> str:
    """Build (or reuse) the project's image and import it into the node's containerd."""
    built = image.build_image()
    node.import_image(Path(info.state_dir), built.archive, name=built.reference)
    return built.reference


def pods_report(info: cluster.ClusterInfo) -> str:
    """Each pod of the release: phase, container states and the last events (for an error message)."""
    pods = kubectl(info, "-n", NAMESPACE, "get", "pods", "-o", "json")
    lines = []
    for pod in json.loads(pods.stdout or '{"items": []}')["items"]:
        states = [f"{s['name']}: {json.dumps(s.get('state'))} restarts={s.get('restartCount')}"
                  for s in pod["status"].get("containerStatuses", [])]
        lines.append(f"pod {pod['metadata']['name']} {pod['status'].get('phase')} {'; '.join(states)}")
        logs = kubectl(info, "-n", NAMESPACE, "logs", pod["metadata"]["name"], "--all-containers", "--tail=15")
        lines += [f"  | {line}" for line in (logs.stdout + logs.stderr).splitlines()]
    events = kubectl(info, "-n", NAMESPACE, "get", "events", "--sort-by=.lastTimestamp")
    return "\n".join([*lines, *events.stdout.splitlines()[-15:]])


def install(info: cluster.ClusterInfo, overrides: dict[str, Any] | None = None,
            values_file: Path | None = None) -> float:
    """`helm upgrade --install` of the chart onto the node, waiting until every pod is Ready.

    overrides are merged over node_values (a test's changed value); returns the seconds helm took."""
    if not info.with_node:
        raise ChartError("the chart needs the node: run `hack/cluster up --with-node --with-memoplane`")
    import_project_image(info)
    values = _merge(node_values(info, ChartPorts.for_state(Path(info.state_dir))), overrides or {})
    path = values_file or Path(info.state_dir) / "chart-values.json"
    path.write_text(json.dumps(values, indent=2))
    path.chmod(0o600)  # it holds the store keys
    started = time.monotonic()
    proc = helm(info, "upgrade", "--install", RELEASE, str(CHART), "--create-namespace", "--wait",
                f"--timeout={_HELM_TIMEOUT}", "-f", str(path))
    if proc.returncode != 0:
        raise ChartError(f"helm upgrade --install {RELEASE} exited {proc.returncode}: "
                         f"{(proc.stderr or proc.stdout).strip()}\n{pods_report(info)}")
    return time.monotonic() - started


def uninstall(info: cluster.ClusterInfo) -> None:
    proc = helm(info, "uninstall", RELEASE, "--wait", f"--timeout={_HELM_TIMEOUT}")
    if proc.returncode != 0:
        raise ChartError(f"helm uninstall {RELEASE} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged
