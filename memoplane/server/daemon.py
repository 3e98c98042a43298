"""The server side of the local daemon (memoplane.commands.daemon says what it is and why a unix
socket): `memoplane serve` answers this user's `memoplane run` of its store from its warm pool."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from ..cas import open_store
from ..commands.daemon import PROTOCOL, private_dir_problem, socket_path
from ..embedded import run_job
from ..errors import InputError, JobFailed, MemoplaneError
from ..jobs import Job, Policy, job_from_dict
from ..keys import runtime_identity
from ..trust.local import Keyring
from .auth import Caller
from .calls import Call, CallLog

log = logging.getLogger(__name__)

LOCAL_KEY, LOCAL_PATH = "local-user", "unix:/v1/run"   # how the audit log names the daemon's runs
_MAX_LINE = 64 << 20   # a request carries the script's source and JSON inputs inline


class Refused(Exception):
    """The daemon cannot run this job as this process would (another runtime, weaker isolation)."""


@contextlib.asynccontextmanager
async def listening(store: str | None, pool: Callable[[str], Any], require_isolation: bool,
                    calls: CallLog | None = None) -> AsyncIterator[None]:
    """Serve this user's `memoplane run` on the store's socket while inside; `pool(profile)` is the
    server's warm pool; each run is recorded in `calls` as the local team's (path LOCAL_PATH).
    Another live serve of the same store keeps its socket (logged)."""
    with open_store(store) as opened:
        path = socket_path(opened)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    problem = private_dir_problem(path.parent)
    if problem:
        raise InputError(f"the local daemon's directory: {problem}",
                         "chmod 700 it (or set XDG_RUNTIME_DIR to a directory of yours), or remove it")
    if _answers(path):
        log.warning("another memoplane serve already serves `memoplane run` on %s: leaving it", path)
        yield
        return
    path.unlink(missing_ok=True)   # stale: its serve is gone
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        started = time.monotonic()
        try:
            line = await reader.readline()
            answer = await _answer(line, store, pool, require_isolation)
            reply = json.dumps(answer).encode() + b"\n"
            if calls is not None:
                await calls.record(_call(line, reply, answer, time.monotonic() - started))
            writer.write(reply)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass   # the CLI went away (interrupted): nothing to tell it
        finally:
            handlers.discard(task)
            writer.close()

    server = await asyncio.start_unix_server(handle, path=str(path), limit=_MAX_LINE)
    os.chmod(path, 0o600)
    inode = path.stat().st_ino
    try:
        yield
    finally:
        server.close()
        for task in list(handlers):
            task.cancel()
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_ino == inode:   # still ours, not a later serve's
                path.unlink()


def _call(line: bytes, reply: bytes, answer: dict[str, Any], seconds: float) -> Call:
    status = 200 if "report" in answer else 422 if "failed" in answer else 409 if "refused" in answer else 500
    return Call(key=LOCAL_KEY, team=Caller().team, verb="run", method="POST", path=LOCAL_PATH, sandbox="",
                status=status, request_bytes=len(line), response_bytes=len(reply),
                body_sha256=hashlib.sha256(line).hexdigest(), seconds=round(seconds, 6))


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


async def _answer(line: bytes, store: str | None, pool: Callable[[str], Any],
                  require_isolation: bool) -> dict[str, Any]:
    try:
        request = json.loads(line)
        if request.get("v") != PROTOCOL:
            raise Refused(f"protocol v{request.get('v')!r}; this serve speaks v{PROTOCOL}")
        job = job_from_dict(request["job"])
        if job.runtime != runtime_identity(job.profile).digest:
            raise Refused("the CLI's Python runtime differs from the daemon's")
        if request["require_isolation"] and not require_isolation:
            raise Refused("the daemon runs without requiring isolation and this run requires it")
        return await asyncio.to_thread(_run, job, request["identity"], request["policy"], store, pool)
    except Refused as refused:
        return {"refused": str(refused)}
    except (ValueError, KeyError, TypeError) as bad:
        return {"refused": f"a malformed request ({bad})"}


def _run(job: Job, identity: str, policy: Policy, store: str | None, pool: Callable[[str], Any]) -> dict[str, Any]:
    keyring = Keyring()
    with open_store(store) as opened:
        try:
            report = run_job(job, opened, lambda: pool(job.profile), policy=policy, identity=identity,
                             trust=keyring.policy(), signer=keyring.signer())
        except JobFailed as failed:
            failure = getattr(failed, "failure", None)
            return {"failed": {"message": str(failed), "detail": getattr(failed, "detail", ""),
                               "reason": getattr(failure, "reason", None),
                               "failure_message": getattr(failure, "message", "")}}
        except MemoplaneError as error:
            return {"error": {"kind": type(error).__name__, "cause": error.cause, "fix": error.fix,
                              "exit_code": error.exit_code}}
    return {"report": {"cache_key": report.cache_key, "cached": report.cached, "result_digest": report.result_digest,
                       "compute_seconds_saved": report.compute_seconds_saved, "explain": report.explain,
                       "notes": report.notes, "run_id": report.run_id}}
