"""`memoplane serve` driven by the official E2B SDKs (e2b, e2b-code-interpreter) and plain HTTP.

One real server process on a free loopback port for the module; the SDKs are pointed at it
through their own self-hosted configuration (api_url and sandbox_url), as a user would."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2b import AsyncSandbox, CommandExitException, NotFoundException, Sandbox
from e2b_code_interpreter import AsyncSandbox as AsyncCodeSandbox
from e2b_code_interpreter import Sandbox as CodeSandbox

_START_DEADLINE = 60.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("serve")
    env = {**os.environ, "MEMOPLANE_STORE": str(home / "store"), "MEMOPLANE_KEYS_DIR": str(home / "keys"),
           "MEMOPLANE_SERVE_WARM": "1"}
    log = open(home / "serve.log", "wb")  # the server's stderr, for its whole life
    proc = subprocess.Popen([sys.executable, "-m", "memoplane.cli", "serve", "--port", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, (line, (home / "serve.log").read_text())
        url = line.split("listening on ")[1].split()[0]
        _wait_ready(url)
        yield {"url": url, "env": env, "home": home,
               "opts": {"api_url": url, "sandbox_url": url, "api_key": "e2b_local"}}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def _wait_ready(url: str) -> None:
    deadline = time.monotonic() + _START_DEADLINE
    while True:
        try:
            if httpx.get(url + "/health").status_code == 204:
                return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def test_openapi_document_lists_the_routes(server: dict[str, Any]) -> None:
    doc = httpx.get(server["url"] + "/openapi.json").json()
    assert {"/v2/sandboxes", "/sandboxes/{sandbox_id}", "/sandboxes/{sandbox_id}/timeout", "/files",
            "/v1/run"} <= set(doc["paths"])


def test_commands_stream_output_and_exit_codes(server: dict[str, Any]) -> None:
    sandbox = Sandbox.create(timeout=120, **server["opts"])
    try:
        seen: list[str] = []
        result = sandbox.commands.run("echo one; echo two >&2; echo three", on_stdout=seen.append)
        assert (result.stdout, result.stderr, result.exit_code) == ("one\nthree\n", "two\n", 0)
        assert "".join(seen) == "one\nthree\n"
        with pytest.raises(CommandExitException) as failed:
            sandbox.commands.run("echo bad >&2; exit 7")
        assert failed.value.exit_code == 7 and failed.value.stderr == "bad\n"
        env = sandbox.commands.run("echo $GREETING", envs={"GREETING": "hi"})
        assert env.stdout == "hi\n"
        isolated = sandbox.commands.run("id -u; ls /")
        assert isolated.stdout.split()[0] == "0"    # root of its own one-id user namespace
        assert "home" not in isolated.stdout.split()  # the sandbox's view, not the host's /
    finally:
        sandbox.kill()


def test_files_write_read_list_and_state_between_calls(server: dict[str, Any]) -> None:
    sandbox = Sandbox.create(**server["opts"])
    try:
        sandbox.files.write("/tmp/work/notes.txt", "first")
        sandbox.files.write("relative.bin", b"\x00\x01")   # relative to the user's home (/tmp)
        assert sandbox.files.read("/tmp/work/notes.txt") == "first"
        assert bytes(sandbox.files.read("/tmp/relative.bin", format="bytes")) == b"\x00\x01"
        names = {e.name for e in sandbox.files.list("/tmp")}
        assert {"work", "relative.bin"} <= names
        # A command sees what the files API wrote, and the files API what a command wrote.
        assert sandbox.commands.run("cat /tmp/work/notes.txt").stdout == "first"
        sandbox.commands.run("echo made > /tmp/work/by-command")
        assert sandbox.files.read("/tmp/work/by-command") == "made\n"
        assert sandbox.files.exists("/tmp/work/by-command") and not sandbox.files.exists("/tmp/nope")
        sandbox.files.make_dir("/tmp/made")
        sandbox.files.rename("/tmp/work/notes.txt", "/tmp/made/moved.txt")
        assert sandbox.files.read("/tmp/made/moved.txt") == "first"
        sandbox.files.remove("/tmp/work")
        assert not sandbox.files.exists("/tmp/work")
        with pytest.raises(NotFoundException):
            sandbox.files.read("/tmp/missing")
        with pytest.raises(Exception, match=r"(?i)read-only|permission"):
            sandbox.files.write("/usr/evil", "x")       # the runtime's view is read-only
    finally:
        sandbox.kill()


def test_large_files_and_output_cross_the_channel(server: dict[str, Any]) -> None:
    sandbox = Sandbox.create(**server["opts"])
    try:
        blob = os.urandom(3 << 20)
        sandbox.files.write("/tmp/blob", blob)
        assert bytes(sandbox.files.read("/tmp/blob", format="bytes")) == blob
        assert sandbox.commands.run("sha256sum /tmp/blob").stdout.split()[0] == hashlib.sha256(blob).hexdigest()
        big = sandbox.commands.run("head -c 2000000 /dev/zero | tr '\\0' x")
        assert big.stdout == "x" * 2_000_000
    finally:
        sandbox.kill()


def test_background_command_is_killed(server: dict[str, Any]) -> None:
    sandbox = Sandbox.create(**server["opts"])
    try:
        handle = sandbox.commands.run("echo started; sleep 600", background=True)
        assert handle.kill()
        with pytest.raises(CommandExitException) as ended:
            handle.wait()
        assert ended.value.exit_code == -1 and ended.value.error == "signal: sigkill"
        assert sandbox.commands.run("echo still here").stdout == "still here\n"
    finally:
        sandbox.kill()


def test_output_no_one_reads_is_bounded_and_the_sandbox_stays_usable(server: dict[str, Any]) -> None:
    sandbox = Sandbox.create(**server["opts"])
    try:
        flood = sandbox.commands.run("yes flood", background=True)   # never read while it runs
        for _ in range(5):
            sandbox.files.write("/tmp/still", "usable")
            assert sandbox.files.read("/tmp/still") == "usable"
            assert sandbox.commands.run("echo ok").stdout == "ok\n"
        flood.kill()
    finally:
        sandbox.kill()


def test_stdin_and_the_list_of_running_commands(server: dict[str, Any]) -> None:
    sandbox = Sandbox.create(**server["opts"])
    try:
        handle = sandbox.commands.run("tr a-z A-Z", background=True, stdin=True)
        assert [(p.pid, p.cmd, p.args) for p in sandbox.commands.list()] == \
            [(handle.pid, "/bin/bash", ["-l", "-c", "tr a-z A-Z"])]
        sandbox.commands.send_stdin(handle.pid, "shout\n")
        sandbox.commands.close_stdin(handle.pid)
        assert handle.wait().stdout == "SHOUT\n"
        assert sandbox.commands.list() == []
    finally:
        sandbox.kill()


def test_list_kill_and_timeout(server: dict[str, Any]) -> None:
    first = Sandbox.create(metadata={"test": "list"}, **server["opts"])
    second = Sandbox.create(metadata={"test": "list"}, **server["opts"])
    listed = {s.sandbox_id for s in Sandbox.list(**server["opts"]).next_items()}
    assert {first.sandbox_id, second.sandbox_id} <= listed
    again = Sandbox.connect(first.sandbox_id, **server["opts"])
    assert again.commands.run("echo same").stdout == "same\n"
    assert again.get_info().metadata == {"test": "list"}
    first.kill()
    with pytest.raises(Exception, match="not found"):
        Sandbox.connect(first.sandbox_id, **server["opts"])
    listed = {s.sandbox_id for s in Sandbox.list(**server["opts"]).next_items()}
    assert first.sandbox_id not in listed and second.sandbox_id in listed
    assert not first.is_running()
    second.set_timeout(1)   # reaped once its timeout has passed
    deadline = time.monotonic() + 30
    while second.sandbox_id in {s.sandbox_id for s in Sandbox.list(**server["opts"]).next_items()}:
        assert time.monotonic() < deadline, "a sandbox past its timeout was not reaped"
        time.sleep(0.2)
    assert not second.is_running()


def test_a_sandbox_that_ends_its_own_agent_is_gone_and_the_server_is_not(server: dict[str, Any]) -> None:
    sandbox = CodeSandbox.create(**server["opts"])
    neighbour = Sandbox.create(**server["opts"])
    try:
        with pytest.raises(Exception):  # noqa: B017 - the connection drops: any SDK error will do
            sandbox.run_code("import os\nos._exit(3)")
        deadline = time.monotonic() + 30
        while sandbox.is_running():
            assert time.monotonic() < deadline, "a sandbox whose agent exited is still listed as running"
            time.sleep(0.1)
        assert sandbox.sandbox_id not in {s.sandbox_id for s in Sandbox.list(**server["opts"]).next_items()}
        assert neighbour.commands.run("echo fine").stdout == "fine\n"
        outside = neighbour.commands.run(
            "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 1), timeout=2)'", timeout=30)
    except CommandExitException as refused:
        assert "Network is unreachable" in refused.stderr  # its own network namespace: a down loopback only
    else:
        pytest.fail(f"a sandbox reached the host's network: {outside}")
    finally:
        neighbour.kill()


def test_bad_requests_name_the_field(server: dict[str, Any]) -> None:
    create = server["url"] + "/v2/sandboxes"
    unknown = httpx.post(create, json={"templateID": "no-such-template"})
    assert unknown.status_code == 404 and "no-such-template" in unknown.json()["message"]
    online = httpx.post(create, json={"templateID": "base", "allow_internet_access": True})
    assert online.status_code == 400 and "allow_internet_access" in online.json()["message"]
    bad_env = httpx.post(create, json={"templateID": "base", "envVars": {"MEMOPLANE_X": "1"}})
    assert bad_env.status_code == 400 and "envVars" in bad_env.json()["message"]
    missing = httpx.post(create, json={"timeout": 10})
    assert missing.status_code == 400 and missing.json()["message"].startswith("templateID: Field required")
    too_long = httpx.post(create, json={"templateID": "base", "timeout": 10 ** 7})
    assert too_long.status_code == 400 and "timeout" in too_long.json()["message"]


def test_run_code_keeps_state_between_cells(server: dict[str, Any]) -> None:
    sandbox = CodeSandbox.create(**server["opts"])
    try:
        first = sandbox.run_code("x = 41\nprint('side effect')\nx + 1")
        assert first.text == "42" and first.logs.stdout == ["side effect\n"]
        assert sandbox.run_code("x * 2").text == "82"
        seen: list[str] = []
        streamed = sandbox.run_code("import sys\nfor i in range(3):\n    print(i)\nsys.stderr.write('no newline')",
                                    on_stdout=lambda m: seen.append(m.line))
        assert seen == ["0\n", "1\n", "2\n"] and streamed.logs.stderr == ["no newline"]
        assert streamed.text == "10"   # the last expression's value: write() returned 10
        failed = sandbox.run_code("1 / 0")
        assert failed.error is not None and failed.error.name == "ZeroDivisionError"
    finally:
        sandbox.kill()


def test_the_async_sdks_work_too(server: dict[str, Any]) -> None:
    async def session() -> tuple[str, str, str]:
        sandbox = await AsyncSandbox.create(**server["opts"])
        try:
            ran = await sandbox.commands.run("echo async")
            await sandbox.files.write("/tmp/f", "v")
            read = await sandbox.files.read("/tmp/f")
        finally:
            await sandbox.kill()
        interpreter = await AsyncCodeSandbox.create(**server["opts"])
        try:
            await interpreter.run_code("y = 2")
            cell = await interpreter.run_code("y * 21")
        finally:
            await interpreter.kill()
        return ran.stdout, read, str(cell.text)

    assert asyncio.run(session()) == ("async\n", "v", "42")


def test_v1_run_misses_then_hits_with_the_key_of_memoplane_run(server: dict[str, Any], tmp_path: Path) -> None:
    source = "import time\n\ndef main(n):\n    time.sleep(0.2)\n    return n * 2\n"
    body = {"code": source, "inputs": {"n": 21}}
    miss = httpx.post(server["url"] + "/v1/run", json=body, timeout=120).json()
    assert (miss["cached"], miss["result"]) == (False, 42)
    hit = httpx.post(server["url"] + "/v1/run", json=body, timeout=120).json()
    assert (hit["cached"], hit["result"], hit["cache_key"]) == (True, 42, miss["cache_key"])
    assert hit["compute_seconds_saved"] >= 0.2
    # The same job from the command line is the same computation: a hit.
    script = tmp_path / "job.py"
    script.write_text(source)
    cli = subprocess.run([sys.executable, "-m", "memoplane.cli", "run", str(script), "-i", "n=21", "--json"],
                         env=server["env"], capture_output=True, text=True, timeout=120)
    report = json.loads(cli.stdout)
    assert (report["cached"], report["cache_key"]) == (True, miss["cache_key"])


def test_v1_run_rejects_bad_requests(server: dict[str, Any]) -> None:
    run = server["url"] + "/v1/run"
    both = httpx.post(run, json={"code": "def main(): pass", "command": ["true"]})
    assert both.status_code == 400 and "exactly one of code and command" in both.json()["message"]
    bad_name = httpx.post(run, json={"code": "def main(**k): pass", "inputs": {"not a name": 1}})
    assert bad_name.status_code == 400 and "not a name" in bad_name.json()["message"]
    policy = httpx.post(run, json={"code": "def main(): pass", "policy": "Sometimes"})
    assert policy.status_code == 400 and policy.json()["message"].startswith("policy: Input should be")
    namespace = httpx.post(run, json={"code": "def main(): pass", "namespace": "team-a"})
    assert namespace.status_code == 400 and "namespace is for /v1/run on Kubernetes" in namespace.json()["message"]
    failing = httpx.post(run, json={"code": "def main():\n    raise ValueError('no')\n"}, timeout=120)
    assert failing.status_code == 422 and "ValueError" in failing.json()["message"]


def test_serve_refuses_a_non_loopback_address() -> None:
    no_keys = {**os.environ, "MEMOPLANE_SERVE_API_KEYS": "/nonexistent/apikeys.json"}
    proc = subprocess.run([sys.executable, "-m", "memoplane.cli", "serve", "--host", "0.0.0.0", "--port", "0"],
                          capture_output=True, text=True, timeout=60, env=no_keys)
    assert proc.returncode != 0 and "not a loopback address" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr   # one line, no traceback
