"""Turning what the pool observed about a child into a SandboxOutcome."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from typing import Any

from memoplane.canonical import MAX_JSON_DEPTH, json_depth_exceeds
from memoplane.sandbox.collect import Refused
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


def decode_value(header: dict[str, Any], payload: bytes, read_file: Callable[[], bytes]) -> tuple[Any, str]:
    """The return value a child reported; `read_file` reads it from /out when
    it did not fit the channel. A JSON value nesting deeper than
    MAX_JSON_DEPTH is refused here, before any recursive code sees it."""
    kind = header.get("kind", "none")
    if header.get("value_file"):
        payload = read_file()
    if kind == "json":
        try:
            value = json.loads(payload)
            deep = json_depth_exceeds(value)
        except RecursionError:  # deeper than the decoder itself can go
            deep = True
        if deep:
            raise Refused(Failure("unserializable", f"the return value nests lists/objects more than "
                                  f"{MAX_JSON_DEPTH} levels deep — return flatter data"))
        return value, "json"
    if kind == "bytes":
        return payload, "bytes"
    if kind == "file":
        return None, "file"
    return None, "none"


def from_result(header: dict[str, Any], payload: bytes, read_file: Callable[[], bytes], limits: Limits,
                oom: bool, pids_hit: bool) -> tuple[bool, Any, str, Failure | None]:
    """(ok, value, kind, failure) from a child's result message."""
    if header.get("ok"):
        value, kind = decode_value(header, payload, read_file)
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
