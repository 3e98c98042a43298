"""`helm install`, `upgrade` and `uninstall` of charts/memoplane on the local control plane.

The control plane has no kubelet, scheduler or controller-manager: Deployments, DaemonSets
and StatefulSets are created as objects but no pod runs, and nothing garbage-collects
owned objects. So this tests at the API level: the objects the chart creates, the CRDs it
installs and upgrades, the RBAC it grants (by running the real operator and an agent as
local processes authenticated as the chart's ServiceAccounts, and running a job through
them), what an upgrade changes and keeps, and that an uninstall leaves the CRDs and the
users' objects with no finalizer that could strand them.

The tests run in order and share one release.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from memoplane.testing import build, cluster, processes

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "memoplane"
CRD_NAMES = sorted(yaml.safe_load(p.read_text())["metadata"]["name"] for p in (ROOT / "crds").glob("*.yaml"))
OLD_DESCRIPTION_MARK = " (chart revision 1)"
API_KEYS = "mp-api-keys"


@dataclass
class Release:
    name: str
    namespace: str        # the release's (operator, agents, Leases)
    jobs: str             # where the test's ComputeJobs and the default ResultCache live
    helm: Path
    kubeconfig: str
    info: cluster.ClusterInfo
    install_stdout: str = ""

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(self.helm), f"--kubeconfig={self.kubeconfig}", "--namespace", self.namespace, *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=180)
        if check and proc.returncode != 0:
            pytest.fail(f"helm {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}{proc.stdout}")
        return proc


def _json(kubectl: Any, *args: str) -> Any:
    return json.loads(kubectl(*args, "-o", "json").stdout)


def _adopt_existing_crds(kubectl: Any, release: str, namespace: str) -> None:
    """CRDs applied with kubectl (by other tests, or a user before moving to Helm) are
    adopted by the release, as a user would: Helm's ownership labels and annotations."""
    for name in CRD_NAMES:
        if kubectl("get", "crd", name, check=False).returncode != 0:
            continue
        kubectl("label", "--overwrite", "crd", name, "app.kubernetes.io/managed-by=Helm")
        kubectl("annotate", "--overwrite", "crd", name, f"meta.helm.sh/release-name={release}",
                f"meta.helm.sh/release-namespace={namespace}")


def _old_chart(tmp: Path) -> Path:
    """A copy of the chart whose CRDs differ (a marked description): what an older chart
    shipped, so that the upgrade to the real chart has a CRD change to apply."""
    old = tmp / "memoplane"
    shutil.copytree(CHART, old)
    for path in (old / "files" / "crds").glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"] += OLD_DESCRIPTION_MARK
        path.write_text("# an older chart's CRD (test)\n" + yaml.safe_dump(crd, sort_keys=False))
    return old


@pytest.fixture(scope="module")
def release(control_plane: cluster.ClusterInfo, kubectl: Any, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Release]:
    try:
        helm = build.ensure_binary("helm")
    except build.BuildError as exc:
        pytest.fail(f"helm cannot be built: {exc}", pytrace=False)
    suffix = uuid.uuid4().hex[:6]
    rel = Release(f"mp{suffix}", f"mpt-helm-{suffix}", f"mpt-helm-{suffix}-jobs", helm,
                  control_plane.kubeconfig, control_plane)
    old = _old_chart(tmp_path_factory.mktemp("chart"))
    kubectl("create", "namespace", rel.jobs)
    _adopt_existing_crds(kubectl, rel.name, rel.namespace)
    rel.install_stdout = rel.run("install", rel.name, str(old), "--create-namespace",
                                 "--set", f"defaultResultCache.namespaces={{{rel.jobs}}}",
                                 "--set", f"watchNamespaces={rel.jobs}",
                                 # No pod runs here: the keys Secret need not exist for the objects.
                                 "--set", "api.enabled=true", "--set", f"api.apiKeys.existingSecret={API_KEYS}").stdout
    try:
        yield rel
    finally:
        rel.run("uninstall", rel.name, check=False)
        for ns in (rel.jobs, rel.namespace):  # no namespace controller here: do not wait
            kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)


