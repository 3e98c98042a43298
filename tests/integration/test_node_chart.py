"""charts/memoplane installed with helm onto a real node (kubelet, containerd, runc): the chart's own pods.

One node for the module (node.py: one per machine), as its own set sharing the session's MinIO, with the
chart installed as `hack/cluster up --with-node --with-memoplane` installs it (node_chart.install). The
tests run in order: the pods Ready with the chart's securityContext, the examples complete with every
isolation layer, an upgrade during a job, then the uninstall. If the node, the image or the install
cannot be made, every test here fails with the reason.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from memoplane.cas import open_store
from memoplane.cluster.protocol import LEASE_PREFIX, lease_name
from memoplane.testing import cluster, node_chart, node_release

pytestmark = pytest.mark.timeout(900)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
VALUES = yaml.safe_load((node_chart.CHART / "values.yaml").read_text())
# Per-job cgroups need a writable /sys/fs/cgroup, which only agent.privileged=true gives (README.md
# "Agent privileges"); RLIMIT_AS and RLIMIT_NPROC bound the job instead. Every other layer must hold.
NOT_WITHOUT_PRIVILEGED = {"cgroup_memory", "cgroup_pids"}


@pytest.fixture(scope="module")
def chart(memoplane_on_node: node_release.Release) -> cluster.ClusterInfo:
    """The node with the chart installed (tests/integration/conftest.py: memoplane_on_node)."""
    return memoplane_on_node.info


@pytest.fixture
def store_env(chart: cluster.ClusterInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in chart.env().items():
        monkeypatch.setenv(key, value)


def kubectl(info: cluster.ClusterInfo, *args: str, stdin: str | None = None) -> str:
    proc = node_chart.kubectl(info, *args, stdin=stdin)
    if proc.returncode != 0:
        pytest.fail(f"kubectl {' '.join(args)} exited {proc.returncode}: {proc.stderr}\n{node_chart.pods_report(info)}")
    return proc.stdout


def get(info: cluster.ClusterInfo, *args: str) -> Any:
    return json.loads(kubectl(info, "get", *args, "-o", "json"))


def wait_for(what: str, check: Any, info: cluster.ClusterInfo, deadline_s: float = 240.0) -> Any:
    """Poll check() until it returns something truthy, up to a deadline (a condition, not a timing)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        result = check()
        if result:
            return result
        time.sleep(1.0)
    pytest.fail(f"{what}: not within {deadline_s:.0f}s\n{node_chart.pods_report(info)}")


def release_pods(info: cluster.ClusterInfo, component: str) -> list[dict[str, Any]]:
    selector = f"app.kubernetes.io/instance={node_chart.RELEASE},app.kubernetes.io/component={component}"
    return list(get(info, "pods", "-n", node_chart.NAMESPACE, "-l", selector)["items"])


def ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def fresh_namespace(info: cluster.ClusterInfo, name: str) -> str:
    kubectl(info, "create", "namespace", name)
    return name


def job_done(info: cluster.ClusterInfo, namespace: str, name: str) -> dict[str, Any] | None:
    job: dict[str, Any] = get(info, "computejob", "-n", namespace, name)
    if job.get("status", {}).get("phase") == "Failed":
        pytest.fail(f"{namespace}/{name} failed: {json.dumps(job['status'])}")
    return job if job.get("status", {}).get("phase") == "Succeeded" else None


def isolation_of(job: dict[str, Any]) -> dict[str, Any]:
    """The job record's isolation: the meta of the result its cache key names in the job's store."""
    status = job["status"]
    with open_store(status["result"]["store"]) as store:
        digest = store.read_ref(status["cacheKey"])
        assert digest is not None, status
        isolation: dict[str, Any] = store.get_result(digest).meta["isolation"]
    return isolation


