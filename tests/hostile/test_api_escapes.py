"""The hostile suite's escapes through the agent API: code cells (`run_code`) and commands in a
sandbox of a real `memoplane serve` (API keys, the e2b SDKs), and /v1/run. Each must be contained
as the suite's own cases are (no network, no host file read or written, seccomp and no nested
namespaces, no host process reached), and the sandbox, the server and the host carry on: checked
after every test by running the next cell, and by a host canary process."""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2b import CommandExitException
from e2b_code_interpreter import Sandbox

from memoplane.server.apikeys import ApiKeys

pytestmark = pytest.mark.hostile

_START_DEADLINE = 60.0
LIBC = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"


class Serve:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.token = ApiKeys(home / "apikeys.json").create("hostile", ["exec", "files", "run"], tier="large")[1]
        env = {**os.environ, "MEMOPLANE_STORE": str(home / "store"), "MEMOPLANE_KEYS_DIR": str(home / "keys"),
               "MEMOPLANE_SERVE_API_KEYS": str(home / "apikeys.json"), "MEMOPLANE_SERVE_WARM": "1"}
        with open(home / "serve.log", "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "memoplane.cli", "serve", "--port", "0"], env=env,
                                         stdout=subprocess.PIPE, stderr=log, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, (line, (home / "serve.log").read_text())
        self.url = line.split("listening on ")[1].split()[0]
        deadline = time.monotonic() + _START_DEADLINE
        while httpx.get(self.url + "/health", headers={"X-API-KEY": self.token}).status_code != 204:
            assert time.monotonic() < deadline, "the server did not answer"
            time.sleep(0.05)

    def sdk(self) -> dict[str, Any]:
        return {"api_key": self.token, "api_url": self.url, "sandbox_url": self.url, "timeout": 300}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    server = Serve(tmp_path_factory.mktemp("api-escapes"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def module_sandbox(serve: Serve) -> Iterator[Sandbox]:
    sandbox = Sandbox.create(**serve.sdk())
    try:
        yield sandbox
    finally:
        sandbox.kill()


@pytest.fixture()
def sandbox(module_sandbox: Sandbox) -> Iterator[Sandbox]:
    """The module's sandbox; after each test it still runs the next cell and command."""
    yield module_sandbox
    assert module_sandbox.run_code("sum(range(10))").text == "45"
    assert module_sandbox.commands.run("echo next").stdout == "next\n"


@pytest.fixture()
def canary() -> Iterator[subprocess.Popen[bytes]]:
    """A host process of the server's uid: nothing in a sandbox may reach it."""
    proc = subprocess.Popen(["sleep", "600"])
    yield proc
    assert proc.poll() is None, "a hostile cell reached a host process"
    proc.kill()   # our own child, by its handle
    proc.wait()


def _error(sandbox: Sandbox, code: str) -> tuple[str, str]:
    """The exception a cell raised: (name, value)."""
    execution = sandbox.run_code(code)
    assert execution.error is not None, (code, execution)
    return execution.error.name, execution.error.value


def _exit_code(sandbox: Sandbox, command: str) -> int:
    try:
        return sandbox.commands.run(command).exit_code
    except CommandExitException as failed:
        return failed.exit_code


def test_outbound_network_to_a_host_listener(sandbox: Sandbox) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.setblocking(False)
    port = srv.getsockname()[1]
    name, value = _error(sandbox, f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)")
    assert name == "OSError" and "unreachable" in value.lower(), (name, value)
    assert _exit_code(sandbox, f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 3)\"") != 0
    with pytest.raises(BlockingIOError):
        srv.accept()   # nothing ever connected
    srv.close()


def test_the_only_interface_is_a_down_loopback(sandbox: Sandbox) -> None:
    cell = sandbox.run_code(
        "import fcntl, socket, struct\n"
        "names = [l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]]\n"
        "req = struct.pack('16sH22x', b'lo', 0)\n"
        "flags = struct.unpack('16sH22x', fcntl.ioctl(socket.socket(), 0x8913, req))[1]\n"   # SIOCGIFFLAGS
        "(names, flags & 1)")
    assert cell.error is None and cell.text == "(['lo'], 0)", cell


def test_reading_host_files(sandbox: Sandbox, tmp_path: Path) -> None:
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("TOP-SECRET")
    for path in (str(secret), "/root/.kube/config", "/root/.bashrc", "/etc/shadow", "/proc/1/root/etc/shadow",
                 "/work/shared/DESIGN.md"):
        name, value = _error(sandbox, f"open({path!r}).read()")
        assert name in ("FileNotFoundError", "PermissionError"), (path, name, value)
        done = sandbox.commands.run(f"cat {path} 2>&1 || true")
        assert "TOP-SECRET" not in done.stdout and "root:" not in done.stdout, (path, done.stdout)
    assert sandbox.run_code("import os\nsorted(os.listdir('/root'))").text == "['.pyenv']"


def test_writing_outside_the_sandbox(sandbox: Sandbox, tmp_path: Path) -> None:
    host = tmp_path / "host-target"
    for path in ("/etc/evil", "/usr/evil", "/evil", str(host), "/proc/sys/kernel/core_pattern",
                 "/proc/sysrq-trigger"):
        name, value = _error(sandbox, f"open({path!r}, 'w').write('x')")
        assert name in ("OSError", "FileNotFoundError", "PermissionError"), (path, name, value)
        assert any(s in value for s in ("Read-only", "No such file", "ermission")), (path, value)
        assert _exit_code(sandbox, f"echo x > {path}") != 0, path
    assert not host.exists() and not Path("/evil").exists() and not Path("/etc/evil").exists()
    with open("/proc/sys/kernel/core_pattern") as f:
        assert f.read().strip() != "x"


def test_both_seccomp_filters_and_no_new_privileges(sandbox: Sandbox) -> None:
    for pid in ("self", "1"):   # a cell's process and the sandbox's first
        cell = sandbox.run_code(f"dict(l.split()[:2] for l in open('/proc/{pid}/status') "
                                "if l.startswith(('Seccomp', 'NoNewPrivs')))")
        assert cell.error is None, cell.error
        assert cell.text == "{'NoNewPrivs:': '1', 'Seccomp:': '2', 'Seccomp_filters:': '2'}", (pid, cell.text)


@pytest.mark.parametrize("call", [
    "libc.mount(b'tmpfs', b'/tmp', b'tmpfs', 0, None)",
    "libc.chroot(b'/tmp')",
    "libc.syscall(321, 0, 0, 0)",                     # bpf
    "libc.syscall(246, 0, 0, 0, 0)",                  # kexec_load
    "libc.syscall(428, -100, b'/in', 1)",             # open_tree
    "libc.ptrace(16, os.getppid(), 0, 0)",            # PTRACE_ATTACH to its parent
])
def test_forbidden_system_calls_kill_the_command_only(sandbox: Sandbox, call: str) -> None:
    code = (LIBC + f"print('before', flush=True)\n{call}\nprint('after')\n").replace('"', '\\"')
    try:
        done = sandbox.commands.run(f'python3 -c "{code}"')
        raise AssertionError(f"{call} returned: {done}")
    except CommandExitException as killed:
        assert killed.stdout == "before\n" and killed.exit_code != 0, killed
        assert "after" not in killed.stdout


@pytest.mark.parametrize("call", [
    "libc.unshare(0x10000000)",                       # CLONE_NEWUSER
    "libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)",  # clone(CLONE_NEWUSER|SIGCHLD)
    "libc.syscall(308, 3, 0)",                        # setns
    "libc.syscall(425, 8, 0)",                        # io_uring_setup
    "libc.syscall(323, 0)",                           # userfaultfd
])
def test_nested_namespaces_and_risky_kernel_apis_are_refused(sandbox: Sandbox, call: str) -> None:
    cell = sandbox.run_code(LIBC + f"r = {call}\n[r, ctypes.get_errno()]")
    assert cell.error is None, cell.error
    result, errno = ast.literal_eval(cell.text or "")
    assert result == -1 and errno in (1, 38), cell.text   # EPERM/ENOSYS


def test_host_processes_are_out_of_reach(sandbox: Sandbox, canary: subprocess.Popen[bytes]) -> None:
    name, _ = _error(sandbox, f"import os, signal\nos.kill({canary.pid}, signal.SIGKILL)")
    assert name == "ProcessLookupError"   # host pids do not exist in the sandbox's pid namespace
    name, _ = _error(sandbox, f"import os\nos.kill({os.getpid()}, 9)")
    assert name == "ProcessLookupError"
    _exit_code(sandbox, "kill -9 -1")   # every process it can see; the host's are not among them


def test_memory_and_output_bombs_end_the_command_only(sandbox: Sandbox) -> None:
    assert _exit_code(sandbox, "python3 -c 'bytearray(64 << 30)'") != 0
    name, _ = _error(sandbox, "len(bytearray(64 << 30))")
    assert name == "MemoryError"


def test_one_sandbox_cannot_see_anothers_files(serve: Serve, sandbox: Sandbox) -> None:
    other = Sandbox.create(**serve.sdk())
    try:
        other.files.write("/tmp/other-secret.txt", "OTHER-SANDBOX")
        assert sandbox.commands.run("grep -rs OTHER-SANDBOX /tmp /in /out 2>/dev/null | wc -l").stdout == "0\n"
        assert "other-secret.txt" not in sandbox.commands.run("ls -A /tmp").stdout
        found = sandbox.run_code("import glob\nglob.glob('/proc/*/root/tmp/other-secret.txt')")
        assert found.text == "[]", found
    finally:
        other.kill()


def test_a_hostile_run_fails_and_caches_nothing(serve: Serve) -> None:
    body = {"code": "def main():\n    return open('/etc/shadow').read()\n"}
    with httpx.Client(base_url=serve.url, headers={"X-API-KEY": serve.token}, timeout=120) as client:
        for _ in range(2):   # the second is no hit: nothing was cached
            failed = client.post("/v1/run", json=body)
            assert failed.status_code == 422 and "nothing was cached" in failed.json()["message"], failed.text
        network = client.post("/v1/run", json={"code": "import socket\ndef main():\n"
                                               "    socket.create_connection(('127.0.0.1', 9), timeout=3)\n"})
        assert network.status_code == 422 and "unreachable" in network.json()["message"].lower(), network.text
        ok = client.post("/v1/run", json={"code": "def main():\n    return 7\n"})
        assert ok.status_code == 200 and ok.json()["result"] == 7, ok.text