def test_install_creates_the_expected_objects(release: Release, kubectl: Any) -> None:
    ns, full = release.namespace, f"{release.name}-memoplane"
    dep = _json(kubectl, "-n", ns, "get", "deployment", f"{full}-operator")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    ds = _json(kubectl, "-n", ns, "get", "daemonset", f"{full}-agent")
    caps = ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]
    assert set(caps["add"]) == {"SYS_ADMIN", "SYS_PTRACE", "SETUID", "SETGID", "MKNOD"}
    # The API server kept the fields (it drops what it does not know).
    sc = ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    assert sc["appArmorProfile"] == {"type": "Unconfined"} and sc["seccompProfile"] == {"type": "Unconfined"}
    sts = _json(kubectl, "-n", ns, "get", "statefulset", f"{full}-minio")
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "20Gi"
    for kind, name in (("service", f"{full}-operator-metrics"), ("service", f"{full}-agent-metrics"),
                       ("service", f"{full}-minio"), ("secret", f"{full}-minio-credentials"),
                       ("serviceaccount", f"{full}-operator"), ("serviceaccount", f"{full}-agent"),
                       ("role", f"{full}-operator"), ("rolebinding", f"{full}-agent"),
                       ("deployment", f"{full}-api"), ("service", f"{full}-api"), ("serviceaccount", f"{full}-api"),
                       ("role", f"{full}-api"), ("rolebinding", f"{full}-api"), ("secret", f"{full}-api-sessions")):
        kubectl("-n", ns, "get", kind, name)
    for name in (f"{full}-operator", f"{full}-agent", f"{full}-edit", f"{full}-view"):
        kubectl("get", "clusterrole", name)
    for name in CRD_NAMES:
        crd = _json(kubectl, "get", "crd", name)
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == release.name
        established = [c for c in crd["status"]["conditions"] if c["type"] == "Established"]
        assert established and established[0]["status"] == "True"
    rc = _json(kubectl, "-n", release.jobs, "get", "resultcache", "default")
    assert rc["spec"]["store"] == {"bucket": "memoplane", "prefix": f"{release.jobs}/"}
    assert "kubectl apply -f examples/job.yaml" in release.install_stdout
    assert f"kubectl label namespace {ns} pod-security.kubernetes.io/enforce=privileged" in release.install_stdout


def _token_kubeconfig(release: Release, kubectl: Any, account: str, path: Path) -> Path:
    token = kubectl("-n", release.namespace, "create", "token", account, "--duration=1h").stdout.strip()
    info = release.info
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "local", "cluster": {"server": info.apiserver_url,
                                                   "certificate-authority": info.ca_file}}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "local", "user": account}}],
    }))
    return path


def test_operator_and_agent_work_with_exactly_the_charts_rbac(release: Release, kubectl: Any,
                                                               tmp_path: Path) -> None:
    """The real processes, authenticated as the chart's ServiceAccounts, run a job."""
    full = f"{release.name}-memoplane"
    base = {**release.info.env()}
    env_op = {**base, "KUBECONFIG": str(_token_kubeconfig(release, kubectl, f"{full}-operator",
                                                           tmp_path / "operator.kubeconfig"))}
    env_agent = {**base, "KUBECONFIG": str(_token_kubeconfig(release, kubectl, f"{full}-agent",
                                                              tmp_path / "agent.kubeconfig"))}
    # What the ServiceAccounts may not do (least privilege), asked of the API server.
    for account, verb, resource, allowed in (
            ("operator", "list", "secrets", "no"), ("operator", "get", "secrets", "yes"),  # only those caches name
            ("agent", "get", "secrets", "no"), ("agent", "create", "computejobs.memoplane.io", "no"),
            ("agent", "patch", "computejobs.memoplane.io --subresource=status", "yes"),
            ("operator", "create", "resultcaches.memoplane.io", "yes"),
            ("agent", "list", "configmaps", "no")):
        got = kubectl("auth", "can-i", verb, *resource.split(), "-n", release.jobs,
                      f"--as=system:serviceaccount:{release.namespace}:{full}-{account}", check=False)
        assert got.stdout.strip() == allowed, (account, verb, resource, got.stdout, got.stderr)
    for account, verb, allowed in (("operator", "patch", "yes"), ("agent", "get", "yes"), ("agent", "patch", "no")):
        got = kubectl("auth", "can-i", verb, "configmaps/memoplane-agent-keys", "-n", release.namespace,
                      f"--as=system:serviceaccount:{release.namespace}:{full}-{account}", check=False)
        assert got.stdout.strip() == allowed, ("agent keys", account, verb, got.stdout, got.stderr)
    common = {"watch_namespaces": release.jobs, "lease_namespace": release.namespace}
    op_cfg = processes.StackConfig(directory=tmp_path / "stack", env=env_op, **common)  # type: ignore[arg-type]
    agent_cfg = processes.StackConfig(directory=tmp_path / "stack", env=env_agent, **common)  # type: ignore[arg-type]
    started: list[str] = []
    try:
        try:
            started.append(processes.start_operator(op_cfg).name)
            started.append(processes.start_agent(agent_cfg, "helm-node").name)
        except processes.ProcessError as exc:
            pytest.fail(f"a process could not start with the chart's RBAC: {exc}", pytrace=False)
        kubectl("apply", "-n", release.jobs, "-f", str(ROOT / "examples" / "job.yaml"))
        waited = kubectl("wait", "-n", release.jobs, "--for=condition=Ready", "computejob/featurize",
                         "--timeout=120s", check=False)
        job = _json(kubectl, "-n", release.jobs, "get", "computejob", "featurize")
        logs = "\n".join(processes.log_tail(p, 60) for p in
                         (processes.load(op_cfg.directory, n) for n in started) if p is not None)
        assert waited.returncode == 0, f"{job.get('status')}\n{logs}"
        assert job["status"]["result"]["value"] == {"total": 60}
        assert "Forbidden" not in logs and " 403" not in logs, logs
        lease = _json(kubectl, "-n", release.namespace, "get", "lease", "-l",
                      "app.kubernetes.io/component=memoplane-agent")
        assert lease["items"], "the agent holds no Lease in the release namespace"
        # The agent signs with its own key, announced in its Lease; the operator remembered it.
        (announced,) = [i["metadata"]["annotations"].get("memoplane.io/signing-key") for i in lease["items"]]
        assert str(announced).startswith("helm-node-1:"), announced
        kept = _json(kubectl, "-n", release.namespace, "get", "configmap", "memoplane-agent-keys")
        assert list(kept["data"]) == ["helm-node-1.pub"]
    finally:
        for name in reversed(started):
            processes.stop(op_cfg.directory, name)


