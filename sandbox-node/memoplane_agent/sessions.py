"""The agent's session endpoint: sandboxes the agent API (memoplane serve on Kubernetes) starts in
this node's warm pool, one per connection (memoplane.server.placement has the handshake).

The sessions are memoplane.server.sessions' own (the same warm pool, isolation, limits and
session agent as an embedded serve), run on this process's own event loop, in a thread. Once
started, a sandbox's lines are piped to the API's connection unchanged: the API reads and bounds
them as untrusted, this side only copies bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
from dataclasses import dataclass
from typing import Any

from memoplane.server.auth import Caller
from memoplane.server.errors import ApiError
from memoplane.server.placement import HANDSHAKE_LINE, HANDSHAKE_TIMEOUT, Refused, challenge, send
from memoplane.server.sessions import Session, SessionManager
from memoplane.settings import ServeSettings

log = logging.getLogger("memoplane.agent.sessions")

_COPY = 1 << 16
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass
class PipedSession(Session):
    """A session whose child's lines go to the API's connection, and the API's to the child."""

    upstream: asyncio.Future[Streams] | None = None

    def streams(self) -> asyncio.Future[Streams]:
        """The API's connection, once the sandbox started (the child may dial back before)."""
        if self.upstream is None:
            self.upstream = asyncio.get_running_loop().create_future()
        return self.upstream

    async def serve_agent(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._writer is not None:   # one agent per session
            writer.close()
            return
        self._writer = writer
        if self.connected is not None and not self.connected.done():
            self.connected.set_result(None)
        streams, ended = self.streams(), asyncio.ensure_future(self.ended.wait())
        try:   # the API's connection, unless the sandbox ended first (its `created` was not sent)
            waiting: list[asyncio.Future[Any]] = [streams, ended]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if streams.done():
                await _pipe(reader, writer, *streams.result())
        finally:
            ended.cancel()
            self.stop()   # either side gone: the sandbox ends


async def _pipe(child_reader: asyncio.StreamReader, child_writer: asyncio.StreamWriter,
                api_reader: asyncio.StreamReader, api_writer: asyncio.StreamWriter) -> None:
    """Copy both ways until either side closes, then close both."""
    tasks = [asyncio.ensure_future(_copy(child_reader, api_writer)),
             asyncio.ensure_future(_copy(api_reader, child_writer))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for writer in (child_writer, api_writer):
            writer.close()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(_COPY):
            writer.write(data)
            await writer.drain()


class PipedSessions(SessionManager):
    def __init__(self, settings: ServeSettings) -> None:
        # No sessions started ahead here (the pool stays warm): a handed-out one would take its env
        # through its agent's lines, which are piped to the API's connection from the start.
        super().__init__(dataclasses.replace(settings, warm_sessions=0))

    def session_type(self) -> type[Session]:
        return PipedSession


class SessionEndpoint:
    """The endpoint and its sessions, on an event loop of their own (a thread)."""

    def __init__(self, host: str, port: int, secret: bytes, settings: ServeSettings, profiles: list[str]) -> None:
        self.host, self.port, self.secret, self.profiles = host, port, secret, profiles
        self.manager = PipedSessions(settings)
        self.loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._warming: asyncio.Task[None] | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memoplane-sessions", daemon=True)

    def start(self) -> int:
        """Listen; the port listened on (the configured one, or a free one for 0)."""
        self._thread.start()
        self._started.wait()
        if self._server is None:
            raise OSError(f"the session endpoint could not listen on {self.host}:{self.port}")
        return int(self._server.sockets[0].getsockname()[1])

    def live(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """End every sandbox of the endpoint, then its loop."""
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(timeout=60)
            self._thread.join(timeout=10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._listen())
        except OSError as e:
            log.error("session endpoint: %s", e)
        finally:
            self._started.set()
        if self._server is not None:
            self.loop.run_forever()

    async def _listen(self) -> None:
        self.manager.start()
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=HANDSHAKE_LINE)
        if self.manager.settings.warm > 0:
            self._warming = self.loop.create_task(self._warm())

    async def _warm(self) -> None:
        """Each profile's pool, started now: the first sandbox on this node does not wait for it."""
        for profile in self.profiles:
            try:
                await asyncio.to_thread(self.manager.pool, profile)
            except Exception as e:  # noqa: BLE001 - a create says why again, to its caller
                log.error("session pool of profile %s did not start: %s", profile, e)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self.manager.close()
        self.loop.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                request = await challenge(reader, writer, self.secret)
            session = await self._start(request)
        except (Refused, TimeoutError, OSError) as e:
            log.warning("session endpoint: refused %s: %s", peer, e)
            writer.close()
            return
        except Exception as e:  # noqa: BLE001 - the API hears why (a pool that cannot start, a bad request)
            error = e if isinstance(e, ApiError) else ApiError(500, f"the sandbox could not start: {e}")
            log.info("session endpoint: sandbox not started for %s: %s", peer, error.message)
            with contextlib.suppress(OSError):
                await send(writer, {"error": {"status": error.status, "message": error.message}})
            writer.close()
            return
        log.info("sandbox %s (the API's %s, team %s) started for %s", session.id, request.get("id"),
                 session.owner, peer)
        assert isinstance(session, PipedSession)
        try:
            await send(writer, {"created": {"id": session.id}})
        except OSError:
            session.stop()
            return
        session.streams().set_result((reader, writer))
        await session.ended.wait()

    async def _start(self, request: dict[str, Any]) -> Session:
        try:
            team, profile, seconds = str(request["team"]), str(request["profile"]), int(request["seconds"])
            env = {str(k): str(v) for k, v in dict(request.get("env") or {}).items()}
        except (KeyError, TypeError, ValueError) as e:
            raise ApiError(400, f"a malformed sandbox request ({e})") from None
        seconds = min(seconds, self.manager.settings.max_timeout)   # the API's reaper ends it sooner
        return await self.manager.create(Caller(team=team, key_id="memoplane-api"), profile, seconds, env, {})
