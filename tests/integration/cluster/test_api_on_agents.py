"""The agent API on the local control plane (as `hack/cluster up --with-memoplane` runs it): the e2b
SDK creates sandboxes through `memoplane serve`, which runs them in the node agents' warm pools
(host processes here) and shows each as a Sandbox object until it ends."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Stack
from e2b import CommandExitException, Sandbox
from e2b_code_interpreter import Sandbox as CodeSandbox

from memoplane.cluster import protocol as p
from memoplane.testing import processes


@pytest.fixture(scope="module")
def api(stack: Stack) -> Iterator[dict[str, Any]]:
    stack.ensure()
    try:
        proc = processes.start_api(stack.cfg)
    except processes.ProcessError as exc:
        pytest.fail(f"the agent API cannot start: {exc}", pytrace=False)
    url = proc.url("http", "")
    try:
        yield {"proc": proc, "opts": {"api_url": url, "sandbox_url": url, "api_key": "e2b_local"}}
    finally:
        processes.stop(stack.cfg.directory, processes.API)


def _sandboxes(stack: Stack) -> dict[str, dict[str, Any]]:
    items, _ = stack.kube.list(p.SANDBOXES, stack.cfg.lease_namespace)
    return {item["metadata"]["name"]: item for item in items}


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def test_sdk_sandbox_runs_on_an_agent_and_is_listed_as_an_object_while_it_lives(stack: Stack,
                                                                               api: dict[str, Any]) -> None:
    sandbox = Sandbox.create(timeout=120, **api["opts"])
    try:
        result = sandbox.commands.run("echo one; echo two >&2; id -u")
        assert (result.stdout.splitlines()[0], result.stderr, result.exit_code) == ("one", "two\n", 0)
        with pytest.raises(CommandExitException) as failed:
            sandbox.commands.run("exit 7")
        assert failed.value.exit_code == 7
        sandbox.files.write("notes/a.txt", "hello")
        assert sandbox.files.read("notes/a.txt") == "hello"
        assert [e.name for e in sandbox.files.list("notes")] == ["a.txt"]

        objects = _sandboxes(stack)
        assert sandbox.sandbox_id in objects, objects
        status = objects[sandbox.sandbox_id]["status"]
        assert status["node"] in ("node-a", "node-b") and status["team"] == "local" and status["template"] == "base"
        assert status["created"] <= status["expires"]
        # The sandbox is the agent's child, not the API's: the API process never started a pool.
        assert _children(api["proc"].pid) == []
        agent = stack.proc(processes.AGENT_PREFIX + status["node"])
        assert _children(agent.pid), "the agent runs no sandbox process"
        before = status["expires"]
        sandbox.set_timeout(600)
        deadline = time.monotonic() + 30
        while _sandboxes(stack)[sandbox.sandbox_id]["status"]["expires"] == before:
            assert time.monotonic() < deadline, "the object's expires did not follow set_timeout"
            time.sleep(0.2)
    finally:
        sandbox.kill()
    assert sandbox.sandbox_id not in _sandboxes(stack)   # gone once kill returned
    assert not sandbox.is_running()


def test_sandboxes_spread_over_the_agents(stack: Stack, api: dict[str, Any]) -> None:
    sandboxes = [Sandbox.create(timeout=60, **api["opts"]) for _ in range(2)]
    try:
        nodes = {_sandboxes(stack)[s.sandbox_id]["status"]["node"] for s in sandboxes}
        assert nodes == {"node-a", "node-b"}
        assert [s.commands.run("echo $((6*7))").stdout for s in sandboxes] == ["42\n", "42\n"]
    finally:
        for sandbox in sandboxes:
            sandbox.kill()
    assert not set(_sandboxes(stack)) & {s.sandbox_id for s in sandboxes}


def test_a_sandbox_whose_agent_dies_ends(stack: Stack, api: dict[str, Any]) -> None:
    sandbox = Sandbox.create(timeout=120, **api["opts"])
    node = _sandboxes(stack)[sandbox.sandbox_id]["status"]["node"]
    stack.kill_agent(node)
    try:
        deadline = time.monotonic() + 30
        while sandbox.sandbox_id in _sandboxes(stack) or sandbox.is_running():
            assert time.monotonic() < deadline, "a sandbox of a dead agent is still listed"
            time.sleep(0.2)
    finally:
        stack.ensure()


def test_deleting_a_sandbox_object_ends_its_sandbox(stack: Stack, api: dict[str, Any]) -> None:
    sandbox = Sandbox.create(timeout=120, **api["opts"])
    try:
        assert stack.kube.delete(p.SANDBOXES, stack.cfg.lease_namespace, sandbox.sandbox_id)
        deadline = time.monotonic() + 30
        while sandbox.is_running():
            assert time.monotonic() < deadline, "the sandbox outlived its deleted object"
            time.sleep(0.2)
        assert sandbox.sandbox_id not in [s.sandbox_id for s in Sandbox.list(**api["opts"]).next_items()]
    finally:
        sandbox.kill()


def test_code_cells_keep_their_state_in_a_sandbox_on_an_agent(api: dict[str, Any]) -> None:
    sandbox = CodeSandbox.create(timeout=60, **api["opts"])
    try:
        sandbox.run_code("x = 20")
        assert sandbox.run_code("x + 22").text == "42"
    finally:
        sandbox.kill()


def test_objects_an_earlier_api_left_are_deleted_when_it_starts(stack: Stack, api: dict[str, Any]) -> None:
    namespace = stack.cfg.lease_namespace
    left = {"apiVersion": "memoplane.io/v1alpha1", "kind": "Sandbox", "spec": {},
            "metadata": {"name": "mpleftbehind", "namespace": namespace}}
    assert stack.kube.create(p.SANDBOXES, namespace, left) is not None
    processes.stop(stack.cfg.directory, processes.API)   # as a crashed API would, it left one
    try:
        api["proc"] = processes.start_api(stack.cfg)   # on another port: the tests after this one use it
    except processes.ProcessError as exc:
        pytest.fail(f"the agent API cannot restart: {exc}", pytrace=False)
    url = api["proc"].url("http", "")
    api["opts"] = {**api["opts"], "api_url": url, "sandbox_url": url}
    deadline = time.monotonic() + 30
    while "mpleftbehind" in _sandboxes(stack):
        assert time.monotonic() < deadline, "a Sandbox object of no sandbox outlived the API's restart"
        time.sleep(0.2)
