"""Warm sessions (sessions.py): started ahead, owned by no one, handed out by a create with the
create's envVars, timeout and team; replaced when too old; ended with the server. Real sandboxes
(a SandboxPool with its isolation) driven through SessionManager, as the API's routes drive it."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable

import pytest

from memoplane.errors import InputError
from memoplane.server import sessions as sessions_module
from memoplane.server.auth import Caller
from memoplane.server.sessions import Session, SessionManager
from memoplane.settings import ServeSettings

_DEADLINE = 60.0
ALPHA, BETA = Caller(team="alpha", key_id="ka"), Caller(team="beta", key_id="kb")


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + _DEADLINE
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


def warm_of(manager: SessionManager, profile: str = "python") -> list[Session]:
    return [s for s in manager._warm.get(profile, []) if not s.ended.is_set()]


async def output(session: Session, command: str) -> str:
    out = b""
    async for reply in session.request("exec", cmd="/bin/bash", args=["-l", "-c", command], envs={}, cwd=None,
                                       stdin=False):
        if "stdout" in reply:
            out += base64.b64decode(reply["stdout"])
    return out.decode()


def managed(test: Callable[[SessionManager], Awaitable[None]], warm_sessions: int = 1) -> None:
    async def run() -> None:
        manager = SessionManager(ServeSettings(warm=1, warm_sessions=warm_sessions))
        manager.start()
        try:
            await test(manager)
        finally:
            await manager.close()
    asyncio.run(run())


def test_a_create_hands_out_a_warm_session_with_its_env_timeout_and_team() -> None:
    async def test(manager: SessionManager) -> None:
        first = await manager.create(ALPHA, "base", 60, {}, {})   # starts the pool: no warm one before
        await until(lambda: len(warm_of(manager)) == 1, "no warm session was started after the first create")
        warm = warm_of(manager)[0]
        assert manager.list(ALPHA) == [first] and manager.list(BETA) == []   # owned by no one yet
        with pytest.raises(Exception, match="not found"):
            manager.get(ALPHA, warm.id)
        handed = await manager.create(BETA, "code-interpreter-v1", 30, {"GREETING": "hi there"}, {"k": "v"})
        assert handed is warm
        assert (handed.owner, handed.creator, handed.template, handed.metadata) == \
            ("beta", "kb", "code-interpreter-v1", {"k": "v"})
        assert 29 <= handed.end_at - time.time() <= 30
        assert manager.list(BETA) == [handed] and manager.get(BETA, handed.id) is handed
        assert await output(handed, "echo $GREETING; echo $HOME") == "hi there\n/tmp\n"
        cell = await handed.call("code", code="import os\nos.environ['GREETING']")
        assert cell["result"] == "'hi there'"
        assert await output(first, "echo ${GREETING:-unset}") == "unset\n"   # the env was that sandbox's only
    managed(test)


def test_a_handed_out_warm_session_is_reaped_at_its_timeout() -> None:
    async def test(manager: SessionManager) -> None:
        await manager.create(ALPHA, "base", 60, {}, {})
        await until(lambda: len(warm_of(manager)) == 1, "no warm session was started")
        warm = warm_of(manager)[0]
        handed = await manager.create(ALPHA, "base", 1, {}, {})
        assert handed is warm
        await until(handed.ended.is_set, "a warm sandbox past its timeout was not reaped")
        assert handed.id not in manager.sessions
    managed(test)


def test_a_warm_session_too_old_is_replaced_never_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    async def test(manager: SessionManager) -> None:
        await manager.create(ALPHA, "base", 60, {}, {})
        await until(lambda: len(warm_of(manager)) == 1, "no warm session was started")
        old = warm_of(manager)[0]
        old.launched_at -= sessions_module._WARM_MAX_AGE
        handed = await manager.create(ALPHA, "base", 60, {}, {})
        assert handed is not old
        await until(old.ended.is_set, "a warm session past its age was not killed")
        await until(lambda: len(warm_of(manager)) == 1, "the old warm session was not replaced")
    managed(test)


def test_closing_ends_the_warm_sessions_and_none_is_kept_with_zero() -> None:
    kept: list[Session] = []

    async def test(manager: SessionManager) -> None:
        await manager.create(ALPHA, "base", 60, {}, {})
        await until(lambda: len(warm_of(manager)) == 2, "two warm sessions were not started")
        kept.extend(warm_of(manager))
    managed(test, warm_sessions=2)
    assert kept and all(s.ended.is_set() for s in kept)

    async def none(manager: SessionManager) -> None:
        first = await manager.create(ALPHA, "base", 60, {}, {})
        manager._keep_warm("python")
        assert warm_of(manager) == [] and manager._warming["python"] == 0
        second = await manager.create(ALPHA, "base", 60, {}, {})
        assert second.launched_at > first.launched_at   # started by its create
    managed(none, warm_sessions=0)


def test_a_negative_count_of_warm_sessions_is_refused_naming_the_setting() -> None:
    with pytest.raises(InputError, match=r"MEMOPLANE_SERVE_WARM_SESSIONS \(--warm-sessions\) is -1"):
        ServeSettings(warm_sessions=-1)
