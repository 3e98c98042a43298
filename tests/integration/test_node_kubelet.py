"""A real node (`hack/cluster up --with-node`): kubelet, containerd and runc run the pods.

One node for the whole module (a start costs ~15 s, and the kubelet's device-plugin socket is a
fixed host path, so one node per machine), as its own set next to the session's control plane,
whose MinIO it shares: a node needs its API server with other admission settings (ServiceAccount
on). If the node cannot be built or started, every test here errors with the reason.
"""

from __future__ import annotations

import io
import json
import os
import ssl
import subprocess
import tarfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from memoplane.testing import cluster, node, node_images

pytestmark = pytest.mark.timeout(600)

_SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


@pytest.fixture(scope="module")
def node_set(control_plane: cluster.ClusterInfo, node_binaries: None) -> Iterator[cluster.ClusterInfo]:
    directory = Path(f"{cluster.state_dir()}-node")
    try:
        result = cluster.up(directory, owner=f"pytest:{os.getpid()}", store=control_plane, with_node=True)
    except cluster.ClusterError as exc:  # node.NodeError is one
        cluster.down(directory)
        pytest.fail(f"the node cannot start: {exc}", pytrace=False)
    try:
        yield result.info
    finally:
        cluster.down(directory)


def _kubectl(info: cluster.ClusterInfo, *args: str, stdin: str | None = None, timeout: float = 120
             ) -> subprocess.CompletedProcess[str]:
    argv = ["kubectl", f"--kubeconfig={info.kubeconfig}", *args]
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr}\n{_diagnose(info)}")
    return proc


def _diagnose(info: cluster.ClusterInfo) -> str:
    """Pods and events of the test namespace, for a failure message."""
    argv = ["kubectl", f"--kubeconfig={info.kubeconfig}", "-n", "node-test"]
    pods = subprocess.run([*argv, "get", "pods", "-o", "wide"], capture_output=True, text=True, timeout=30)
    events = subprocess.run([*argv, "get", "events"], capture_output=True, text=True, timeout=30)
    return f"pods:\n{pods.stdout}{pods.stderr}\nevents:\n{events.stdout[-3000:]}"


def _pod_spec(info: cluster.ClusterInfo) -> dict[str, object]:
    """The toolbox (busybox) with an exec readiness probe, as pods on this node run: host network,
    no pull, and the API server on 127.0.0.1 (no kube-proxy routes the `kubernetes` Service)."""
    return {
        "hostNetwork": True,
        "terminationGracePeriodSeconds": 1,
        "containers": [{
            "name": "toolbox", "image": node_images.TOOLBOX_IMAGE, "imagePullPolicy": "Never",
            "command": ["sh", "-c", "touch /tmp/ready && echo started && exec sleep 3600"],
            "env": [{"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
                    {"name": "KUBERNETES_SERVICE_PORT", "value": str(info.ports.apiserver)}],
            # A loaded machine may take over a second to exec (the default timeout is 1 s).
            "readinessProbe": {"exec": {"command": ["cat", "/tmp/ready"]}, "periodSeconds": 2,
                               "timeoutSeconds": 20},
        }],
    }


def _workload(info: cluster.ClusterInfo, kind: str, name: str) -> dict[str, object]:
    labels = {"app": name}
    spec: dict[str, object] = {"selector": {"matchLabels": labels},
                               "template": {"metadata": {"labels": labels}, "spec": _pod_spec(info)}}
    if kind == "Deployment":
        spec["replicas"] = 2
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": name, "namespace": "node-test"},
            "spec": spec}


@pytest.fixture(scope="module")
def workloads(node_set: cluster.ClusterInfo) -> cluster.ClusterInfo:
    _kubectl(node_set, "create", "namespace", "node-test")
    for kind, name in (("DaemonSet", "toolbox-ds"), ("Deployment", "toolbox-deploy")):
        _kubectl(node_set, "apply", "-f", "-", stdin=json.dumps(_workload(node_set, kind, name)))
    for workload in ("daemonset/toolbox-ds", "deployment/toolbox-deploy"):
        _kubectl(node_set, "-n", "node-test", "rollout", "status", workload, "--timeout=120s", timeout=140)
    _kubectl(node_set, "-n", "node-test", "wait", "--for=condition=Ready", "pod", "--all", "--timeout=60s", timeout=80)
    return node_set


def test_node_registers_ready_on_loopback(node_set: cluster.ClusterInfo) -> None:
    assert node.node_conditions(node_set)["Ready"] == "True"
    status = json.loads(_kubectl(node_set, "get", "node", node.NODE_NAME, "-o", "json").stdout)["status"]
    assert {"type": "InternalIP", "address": "127.0.0.1"} in status["addresses"]
    assert status["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://2.3")


def test_daemonset_and_deployment_reach_ready(workloads: cluster.ClusterInfo) -> None:
    pods = json.loads(_kubectl(workloads, "-n", "node-test", "get", "pods", "-o", "json").stdout)["items"]
    by_app: dict[str, int] = {}
    for pod in pods:
        ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}["Ready"]
        assert ready == "True", f"{pod['metadata']['name']}: {pod['status']}"
        assert pod["spec"]["nodeName"] == node.NODE_NAME
        by_app[pod["metadata"]["labels"]["app"]] = by_app.get(pod["metadata"]["labels"]["app"], 0) + 1
    assert by_app == {"toolbox-ds": 1, "toolbox-deploy": 2}


