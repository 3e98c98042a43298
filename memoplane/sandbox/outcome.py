"""Turning what the pool observed about a child into a SandboxOutcome."""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path
from typing import Any

from memoplane.sandbox.runner import RETURN_FILE
from memoplane.sandbox.types import Failure, Limits, SandboxOutcome

_SIGNAL_FAILURES: dict[int, tuple[str, str]] = {
    signal.SIGSYS: ("forbidden", ("the job made a forbidden system call (mount, ptrace, bpf, "
                                  "keyctl, module loading, ...) and was killed by the sandbox's "
                                  "seccomp filter — sandboxed jobs cannot use these calls")),
    signal.SIGXCPU: ("timeout", ("the job used up its CPU time (limits.cpu_seconds) — "
                                 "raise the limit or make the job faster")),
    signal.SIGXFSZ: ("output-too-large", ("the job wrote a file over the size cap — "
                                          "write less or raise limits.max_output_bytes")),
}


def tail(data: bytes, n: int = 4000) -> str:
    return data[-n:].decode("utf-8", "replace")


def failure_for_status(status: int | None, sig: int | None, oom: bool, pids_hit: bool,
                       limits: Limits) -> Failure:
    """A child that ended without a result: explain how it ended."""
    if oom:
        return Failure("memory", f"the job exceeded its memory limit ({limits.memory_bytes} "
                       "bytes) and was killed — raise limits.memory_bytes or use less memory")
    if sig is None and status is not None and os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
    if sig is not None:
        reason, msg = _SIGNAL_FAILURES.get(sig, ("signal", ""))
        if not msg:
            msg = f"the job was killed by signal {signal.Signals(sig).name} — see stderr"
        return Failure(reason, msg)  # type: ignore[arg-type]
    code = os.WEXITSTATUS(status) if status is not None and os.WIFEXITED(status) else None
    hint = f" (it hit its process limit max_pids={limits.max_pids})" if pids_hit else ""
    return Failure("exit", f"the job's process exited with status {code} before returning a "
                   f"result{hint} — see stderr")


def check_out_dir(out_dir: Path, limits: Limits, returned: int) -> Failure | None:
    """The caller trusts out_dir next, so nothing in it may point elsewhere."""
    total = returned
    for dirpath, dirnames, filenames in os.walk(out_dir):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                rel = os.path.relpath(p, out_dir)
                return Failure("forbidden", f"the job left {rel!r} in $MEMOPLANE_OUT, which is "
                               "not a regular file or directory — write plain files only")
            if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                # Through the idmapped /out the file is the agent's on disk: a
                # set-id bit would make it a setuid-root program on the host.
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)  # the file we looked at, not a link
                try:
                    os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) & 0o1777)
                finally:
                    os.close(fd)
                rel = os.path.relpath(p, out_dir)
                return Failure("forbidden", f"the job set a set-user/group-id bit on {rel!r} in "
                               "$MEMOPLANE_OUT (removed) — write plain files only")
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    if total > limits.max_output_bytes:
        return Failure("output-too-large", f"the job's outputs total {total} bytes, over "
                       f"max_output_bytes={limits.max_output_bytes} — write less or raise the limit")
    return None


def decode_value(header: dict[str, Any], payload: bytes, out_dir: Path) -> tuple[Any, str]:
    kind = header.get("kind", "none")
    if header.get("value_file"):
        fd = os.open(out_dir / RETURN_FILE, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            payload = f.read()
        os.unlink(out_dir / RETURN_FILE)
    if kind == "json":
        return json.loads(payload), "json"
    if kind == "bytes":
        return payload, "bytes"
    if kind == "file":
        return None, "file"
    return None, "none"


def from_result(header: dict[str, Any], payload: bytes, out_dir: Path, limits: Limits,
                oom: bool, pids_hit: bool) -> tuple[bool, Any, str, Failure | None]:
    """(ok, value, kind, failure) from a child's result message."""
    if header.get("ok"):
        value, kind = decode_value(header, payload, out_dir)
        return True, value, kind, None
    if "signal" in header:
        return False, None, "none", failure_for_status(None, int(header["signal"]), oom,
                                                       pids_hit, limits)
    f = header.get("failure") or {}
    reason = str(f.get("reason", "sandbox"))
    message = " ".join(str(f.get("message", "")).split())[:500]
    if pids_hit and reason in ("exception", "exit"):
        message += f" (the job hit its process limit max_pids={limits.max_pids})"
    return False, None, "none", Failure(reason, message, str(f.get("detail", "")))  # type: ignore[arg-type]


def outcome(ok: bool, value: Any, kind: str, failure: Failure | None, exit_code: int | None,
            out: bytes, err: bytes, duration: float, isolation: dict[str, bool]) -> SandboxOutcome:
    if failure is not None and not failure.detail and err:
        failure = Failure(failure.reason, failure.message, tail(err))
    return SandboxOutcome(ok=ok, value=value, value_kind=kind,  # type: ignore[arg-type]
                          exit_code=exit_code, stdout=out, stderr=err, failure=failure,
                          duration_s=duration, isolation=isolation)
