"""Programs that try to escape. Each must fail its own job with a clear reason,
leave the host alone, and leave the pool able to run the next job (checked by
the `sandbox` fixture after every test)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import Runner  # type: ignore[import-not-found]

pytestmark = pytest.mark.hostile

LIBC = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"


def _reason(out: object) -> str:
    f = out.failure
    assert f is not None, out
    return str(f.reason)


def test_outbound_network_to_host_listener(sandbox: Runner) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.setblocking(False)
    port = srv.getsockname()[1]
    src = ("import socket\ndef main(port):\n"
           "    socket.create_connection(('127.0.0.1', port), timeout=3)\n")
    out = sandbox.py(src, {"port": port})
    assert _reason(out) == "exception"
    assert "unreachable" in out.failure.message.lower()  # type: ignore[union-attr]
    with pytest.raises(BlockingIOError):
        srv.accept()  # nothing ever connected
    srv.close()


def test_network_interfaces_are_only_a_down_loopback(sandbox: Runner) -> None:
    # From /proc and an ioctl: if_nameindex asks netlink, which jobs cannot open.
    src = ("import fcntl, socket, struct\ndef main():\n"
           "    names = [l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]]\n"
           "    req = struct.pack('16sH22x', b'lo', 0)\n"
           "    flags = struct.unpack('16sH22x', fcntl.ioctl(socket.socket(), 0x8913, req))[1]\n"  # SIOCGIFFLAGS
           "    return names, flags & 1\n")  # IFF_UP
    out = sandbox.py(src)
    assert out.ok and out.value == [["lo"], 0], out


def test_reading_host_files(sandbox: Runner, tmp_path: Path) -> None:
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("TOP-SECRET")
    for path in (str(secret), "/root/.kube/config", "/root/.bashrc", "/etc/shadow",
                 "/proc/1/root/etc/shadow", "/sys/kernel/notes", "/work/shared/DESIGN.md"):
        out = sandbox.py("def main(p):\n    return open(p).read()\n", {"p": path})
        assert _reason(out) == "exception", path
        assert "No such file" in out.failure.message or "ermission" in out.failure.message  # type: ignore[union-attr]
        assert b"TOP-SECRET" not in out.stdout + out.stderr
    out = sandbox.py("import os\ndef main():\n    return sorted(os.listdir('/root'))\n")
    assert out.value == [".pyenv"]  # only the runtime, nothing else of /root


def test_writing_outside_the_work_dir(sandbox: Runner, tmp_path: Path) -> None:
    host = tmp_path / "host-target"
    for path in ("/etc/evil", "/usr/evil", "/evil", "/in/evil", str(host),
                 "/proc/sys/kernel/core_pattern", "/proc/sysrq-trigger"):
        out = sandbox.py("def main(p):\n    open(p, 'w').write('x')\n", {"p": path})
        assert _reason(out) == "exception", path
        msg = out.failure.message  # type: ignore[union-attr]
        assert any(s in msg for s in ("Read-only", "No such file", "ermission")), msg
    assert not host.exists() and not Path("/evil").exists() and not Path("/etc/evil").exists()
    with open("/proc/sys/kernel/core_pattern") as f:
        assert "x" != f.read().strip()


def test_work_dir_is_size_limited(sandbox: Runner) -> None:
    src = "def main():\n    open('/tmp/big', 'wb').write(b'x' * 3_000_000)\n"
    out = sandbox.py(src, workdir_bytes=1_000_000)
    assert _reason(out) == "output-too-large"


def test_fork_bomb(sandbox: Runner, canary: subprocess.Popen[bytes]) -> None:
    src = ("import os\ndef main():\n    while True:\n        try:\n            os.fork()\n"
           "        except OSError:\n            pass\n")
    out = sandbox.py(src, timeout_s=3, max_pids=32)
    assert _reason(out) in ("timeout", "exit")
    assert "max_pids" in out.failure.message or _reason(out) == "timeout"  # type: ignore[union-attr]


def test_memory_bomb_single_allocation(sandbox: Runner) -> None:
    out = sandbox.py("def main():\n    return len(bytearray(64 << 30))\n")
    assert _reason(out) == "memory"


def test_memory_bomb_growing(sandbox: Runner) -> None:
    src = "def main():\n    xs = []\n    while True:\n        xs.append(bytearray(16 << 20))\n"
    out = sandbox.py(src, memory_bytes=256 << 20)
    assert _reason(out) == "memory"


def test_infinite_loop(sandbox: Runner) -> None:
    out = sandbox.py("def main():\n    while True:\n        pass\n", timeout_s=1)
    assert _reason(out) == "timeout"


def test_infinite_loop_in_a_grandchild_is_killed(sandbox: Runner) -> None:
    src = ("import os, time\ndef main():\n    if os.fork() == 0:\n        os.setsid()\n"
           "        while True:\n            pass\n    time.sleep(60)\n")
    out = sandbox.py(src, timeout_s=1)
    assert _reason(out) == "timeout"


def test_ptrace_of_the_parent(sandbox: Runner) -> None:
    out = sandbox.py(LIBC + "def main(host_pid):\n"
                     "    return libc.ptrace(16, os.getppid() or host_pid, 0, 0)\n",
                     {"host_pid": os.getpid()})
    assert _reason(out) == "forbidden"


@pytest.mark.parametrize("call", [
    "libc.mount(b'tmpfs', b'/tmp', b'tmpfs', 0, None)",
    "libc.umount2(b'/in', 2)",
    "libc.syscall(155, b'/tmp', b'/tmp')",            # pivot_root
    "libc.chroot(b'/tmp')",
    "libc.syscall(321, 0, 0, 0)",                     # bpf
    "libc.syscall(250, 0, 0, 0, 0, 0)",               # keyctl
    "libc.syscall(246, 0, 0, 0, 0)",                  # kexec_load
    "libc.syscall(313, 0, b'', 0)",                   # finit_module
    "libc.syscall(429, -1, b'', -100, b'/tmp', 4)",   # move_mount (killed by the request's filter)
    "libc.syscall(428, -100, b'/in', 1)",             # open_tree (killed by the warm filter)
    "libc.syscall(430, b'tmpfs', 0)",                 # fsopen
])
def test_forbidden_system_calls(sandbox: Runner, call: str) -> None:
    out = sandbox.py(LIBC + f"def main():\n    return {call}\n")
    assert _reason(out) == "forbidden"
    assert "seccomp" in out.failure.message  # type: ignore[union-attr]


def test_both_seccomp_filters_are_installed(sandbox: Runner) -> None:
    # The policy minus the request's mount calls while the child waits, then a
    # filter killing those: both must be in place when the job runs.
    out = sandbox.py("def main():\n    return [l.split() for l in open('/proc/self/status')\n"
                     "            if l.startswith(('Seccomp', 'NoNewPrivs'))]\n")
    assert out.ok, out.failure
    assert dict(out.value) == {"Seccomp:": "2", "Seccomp_filters:": "2", "NoNewPrivs:": "1"}


@pytest.mark.parametrize("call", [
    "libc.unshare(0x10000000)",                       # CLONE_NEWUSER
    "libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)",  # clone(CLONE_NEWUSER|SIGCHLD)
    "libc.syscall(308, 3, 0)",                        # setns
    "libc.syscall(425, 8, 0)",                        # io_uring_setup
    "libc.syscall(323, 0)",                           # userfaultfd
])
def test_nested_namespaces_and_risky_kernel_apis_are_refused(sandbox: Runner, call: str) -> None:
    out = sandbox.py(LIBC + f"def main():\n    r = {call}\n    return [r, ctypes.get_errno()]\n")
    assert out.ok and out.value[0] == -1 and out.value[1] in (1, 38), out.value  # EPERM/ENOSYS


def test_enormous_stdout(sandbox: Runner) -> None:
    src = "import sys\ndef main():\n    while True:\n        sys.stdout.write('x' * 65536)\n"
    out = sandbox.py(src, max_log_bytes=1 << 20)
    assert _reason(out) == "output-too-large"
    assert len(out.stdout) <= 1 << 20


def test_killing_the_parent(sandbox: Runner, canary: subprocess.Popen[bytes]) -> None:
    out = sandbox.py("import os, signal\ndef main():\n    os.kill(os.getppid(), signal.SIGKILL)\n"
                     "    return 'survived'\n")
    # getppid() is 0 in the job's pid namespace: kill(0) targets the job's own process
    # group, and the job is its namespace's init, which ignores SIGKILL from inside.
    assert out.ok and out.value == "survived"
    out = sandbox.py("import os, signal\ndef main(pid):\n    os.kill(pid, signal.SIGKILL)\n",
                     {"pid": os.getpid()})
    assert _reason(out) == "exception"  # host pids do not exist in the job's pid namespace


def test_kill_everything(sandbox: Runner, canary: subprocess.Popen[bytes]) -> None:
    out = sandbox.py("import os, signal\ndef main():\n    os.kill(-1, signal.SIGKILL)\n")
    assert _reason(out) == "exception"  # kill(-1) finds no process outside the job
    assert "No such process" in out.failure.message  # type: ignore[union-attr]


def test_inherited_file_descriptor(pool: object, tmp_path: Path) -> None:
    secret = tmp_path / "held-open.txt"
    secret.write_text("FD-SECRET")
    with open(secret) as held:
        from memoplane.sandbox import SandboxPool
        with SandboxPool(size=1) as fresh:  # opened before the zygote started
            r = Runner(fresh, tmp_path)
            src = ("import os\ndef main(fd):\n    os.lseek(fd, 0, 0)\n"
                   "    return os.read(fd, 100).decode()\n")
            out = r.py(src, {"fd": held.fileno()})
            assert _reason(out) == "exception" and "Bad file descriptor" in out.failure.message  # type: ignore[union-attr]
            out = r.py("import os\ndef main():\n    return sorted(int(f) for f in os.listdir('/proc/self/fd'))\n")
            assert out.ok and set(out.value) <= {0, 1, 2, 3, 1000}, out.value
            r.next_job_ok()
