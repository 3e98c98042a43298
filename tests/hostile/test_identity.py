"""Who a job is on the host: an unprivileged uid of its own, with no groups and
no capabilities, that owns no host file; /in and /out are idmapped to it."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Runner  # type: ignore[import-not-found]

from memoplane.sandbox import (
    CommandTask,
    Limits,
    PythonTask,
    SandboxOutcome,
    SandboxPool,
    SandboxRequest,
)
from memoplane.sandbox.isolate import JOB_HOST_ID

pytestmark = pytest.mark.hostile


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _find(cmdline: bytes, deadline: float) -> int:
    while time.monotonic() < deadline:
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/cmdline", "rb") as f:
                        if f.read() == cmdline:
                            return int(name)
                except OSError:
                    pass
        time.sleep(0.01)
    raise AssertionError(f"no host process runs {cmdline!r}")


def test_job_processes_run_as_the_unprivileged_host_uid(pool: SandboxPool, tmp_path: Path) -> None:
    assert os.getuid() == 0, "this suite runs as root, the agent's case"
    i, o = tmp_path / "in", tmp_path / "out"
    i.mkdir()
    o.mkdir()
    mark = f"{30 + uuid.uuid4().int % 10**6 / 10**7:.7f}"  # unique: find it on the host
    got: list[SandboxOutcome] = []
    t = threading.Thread(target=lambda: got.append(pool.run(SandboxRequest(
        CommandTask(("sleep", mark)), i, o, limits=Limits(timeout_s=3)))))
    t.start()
    try:
        pid = _find(b"sleep\0" + mark.encode() + b"\0", time.monotonic() + 10)
        job, init = _status(pid), _status(int(_status(pid)["PPid"]))
    finally:
        t.join()
    for st in (job, init):  # the command and the job's pid 1 (the Python child)
        assert st["Uid"].split() == [str(JOB_HOST_ID)] * 4, st["Uid"]
        assert st["Gid"].split() == [str(JOB_HOST_ID)] * 4, st["Gid"]
        assert st["Groups"].strip() == ""
        assert int(st["CapEff"], 16) == int(st["CapPrm"], 16) == int(st["CapBnd"], 16) == 0
        assert st["NoNewPrivs"].strip() == "1" and st["Seccomp"].strip() == "2"
    assert got and got[0].failure is not None and got[0].failure.reason == "timeout"


def test_job_sees_itself_as_root_of_a_one_id_namespace(sandbox: Runner) -> None:
    src = ("import os\ndef main():\n    return [os.getresuid(), os.getresgid(), os.getgroups(),\n"
           "            open('/proc/self/uid_map').read().split(),\n"
           "            open('/proc/self/gid_map').read().split()]\n")
    out = sandbox.py(src)
    assert out.ok, out.failure
    assert out.value == [[0, 0, 0], [0, 0, 0], [], ["0", str(JOB_HOST_ID), "1"],
                         ["0", str(JOB_HOST_ID), "1"]]


def test_in_and_out_are_idmapped(sandbox: Runner) -> None:
    i, o = sandbox.dirs()
    (i / "only-root.txt").write_text("for the job")
    os.chmod(i / "only-root.txt", 0o600)  # the job's own input: readable through the idmap
    src = ("import os\ndef main():\n    data = open('/in/only-root.txt').read()\n"
           "    open('/out/result.txt', 'w').write(data.upper())\n"
           "    os.mkdir('/out/sub')\n"
           "    return [os.stat('/in/only-root.txt').st_uid, os.stat('/out/result.txt').st_uid]\n")
    out = sandbox.pool.run(SandboxRequest(PythonTask(src, filename="hostile.py"), i, o))
    assert out.ok and out.value == [0, 0], (out.value, out.failure)
    # On the host the outputs are the agent's, as if it had written them; no
    # host file is owned by the job's uid.
    for p in (o / "result.txt", o / "sub"):
        st = os.lstat(p)
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid()), p
    assert (o / "result.txt").read_text() == "FOR THE JOB"
    assert stat.S_IMODE(os.stat(i / "only-root.txt").st_mode) == 0o600  # nothing chmod-ed


def test_set_id_bits_in_outputs_are_refused_and_removed(sandbox: Runner) -> None:
    i, o = sandbox.dirs()
    src = ("import os, shutil\ndef main():\n    shutil.copy('/usr/bin/true', '/out/t')\n"
           "    os.chmod('/out/t', 0o6755)\n")
    out = sandbox.pool.run(SandboxRequest(PythonTask(src, filename="hostile.py"), i, o))
    assert out.failure is not None and out.failure.reason == "forbidden", out
    assert "set-user/group-id" in out.failure.message
    assert list(o.iterdir()) == []  # a failed job's outputs never reach the host


@pytest.fixture(scope="module")
def exposed() -> Iterator[tuple[Path, SandboxPool]]:
    """A pool whose view shows a host directory with root-only files in it
    (not under /tmp: the job's own /tmp would hide it)."""
    d = Path(tempfile.mkdtemp(prefix="memoplane-exposed-", dir="/var/tmp"))
    for name, mode in (("public.txt", 0o644), ("owner-only.txt", 0o600),
                       ("group-only.txt", 0o640)):
        (d / name).write_text("SECRET " + name)
        os.chmod(d / name, mode)
    os.chmod(d, 0o755)
    try:
        with SandboxPool(size=0, extra_paths=(str(d),)) as p:
            yield d, p
    finally:
        shutil.rmtree(d)


def test_root_only_host_files_stay_unreadable_when_visible(
        exposed: tuple[Path, SandboxPool], tmp_path: Path) -> None:
    d, pool = exposed
    r = Runner(pool, tmp_path)
    src = ("def main(p):\n    try:\n        return open(p).read()\n"
           "    except OSError as e:\n        return type(e).__name__\n")
    assert r.py(src, {"p": str(d / "public.txt")}).value == "SECRET public.txt"  # it is visible
    for name in ("owner-only.txt", "group-only.txt"):  # group 0 is not among the job's groups
        out = r.py(src, {"p": str(d / name)})
        assert out.ok and out.value == "PermissionError", (name, out.value)
    out = r.py("import os\ndef main(p):\n    os.chmod(p, 0o666)\n", {"p": str(d / "owner-only.txt")})
    assert out.failure is not None and out.failure.reason == "exception"
    assert stat.S_IMODE(os.stat(d / "owner-only.txt").st_mode) == 0o600
    r.next_job_ok()