def run_records(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Every run record (memoplane.history) in the job's store."""
    with open_store(job["status"]["result"]["store"]) as store:
        return [json.loads(store.run_record(run_id) or b"{}") for run_id in store.run_record_ids()]


def test_operator_and_agent_are_ready_with_the_charts_own_security(chart: cluster.ClusterInfo) -> None:
    (operator,) = release_pods(chart, "operator")
    (agent,) = release_pods(chart, "agent")
    assert ready(operator) and ready(agent)
    sc = agent["spec"]["containers"][0]["securityContext"]
    assert set(sc["capabilities"]["add"]) == set(VALUES["agent"]["capabilities"])
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["readOnlyRootFilesystem"] is True
    assert sc["seccompProfile"] == VALUES["agent"]["seccompProfile"] and not sc.get("privileged")
    assert operator["spec"]["securityContext"]["runAsNonRoot"] is True
    for pod, component in ((operator, "operator"), (agent, "agent")):
        assert pod["spec"]["serviceAccountName"] == f"{node_chart.RELEASE}-{component}"
        assert pod["spec"]["hostNetwork"] is True
        # The token reaches the pod as a projected file (no variable): the kube client reads it.
        assert any("projected" in v for v in pod["spec"]["volumes"]), component
        probes = pod["spec"]["containers"][0]
        assert probes["livenessProbe"]["httpGet"] and probes["readinessProbe"]["httpGet"], component
    lease = get(chart, "lease", "-n", node_chart.NAMESPACE, lease_name("memoplane-node"))
    assert lease["spec"]["holderIdentity"]  # the agent in the pod holds its node's Lease


def test_examples_complete_with_every_isolation_layer(chart: cluster.ClusterInfo, store_env: None) -> None:
    namespace = fresh_namespace(chart, "chart-examples")
    for example in ("job.yaml", "dag.yaml", "command-job.yaml"):
        kubectl(chart, "apply", "-n", namespace, "-f", str(EXAMPLES / example))
    featurize = wait_for("featurize Succeeded", lambda: job_done(chart, namespace, "featurize"), chart)
    assert featurize["status"]["result"]["value"] == {"total": 60}
    report = wait_for("the DAG's report Succeeded", lambda: job_done(chart, namespace, "report"), chart)
    assert report["status"]["result"]["value"]["n"] == 1000
    words = wait_for("word-count Succeeded", lambda: job_done(chart, namespace, "word-count"), chart)
    for job in (featurize, report, words):
        assert job["status"]["node"] == "memoplane-node"
        isolation = isolation_of(job)
        missing = {layer for layer, held in isolation.items() if held is not True}
        assert missing == NOT_WITHOUT_PRIVILEGED, (job["metadata"]["name"], isolation)
        for layer in ("userns", "mountns", "pidns", "netns", "ipcns", "utsns", "seccomp", "landlock_scope",
                      "fresh_proc", "view", "unprivileged_uid", "no_new_privs", "caps_dropped", "rlimit_as",
                      "rlimit_nproc"):
            assert isolation[layer] is True, layer


_SLOW_JOB = """
apiVersion: memoplane.io/v1alpha1
kind: ComputeJob
metadata: {name: through-upgrade}
spec:
  python:
    source: |
      import time
      def main(seconds):
          time.sleep(seconds)
          return {"slept": seconds}
  inputs:
    - {name: seconds, value: 20}
  resources: {timeoutSeconds: 300}
"""


def test_an_upgrade_replaces_the_pods_and_a_running_job_completes_once(chart: cluster.ClusterInfo,
                                                                       store_env: None) -> None:
    namespace = fresh_namespace(chart, "chart-upgrade")
    before = {p["metadata"]["name"] for c in ("operator", "agent") for p in release_pods(chart, c)}
    kubectl(chart, "apply", "-n", namespace, "-f", "-", stdin=_SLOW_JOB)
    wait_for("the job Running on the agent",
             lambda: get(chart, "computejob", "-n", namespace, "through-upgrade").get("status", {}).get("phase")
             == "Running", chart)
    roll = {"podAnnotations": {"memoplane.io/test-roll": "1"}}
    node_chart.install(chart, {"operator": roll, "agent": roll})
    after = {p["metadata"]["name"] for c in ("operator", "agent") for p in release_pods(chart, c)}
    assert not before & after, (before, after)
    job = wait_for("the job Succeeded", lambda: job_done(chart, namespace, "through-upgrade"), chart)
    assert job["status"]["result"]["value"] == {"slept": 20}
    # Computed once: one run of its key that computed (the job's status may then say CacheHit, when the
    # operator that replaced the old one found the result the draining agent had committed).
    computed = [r for r in run_records(job) if r["key"] == job["status"]["cacheKey"] and not r["cached"]]
    assert len(computed) == 1, computed
    assert job["status"]["attempts"] == 1, job["status"]


def test_uninstall_leaves_no_stuck_objects(chart: cluster.ClusterInfo) -> None:
    node_chart.uninstall(chart)
    wait_for("the release's pods gone", lambda: not get(chart, "pods", "-n", node_chart.NAMESPACE)["items"], chart)
    # The draining agent deletes its node's Lease; nothing else in the namespace holds anything.
    leases = [item["metadata"]["name"] for item in get(chart, "leases", "-n", node_chart.NAMESPACE)["items"]]
    assert not [name for name in leases if name.startswith(LEASE_PREFIX)], leases
    left = kubectl(chart, "get", "all,configmaps,secrets,leases,serviceaccounts", "-n", node_chart.NAMESPACE,
                   "-o", "name")
    print(f"left in {node_chart.NAMESPACE} after uninstall:\n{left}")
    for kind in ("computejobs", "resultcaches"):
        held = [(o["metadata"]["namespace"], o["metadata"]["name"]) for o in get(chart, kind, "-A")["items"]
                if o["metadata"].get("finalizers")]
        assert not held, f"{kind} with finalizers after uninstall: {held}"
    # Kept by design: the CRDs (crds.keep) and with them the jobs and caches; deleting a namespace is not blocked.
    crds = {c["metadata"]["name"] for c in get(chart, "crds")["items"]}
    assert {"computejobs.memoplane.io", "resultcaches.memoplane.io"} <= crds
    namespaces = ["chart-examples", "chart-upgrade", node_chart.NAMESPACE]
    kubectl(chart, "delete", "namespace", *namespaces, "--wait=false")

    def gone() -> bool:
        names = {n["metadata"]["name"] for n in get(chart, "namespaces")["items"]}
        return not names & set(namespaces)

    wait_for("the namespaces deleted (nothing holds them)", gone, chart)

