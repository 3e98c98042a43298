"""Faults on the real node (issue 15, step 4): memoplane installed by its chart (operator and agent
as pods), then its agent pod deleted mid-job, its operator pod killed during 50 jobs, and the
container runtime killed and restarted. Each job still completes, computed exactly once: a run
record per settled run, and the agent pod's own run counter. Outcomes only, never timings."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from memoplane.cluster import protocol as p
from memoplane.cluster.stores import Stores
from memoplane.testing import node, node_release
from memoplane.testing.node_release import AGENT, OPERATOR, Jobs, Release, job, namespace_store, run_records, status

pytestmark = pytest.mark.timeout(1200)
Obj = dict[str, Any]


# drained: the old pod finishes the job, the new one runs nothing; killed: the new pod (the same
# node, its own job) runs it again, and the killed run never settles.
@pytest.mark.parametrize(("force", "reruns"), [(False, 0), (True, 1)], ids=["drained", "killed"])
def test_agent_pod_deleted_mid_job_completes_computed_once(
        memoplane_on_node: Release, node_jobs: Jobs, node_stores: Stores, node_ns: str, force: bool,
        reruns: int) -> None:
    release, jobs, ns = memoplane_on_node, node_jobs, node_ns
    old = release.wait_ready(AGENT)
    source = "import time\n\ndef main(x):\n    time.sleep(8)\n    return x + 1\n"
    jobs.apply(ns, job("slow", source, {"x": 41}, backoffLimit=2))
    jobs.wait(ns, "slow", lambda o: status(o).get("phase") == "Running", timeout=180)
    # drained: as `kubectl delete pod` (SIGTERM: the agent finishes the job, then exits); killed:
    # --grace-period=0 --force. Either way the DaemonSet brings a new pod.
    release.delete_pod(old, force=force)
    s = status(jobs.wait(ns, "slow", timeout=600))
    assert s["phase"] == "Succeeded" and s["result"]["value"] == 42, s
    assert s["cached"] is False, s
    new = release.wait_ready(AGENT, not_uid=old["metadata"]["uid"], timeout=300)
    store = namespace_store(node_stores, ns)
    records = run_records(store, ns, "slow")
    assert list(records) == [s["runId"]], f"one settled run, the one in status: {list(records)} vs {s['runId']}"
    assert store.get_result(s["result"]["digest"]).provenance.node == node.NODE_NAME
    assert node_release.agent_runs(new) == reruns, s
    # The new pod takes the next job.
    before = node_release.agent_runs(new)
    jobs.apply(ns, job("after", "def main(x):\n    return x * 2\n", {"x": 21}))
    after = status(jobs.wait(ns, "after", timeout=300))
    assert after["phase"] == "Succeeded" and after["result"]["value"] == 42, after
    assert node_release.agent_runs(new) - before == 1


def test_operator_pod_killed_during_50_jobs_all_complete_none_twice(
        memoplane_on_node: Release, node_jobs: Jobs, node_ns: str) -> None:
    release, jobs, ns = memoplane_on_node, node_jobs, node_ns
    agent, operator = release.wait_ready(AGENT), release.wait_ready(OPERATOR)
    runs = node_release.agent_runs(agent)
    salt = uuid.uuid4().hex[:12]
    source = "import time\n\ndef main(i):\n    time.sleep(0.3)\n    return i * i\n"
    names = [f"batch-{i:02d}" for i in range(50)]
    jobs.apply(ns, *[job(n, source, {"i": i}, salt=salt) for i, n in enumerate(names)])

    def some_started(_: Obj) -> bool:
        items, _rv = jobs.kube.list(p.COMPUTEJOBS, ns)
        return sum(status(o).get("phase") in ("Running", "Succeeded") for o in items) >= 3
    jobs.wait(ns, names[0], some_started, timeout=300)
    release.delete_pod(operator, force=True)  # grace 0: killed, not drained
    release.wait_ready(OPERATOR, not_uid=operator["metadata"]["uid"], timeout=300)
    done = jobs.wait_all(ns, names, timeout=900)
    values = {n: status(o).get("result", {}).get("value") for n, o in done.items()}
    assert values == {n: i * i for i, n in enumerate(names)}
    assert all(status(o)["cached"] is False for o in done.values())
    same_agent = release.wait_ready(AGENT)
    assert same_agent["metadata"]["uid"] == agent["metadata"]["uid"], "the agent pod was replaced meanwhile"
    assert node_release.agent_runs(same_agent) - runs == 50


def test_container_runtime_killed_and_restarted(memoplane_on_node: Release, node_jobs: Jobs, node_ns: str) -> None:
    release, jobs, ns = memoplane_on_node, node_jobs, node_ns
    directory = Path(release.info.state_dir)
    killed = node.kill_runtime(directory)
    # Crashed, then back: the kubelet reconnects, and the pods keep (or regain) Ready.
    time.sleep(2)  # let the kubelet see the runtime gone (not a wait for an outcome: both are checked below)
    started = node.start_runtime(directory)
    assert started != killed
    for component in (OPERATOR, AGENT):
        release.wait_ready(component, timeout=300)
    agent = release.wait_ready(AGENT)
    before = node_release.agent_runs(agent)
    jobs.apply(ns, job("after-runtime", "def main(x):\n    return x + 1\n", {"x": 1}))
    s = status(jobs.wait(ns, "after-runtime", timeout=300))
    assert s["phase"] == "Succeeded" and s["result"]["value"] == 2, s
    assert node_release.agent_runs(agent) - before == 1
    assert node.node_conditions(release.info)["Ready"] == "True"
