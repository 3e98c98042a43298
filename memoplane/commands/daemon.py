"""The local daemon (its CLI side; the server side is memoplane.server.daemon): `memoplane run`
hands its job to a running `memoplane serve` of the same store, so concurrent CLI processes share
the server's warm pool (no cold sandbox per process) and its single flight, and answer exactly as
in-process runs do.

Discovery: serve listens on a unix socket named after its store and keyring (so a CLI reaches only
a daemon that reads and signs as it would) in `settings.daemon_dir()`, and removes it on exit; a
socket nobody answers on (a crashed serve) is stale: the CLI runs in-process, the next serve
replaces it.

Who may use it: only the same user. The socket's directory is made 0700 and both sides refuse it
unless it is owned by this user and closed to others; the kernel then checks every connect. A unix
socket rather than a key on a TCP port: nothing to store, leak or pass to a child process, and no
other user of the machine can even reach it (root can, as it can read the store).

Protocol: one JSON line each way per connection. The CLI builds the job (file inputs are already
in the store), the server runs it with `embedded.run_job` in its pool and answers the report's
fields; the CLI loads the result from the store and prints it with its own code.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any

from ..cas import Store
from ..errors import InputError, JobFailed, MemoplaneError
from ..jobs import Job, Policy, job_to_dict
from ..run_report import RunReport
from ..sandbox.types import Failure
from ..settings import DAEMON_ENV, DAEMON_MODES, daemon_dir, keys_dir

PROTOCOL = 1


# -- where ----------------------------------------------------------------------------------------

def socket_path(store: Store) -> Path:
    """The socket of the daemon serving `store` with this user's keyring."""
    identity = f"{store.describe()}\n{keys_dir().resolve()}"
    return daemon_dir() / f"serve-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.sock"


def private_dir_problem(directory: Path) -> str | None:
    """Why `directory` may not hold the daemon's socket (None: it may)."""
    try:
        info = directory.lstat()
    except FileNotFoundError:
        return f"{directory} does not exist"
    if not stat.S_ISDIR(info.st_mode):
        return f"{directory} is not a directory"
    if info.st_uid != os.getuid():
        return f"{directory} is owned by uid {info.st_uid}, not this user ({os.getuid()})"
    if info.st_mode & 0o077:
        return f"{directory} is open to other users (mode {stat.S_IMODE(info.st_mode):o}, needs 700)"
    return None


# -- the CLI side -------------------------------------------------------------------------------

class DaemonError(MemoplaneError):
    """What the daemon's run raised (store damage, a bad input), with the exit code it has in-process."""

    def __init__(self, cause: str, fix: str, exit_code: int) -> None:
        super().__init__(cause, fix)
        self.exit_code = exit_code


def daemon_mode(flag: str | None) -> str:
    mode = flag or os.environ.get(DAEMON_ENV) or "auto"
    if mode not in DAEMON_MODES:
        raise InputError(f"{DAEMON_ENV}={mode!r} is not one of {', '.join(DAEMON_MODES)}",
                         f"set {DAEMON_ENV} to auto, always or never (or unset it)")
    return mode


def run_via_daemon(job: Job, store: Store, *, identity: str, policy: Policy, require_isolation: bool,
                   required: bool) -> RunReport | None:
    """The report of `job` run by this store's daemon; None when there is none to ask (or it cannot
    run this job as this process would) and not `required`."""
    started = time.perf_counter()
    path = socket_path(store)
    request = {"v": PROTOCOL, "job": job_to_dict(job), "identity": identity, "policy": policy,
               "require_isolation": require_isolation}
    try:
        answer = _ask(path, request)
    except _Unavailable as why:
        if required:
            raise InputError(f"no memoplane serve answers for this store ({why})",
                             "start `memoplane serve` with the same --store, or use --daemon auto") from None
        return None
    if "refused" in answer:
        if required:
            raise InputError(f"the daemon at {path} refused the run: {answer['refused']}",
                             "restart `memoplane serve` with this memoplane, or use --daemon never")
        return None
    return _report(answer, store, started)


class _Unavailable(Exception):
    pass


def _ask(path: Path, request: dict[str, Any]) -> dict[str, Any]:
    problem = private_dir_problem(path.parent)
    if problem:
        raise _Unavailable(problem)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        try:
            conn.connect(str(path))
            conn.sendall(json.dumps(request).encode() + b"\n")
            with conn.makefile("rb") as replies:
                line = replies.readline()
        except OSError as e:
            raise _Unavailable(f"{path}: {e.strerror or e}") from None
    if not line.endswith(b"\n"):
        raise _Unavailable(f"{path}: the daemon closed the connection without an answer")
    answer = json.loads(line)
    assert isinstance(answer, dict)
    return answer


def _report(answer: dict[str, Any], store: Store, started: float) -> RunReport:
    if "failed" in answer:
        failed = answer["failed"]
        error = JobFailed(failed["message"])
        error.detail = failed["detail"]  # type: ignore[attr-defined]
        if failed["reason"] is not None:
            error.failure = Failure(failed["reason"], failed["failure_message"], failed["detail"])  # type: ignore[attr-defined]
        raise error
    if "error" in answer:
        raised = answer["error"]
        raise DaemonError(raised["cause"], raised["fix"], int(raised["exit_code"]))
    fields = answer["report"]
    result = store.get_result(fields["result_digest"])   # verified, as every read
    return RunReport(cache_key=fields["cache_key"], cached=fields["cached"], result_digest=fields["result_digest"],
                     result=result, value=store.load_value(result.value),
                     duration_ms=(time.perf_counter() - started) * 1000.0,
                     compute_seconds_saved=fields["compute_seconds_saved"], explain=fields["explain"],
                     notes=fields["notes"], run_id=fields["run_id"])