def test_the_api_runs_sandboxes_on_an_agent_with_exactly_the_charts_rbac(release: Release, kubectl: Any,
                                                                        tmp_path: Path) -> None:
    """`memoplane serve` as the chart's api ServiceAccount, an agent as the agent's, sharing the chart's
    generated session secret: an e2b sandbox runs on the agent and is shown as a Sandbox object."""
    import base64

    from e2b import Sandbox

    full, ns = f"{release.name}-memoplane", release.namespace
    for verb, resource, allowed in (("list", "leases", "yes"), ("create", "sandboxes.memoplane.io", "yes"),
                                    ("patch", "sandboxes.memoplane.io --subresource=status", "yes"),
                                    ("delete", "sandboxes.memoplane.io", "yes"), ("update", "leases", "no"),
                                    ("get", "secrets", "no"), ("list", "computejobs.memoplane.io", "no")):
        got = kubectl("auth", "can-i", verb, *resource.split(), "-n", ns,
                      f"--as=system:serviceaccount:{ns}:{full}-api", check=False)
        assert got.stdout.strip() == allowed, (verb, resource, got.stdout, got.stderr)
    secret = base64.b64decode(_json(kubectl, "-n", ns, "get", "secret", f"{full}-api-sessions")["data"]["secret"])
    directory = tmp_path / "stack"
    processes.session_secret(directory).unlink()
    fd = os.open(directory / "sessions" / "secret", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, secret)
    os.close(fd)
    configs = {account: processes.StackConfig(directory=directory, lease_namespace=ns, env={
        **release.info.env(), "KUBECONFIG": str(_token_kubeconfig(release, kubectl, f"{full}-{account}",
                                                                   tmp_path / f"{account}.kubeconfig"))})
        for account in ("api", "agent")}
    started: list[str] = []
    try:
        try:
            started.append(processes.start_agent(configs["agent"], "helm-api-node").name)
            api = processes.start_api(configs["api"])
            started.append(api.name)
        except processes.ProcessError as exc:
            pytest.fail(f"a process could not start with the chart's RBAC: {exc}", pytrace=False)
        url = api.url("http", "")
        sandbox = Sandbox.create(timeout=60, api_url=url, sandbox_url=url, api_key="e2b_local")
        try:
            assert sandbox.commands.run("echo on-the-agent").stdout == "on-the-agent\n"
            shown = _json(kubectl, "-n", ns, "get", "sandboxes.memoplane.io", sandbox.sandbox_id)
            assert shown["status"]["node"] == "helm-api-node"
            assert shown["status"]["conditions"][0]["type"] == "Ready"
        finally:
            sandbox.kill()
        assert _json(kubectl, "-n", ns, "get", "sandboxes.memoplane.io")["items"] == []
        logs = "\n".join(processes.log_tail(p, 60) for p in
                         (processes.load(directory, n) for n in started) if p is not None)
        assert "Forbidden" not in logs and " 403" not in logs and "not written" not in logs, logs
    finally:
        for name in reversed(started):
            processes.stop(directory, name)


