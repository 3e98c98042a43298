"""Processes of the local cluster tracked by pid files: a record holds the pid, the binary and
the kernel's start time of the process, so stopping one never signals an unrelated process that
happens to reuse the pid. Shared by the control plane (cluster), the node (node) and the
memoplane processes (processes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

_STOP_TIMEOUT_S = 10.0


class ClusterError(RuntimeError):
    """The control plane cannot be brought up; the message names the failing component."""




def start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/pid/stat), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces; fields after it follow the last ')'.
    return stat.rsplit(")", 1)[1].split()[19]


def is_ours(record: dict[str, object]) -> bool:
    """True if the pid in `record` is still the process we started (not a reused pid)."""
    pid = int(record["pid"])  # type: ignore[call-overload]
    if start_time(pid) != record["start_time"]:
        return False
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # A zombie has an empty cmdline; it is ours but already dead.
    return argv0 == record["binary"]


def pid_file(directory: Path, name: str) -> Path:
    return directory / "pids" / f"{name}.json"


def read_record(directory: Path, name: str) -> dict[str, object] | None:
    try:
        data: dict[str, object] = json.loads(pid_file(directory, name).read_text())
        return data
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def spawn(directory: Path, name: str, argv: list[str], env: dict[str, str] | None = None
           ) -> subprocess.Popen[bytes]:
    log = directory / "logs" / f"{name}.log"
    with log.open("ab") as out:
        # A new session: the servers outlive `hack/cluster up` and ignore the shell's ^C.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})}, cwd=directory)
    record = {"pid": proc.pid, "binary": argv[0], "start_time": start_time(proc.pid)}
    pid_file(directory, name).write_text(json.dumps(record))
    return proc


def stop(directory: Path, name: str) -> None:
    """SIGTERM, then SIGKILL, exactly the process recorded in `name`'s pid file."""
    record = read_record(directory, name)
    if record is None:
        return
    pid = int(record["pid"])  # type: ignore[call-overload]
    for sig, patience in ((signal.SIGTERM, _STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
        if not is_ours(record):
            break
        os.kill(pid, sig)
        # Wait for the exit, so that its ports are free when `down` or `up` go on.
        deadline = time.monotonic() + patience
        while is_ours(record) and time.monotonic() < deadline:
            reap(pid)
            time.sleep(0.05)
    if is_ours(record):
        raise ClusterError(f"{name} (pid {pid}) did not exit after SIGKILL")
    _wait_exited(pid, record)
    pid_file(directory, name).unlink(missing_ok=True)


def _wait_exited(pid: int, record: dict[str, object], patience: float = 10.0) -> None:
    """Wait until the process is a zombie or gone. Its cmdline empties when the kernel
    frees its memory, which is before it closes its files: a listening port may still
    be held for a moment after `_is_ours` turns False."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        reap(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return
        fields = stat.rsplit(")", 1)[1].split()
        if fields[19] != record["start_time"] or fields[0] in ("Z", "X"):
            return
        time.sleep(0.02)


def reap(pid: int) -> None:
    """Collect the exit status if the process is our child (pytest's fixture case)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass



def log_tail(directory: Path, name: str, lines: int = 30) -> str:
    try:
        text = (directory / "logs" / f"{name}.log").read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "".join(text.splitlines(keepends=True)[-lines:])
