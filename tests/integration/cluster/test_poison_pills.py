"""Jobs that break host-side code end Failed, and the agent goes on serving (issue 9, finding 4).

A return value nested 500 lists deep and an output tree 1,200 directories deep once raised
RecursionError in the agent: the job stayed Running and was re-run on every relist, and each
attempt left its temp dir behind. Each must now be one failed attempt (backoffLimit 0: Failed)
with a reason in status, leave no job directory of the agent behind, and the agent that ran
it must run the next job. Also: the agents' environment holds no store keys (finding 1).
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest

from memoplane.api.specs import computejob_manifest
from memoplane.cluster import protocol as p
from memoplane.testing import cluster, processes

pytestmark = pytest.mark.integration
Stack = Any  # conftest.Stack (fixture `stack`)
NODES = ("node-a", "node-b")

DEEP_RETURN = """
def main():
    value = []
    for _ in range(500):
        value = [value]
    return value
"""

DEEP_OUTPUT = """
import os

def main():
    os.chdir(os.environ["MEMOPLANE_OUT"])
    for _ in range(1200):
        os.mkdir("d")
        os.chdir("d")
    with open("leaf", "w") as f:
        f.write("bottom")
    return "written"
"""

NEXT = "def main(x):\n    return x + 1\n"


def job(name: str, source: str, inputs: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    """A ComputeJob of its own key (cache.version: the store outlives the namespace)."""
    return computejob_manifest(name, None, {
        "python": {"source": source}, "inputs": [{"name": k, "value": v} for k, v in (inputs or {}).items()],
        "cache": {"version": uuid.uuid4().hex[:12]}, **spec})


def status(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("status") or {}


def agent_pids(stack: Stack) -> dict[str, int]:
    return {node: stack.proc(processes.AGENT_PREFIX + node).pid for node in NODES}


def job_dirs_of(pids: dict[str, int]) -> list[str]:
    """The agents' job directories in the temp dir (named memoplane-job-<pid>-<start>-...)."""
    prefixes = tuple(f"memoplane-job-{pid}-" for pid in pids.values())
    return sorted(p.name for p in Path(tempfile.gettempdir()).iterdir() if p.name.startswith(prefixes))


def assert_fails_and_the_agent_serves_on(stack: Stack, ns: str, name: str, source: str) -> None:
    pids = agent_pids(stack)
    stack.apply(ns, job(name, source, backoffLimit=0))
    s = status(stack.wait(ns, name, timeout=180))
    assert s["phase"] == p.FAILED, s
    assert s["attempts"] == 1, "one attempt, not re-run"
    assert s["reason"] and s["failure"]["reason"] and s["failure"]["message"].strip(), s
    node = s["node"]
    assert agent_pids(stack) == pids, "no agent crashed or restarted"
    assert job_dirs_of(pids) == [], "the failed attempt left its job directory behind"
    # The agent that ran it runs the next job: it is the only node left to take it.
    other = next(n for n in NODES if n != node)
    stack.kill_agent(other)
    try:
        stack.apply(ns, job(f"{name}-next", NEXT, {"x": 41}))
        after = status(stack.wait(ns, f"{name}-next", timeout=180))
        assert after["phase"] == p.SUCCEEDED and after["result"]["value"] == 42, after
        assert after["node"] == node
    finally:
        stack.ensure()


def test_a_return_value_nested_500_deep_fails_the_job(stack: Stack, ns: str) -> None:
    assert_fails_and_the_agent_serves_on(stack, ns, "deep-return", DEEP_RETURN)


def test_an_output_tree_1200_directories_deep_fails_the_job(stack: Stack, ns: str) -> None:
    assert_fails_and_the_agent_serves_on(stack, ns, "deep-output", DEEP_OUTPUT)


def test_the_agents_environment_holds_no_store_keys(stack: Stack, control_plane: cluster.ClusterInfo) -> None:
    stack.ensure()
    for node, pid in agent_pids(stack).items():
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not any(control_plane.s3_secret_key.encode() in entry for entry in environ), node
        assert not any(entry.startswith(b"MEMOPLANE_S3_ACCESS_KEY=") and entry != b"MEMOPLANE_S3_ACCESS_KEY="
                       for entry in environ), node
        assert any(entry.startswith(b"MEMOPLANE_S3_CREDENTIALS_DIR=/") for entry in environ), node