def _a_pod(info: cluster.ClusterInfo) -> str:
    return str(_kubectl(info, "-n", "node-test", "get", "pods", "-l", "app=toolbox-ds",
                        "-o", "jsonpath={.items[0].metadata.name}").stdout)


def test_logs_and_exec_go_through_the_kubelet(workloads: cluster.ClusterInfo) -> None:
    pod = _a_pod(workloads)
    assert "started" in _kubectl(workloads, "-n", "node-test", "logs", pod).stdout
    assert _kubectl(workloads, "-n", "node-test", "exec", pod, "--", "cat", "/tmp/ready").returncode == 0


def _selfsubjectreview(info: cluster.ClusterInfo, token: str) -> dict[str, object]:
    request = urllib.request.Request(
        f"{info.apiserver_url}/apis/authentication.k8s.io/v1/selfsubjectreviews", method="POST",
        data=json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, context=ssl.create_default_context(cafile=info.ca_file),
                                timeout=30) as response:
        body: dict[str, object] = json.loads(response.read())
    return body


def test_projected_service_account_token_is_a_file_the_apiserver_accepts(workloads: cluster.ClusterInfo) -> None:
    pod = _a_pod(workloads)

    def in_pod(*argv: str) -> str:
        return str(_kubectl(workloads, "-n", "node-test", "exec", pod, "--", *argv).stdout)

    token = in_pod("cat", f"{_SERVICE_ACCOUNT}/token")
    assert in_pod("cat", f"{_SERVICE_ACCOUNT}/namespace") == "node-test"
    assert "BEGIN CERTIFICATE" in in_pod("cat", f"{_SERVICE_ACCOUNT}/ca.crt")  # kube-root-ca.crt, published
    user = _selfsubjectreview(workloads, token)["status"]
    assert user["userInfo"]["username"] == "system:serviceaccount:node-test:default"  # type: ignore[index]
    # From inside the pod, as an in-cluster client: the mounted token and CA, the API server on
    # 127.0.0.1 (KUBERNETES_SERVICE_HOST/PORT), TLS verified against the mounted ca.crt.
    review = json.loads(in_pod("whoami"))
    assert review["status"]["userInfo"]["username"] == "system:serviceaccount:node-test:default"


def _ref_only_archive(source: Path, target: Path) -> None:
    """`source` as umoci writes archives: the index names only a tag (org.opencontainers.image.ref.name)."""
    with tarfile.open(source) as src, tarfile.open(target, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member)
            assert data is not None
            content = data.read()
            if member.name == "index.json":
                index = json.loads(content)
                for entry in index["manifests"]:
                    entry["annotations"] = {"org.opencontainers.image.ref.name": "ref-only"}
                content = json.dumps(index).encode()
                member.size = len(content)
            dst.addfile(member, io.BytesIO(content))


def test_import_image_is_idempotent_by_digest_and_names_tag_only_archives(
        node_set: cluster.ClusterInfo, tmp_path: Path) -> None:
    directory = Path(node_set.state_dir)
    archive = node_images.toolbox_archive(tmp_path)
    before = node.images(directory)
    assert node.import_image(directory, archive) == node_images.TOOLBOX_IMAGE
    assert node.images(directory) == before
    umoci_like = tmp_path / "ref-only.oci.tar"
    _ref_only_archive(archive, umoci_like)
    name = "memoplane.local/imported:ref-only"
    assert node.import_image(directory, umoci_like, name=name) == name
    assert node.images(directory)[name] == before[node_images.TOOLBOX_IMAGE]
    with pytest.raises(node.NodeError, match="full name with a tag"):
        node.import_image(directory, umoci_like, name="no-tag")


def _process_state(pid: int) -> str:
    """The kernel's state letter of `pid` (Z: exited, not yet reaped by its parent) and its argv."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return "gone"
    return state if state == "Z" else f"{state} {argv[:200]}"


def test_down_stops_every_process_and_unmounts_everything(node_set: cluster.ClusterInfo,
                                                          workloads: cluster.ClusterInfo) -> None:
    """Last in the module: the fixture's own `down` then has nothing left to do."""
    directory = Path(node_set.state_dir)
    assert node.mounts_under(directory), "pods are running: their rootfs and volumes are mounted"
    assert node.leftover_pids(directory), "pods are running: their processes are in the node's cgroups"
    pids = list(node_set.pids.values())
    sockets = node.shim_sockets(directory)
    assert sockets, "pods are running: their shims listen"
    cluster.down(directory)
    assert [s for s in sockets if s.exists()] == []
    assert node.mounts_under(directory) == []
    assert node.leftover_pids(directory) == set()
    assert {pid: _process_state(pid) for pid in pids if _process_state(pid) not in ("gone", "Z")} == {}
    assert not any((Path("/sys/fs/cgroup") / h / node.cgroup_name(directory)).exists()
                   for h in os.listdir("/sys/fs/cgroup"))
    assert not directory.exists()
    log_links = Path("/var/log/containers")
    assert [link for link in (log_links.iterdir() if log_links.is_dir() else [])
            if os.readlink(link).startswith(str(directory) + "/")] == []