def test_upgrade_updates_crds_and_values_and_keeps_the_keys(release: Release, kubectl: Any) -> None:
    ns, full = release.namespace, f"{release.name}-memoplane"
    secret_before = _json(kubectl, "-n", ns, "get", "secret", f"{full}-minio-credentials")["data"]
    signing_before = _json(kubectl, "-n", ns, "get", "secret", f"{full}-signing-key")["data"]
    for name in CRD_NAMES:
        crd = _json(kubectl, "get", "crd", name)
        assert crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"].endswith(OLD_DESCRIPTION_MARK)
    release.run("upgrade", release.name, str(CHART), "--reuse-values", "--set", "agent.capacity=5")
    history = json.loads(release.run("history", release.name, "-o", "json").stdout)
    assert [h["revision"] for h in history] == [1, 2] and history[-1]["status"] == "deployed"
    # The CRDs are upgraded to the chart's (the generated crds/*.yaml).
    for path in (ROOT / "crds").glob("*.yaml"):
        want = yaml.safe_load(path.read_text())
        got = _json(kubectl, "get", "crd", want["metadata"]["name"])
        assert got["spec"]["versions"][0]["schema"] == want["spec"]["versions"][0]["schema"]
        assert got["spec"]["names"] == want["spec"]["names"]
    env = {e["name"]: e.get("value") for e in _json(kubectl, "-n", ns, "get", "daemonset", f"{full}-agent")
           ["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MEMOPLANE_CAPACITY"] == "5"
    assert env["MEMOPLANE_WATCH_NAMESPACES"] == release.jobs
    # The generated MinIO keys survive the upgrade (the chart reads them back).
    assert _json(kubectl, "-n", ns, "get", "secret", f"{full}-minio-credentials")["data"] == secret_before
    # So does the operator's signing key (the agents' before each had its own): what it attested stays trusted.
    assert _json(kubectl, "-n", ns, "get", "secret", f"{full}-signing-key")["data"] == signing_before
    kubectl("-n", release.jobs, "get", "resultcache", "default")


def test_uninstall_keeps_crds_and_user_objects_without_finalizers(release: Release, kubectl: Any) -> None:
    ns, full = release.namespace, f"{release.name}-memoplane"
    kubectl("apply", "-n", release.jobs, "-f", str(ROOT / "examples" / "dag.yaml"))
    release.run("uninstall", release.name)
    for kind, name in (("deployment", f"{full}-operator"), ("daemonset", f"{full}-agent"),
                       ("statefulset", f"{full}-minio"), ("serviceaccount", f"{full}-agent"),
                       ("service", f"{full}-operator-metrics"), ("role", f"{full}-agent"),
                       ("deployment", f"{full}-api"), ("role", f"{full}-api"), ("secret", f"{full}-api-sessions")):
        assert kubectl("-n", ns, "get", kind, name, check=False).returncode != 0, f"{kind}/{name} left behind"
    for name in (f"{full}-operator", f"{full}-agent", f"{full}-edit"):
        assert kubectl("get", "clusterrole", name, check=False).returncode != 0, name
    # Kept on purpose: the CRDs, the store's keys, and every user object.
    for name in CRD_NAMES:
        kubectl("get", "crd", name)
    kubectl("-n", ns, "get", "secret", f"{full}-minio-credentials")
    kubectl("-n", ns, "get", "secret", f"{full}-signing-key")
    jobs = _json(kubectl, "-n", release.jobs, "get", "computejobs")["items"]
    caches = _json(kubectl, "-n", release.jobs, "get", "resultcaches")["items"]
    assert {j["metadata"]["name"] for j in jobs} >= {"featurize", "download", "normalize", "report"}
    assert [c["metadata"]["name"] for c in caches] == ["default"]
    for obj in jobs + caches:
        assert not obj["metadata"].get("finalizers"), obj["metadata"]
    # With no operator running, deleting them completes at once: nothing strands them.
    kubectl("-n", release.jobs, "delete", "computejobs,resultcaches", "--all", "--timeout=30s")
    assert _json(kubectl, "-n", release.jobs, "get", "computejobs,resultcaches")["items"] == []
    assert release.run("status", release.name, check=False).returncode != 0
