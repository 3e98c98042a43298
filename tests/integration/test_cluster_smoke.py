"""Proof that the local control plane is real: kube-apiserver on etcd, MinIO, and hack/cluster."""

from __future__ import annotations

import io
import json
import os
import queue
import subprocess
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config, watch
from minio import Minio

from memoplane.testing import build, cluster

Kubectl = Callable[..., subprocess.CompletedProcess[str]]  # the `kubectl` fixture

GROUP, VERSION, PLURAL, KIND = "smoke.memoplane.io", "v1", "widgets", "Widget"
CRD = f"""
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {{name: {PLURAL}.{GROUP}}}
spec:
  group: {GROUP}
  scope: Namespaced
  names: {{plural: {PLURAL}, singular: widget, kind: {KIND}}}
  versions:
    - name: {VERSION}
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                size: {{type: integer}}
"""
HACK_CLUSTER = str(build.REPO_ROOT / "hack" / "cluster")


def test_readyz(kubectl: Kubectl) -> None:
    assert kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"


@pytest.fixture
def namespace(kubectl: Kubectl) -> str:
    name = f"smoke-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name)
    return name


def test_crd_object_watch_sees_update(kubectl: Kubectl, namespace: str, tmp_path: Path,
                                      control_plane: cluster.ClusterInfo) -> None:
    crd_file = tmp_path / "crd.yaml"
    crd_file.write_text(CRD)
    kubectl("apply", "-f", str(crd_file))
    kubectl("wait", "--for=condition=Established", f"crd/{PLURAL}.{GROUP}", "--timeout=30s")
    obj = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
           "metadata": {"name": "w1", "namespace": namespace}, "spec": {"size": 1}}
    created = json.loads(kubectl("create", "-o", "json", "-f", "-",
                                 stdin=json.dumps(obj)).stdout)

    api = client.CustomObjectsApi(config.new_client_from_config(control_plane.kubeconfig))
    events: queue.Queue[dict[str, Any]] = queue.Queue()
    stream = watch.Watch()

    def consume() -> None:
        # From the created object's resourceVersion, so the update cannot slip past the watch.
        for event in stream.stream(api.list_namespaced_custom_object, GROUP, VERSION, namespace,
                                   PLURAL, resource_version=created["metadata"]["resourceVersion"],
                                   timeout_seconds=30):
            events.put(event)
            if event["type"] == "MODIFIED":
                return  # closes the stream, so no read is left pending at teardown

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    kubectl("patch", f"{PLURAL}.{GROUP}/w1", "-n", namespace, "--type=merge",
            "-p", '{"spec": {"size": 2}}')
    event = events.get(timeout=30)
    thread.join(timeout=10)
    assert event["type"] == "MODIFIED"
    assert event["object"]["metadata"]["name"] == "w1"
    assert event["object"]["spec"]["size"] == 2


def test_minio_put_get(control_plane: cluster.ClusterInfo) -> None:
    endpoint = control_plane.s3_endpoint.removeprefix("http://")
    s3 = Minio(endpoint, access_key=control_plane.s3_access_key,
               secret_key=control_plane.s3_secret_key, secure=False)
    bucket = f"smoke-{uuid.uuid4().hex[:8]}"
    s3.make_bucket(bucket)
    payload = os.urandom(100_000)
    s3.put_object(bucket, "dir/blob", io.BytesIO(payload), len(payload))
    response = s3.get_object(bucket, "dir/blob")
    try:
        assert response.read() == payload
    finally:
        response.close()
        response.release_conn()


def test_second_up_reuses_running_set_and_cached_build(
        control_plane: cluster.ClusterInfo) -> None:
    binaries = [build.binary_path(c) for c in build.CONTROL_PLANE_COMPONENTS]
    mtimes = [b.stat().st_mtime_ns for b in binaries]
    again = cluster.up(Path(control_plane.state_dir))
    assert again.already_running
    assert again.built == []
    assert again.info.pids == control_plane.pids
    assert [b.stat().st_mtime_ns for b in binaries] == mtimes


def test_helm_binary_runs() -> None:
    out = subprocess.run([str(build.binary_path("helm")), "version", "--short"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    assert out.startswith(build.load_versions().helm)


def test_versitygw_binary_runs_the_pinned_release() -> None:
    """The second S3 server (cluster.S3_SERVERS) is the release hack/versions.env names."""
    out = subprocess.run([str(build.binary_path("versitygw")), "--version"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    assert f"Version  : {build.load_versions().versitygw}" in out


def _hack_cluster(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HACK_CLUSTER, *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_cli_lifecycle_reuses_build_recovers_from_crash_and_cleans_up(
        control_plane: cluster.ClusterInfo, tmp_path: Path) -> None:
    """A second, independent set through the CLI: up, up again, crash, up, down."""
    state = tmp_path / "cluster"
    # The session cluster uses the first ports of its slot (cluster._PORT_STRIDE); this one the next.
    env = {**os.environ, "MEMOPLANE_CLUSTER_DIR": str(state),
           "MEMOPLANE_CLUSTER_PORT_BASE": str(control_plane.ports.etcd_client + len(control_plane.ports.all()))}
    try:
        first = _hack_cluster(env, "up")
        assert first.returncode == 0, first.stderr
        assert "binaries reused from cache" in first.stderr
        assert "building" not in first.stderr
        info = cluster.load_info(state)
        assert info is not None and info.pids != control_plane.pids

        assert _hack_cluster(env, "status").returncode == 0
        exports = _hack_cluster(env, "env").stdout
        for key in ("KUBECONFIG", "MEMOPLANE_S3_ENDPOINT", "MEMOPLANE_S3_ACCESS_KEY",
                    "MEMOPLANE_S3_SECRET_KEY"):
            assert f"export {key}=" in exports

        second = _hack_cluster(env, "up")
        assert second.returncode == 0 and "already running" in second.stderr
        assert cluster.load_info(state) == info

        os.kill(info.pids["etcd"], 9)  # a crash of a process this test started
        third = _hack_cluster(env, "up")
        assert third.returncode == 0, third.stderr
        assert "cleaning up an earlier run" in third.stderr
        restarted = cluster.load_info(state)
        assert restarted is not None and restarted.pids["etcd"] != info.pids["etcd"]
    finally:
        down = _hack_cluster(env, "down")
    assert down.returncode == 0, down.stderr
    assert not state.exists()
    for pid in restarted.pids.values():
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_wrappers_replace_local_modules_with_published_versions() -> None:
    """The wrapper go.mod files were derived from the releases' own go.mod files."""
    versions = build.load_versions()
    minor, patch = versions.kubernetes.lstrip("v").split(".")[1:3]
    kube = (build.cache_dir() / "src" / f"kube-apiserver-{versions.kubernetes}" / "go.mod")
    etcd = (build.cache_dir() / "src" / f"etcd-{versions.etcd}" / "go.mod")
    kube_mod, etcd_mod = kube.read_text(), etcd.read_text()
    assert f"k8s.io/apiserver => k8s.io/apiserver v0.{minor}.{patch}" in kube_mod
    assert f"go.etcd.io/etcd/api/v3 => go.etcd.io/etcd/api/v3 {versions.etcd}" in etcd_mod
    for text in (kube_mod, etcd_mod):
        assert "=> ./" not in text and "=> ../" not in text and "FORBIDDEN" not in text
