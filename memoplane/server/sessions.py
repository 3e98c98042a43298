"""Sessions: memoplane fork sandboxes that stay alive between API calls.

A session is one job of a SandboxPool whose task is the session agent (session_agent.py):
the child enters its isolation like any job, dials back over a unix socket placed in its
read-only /in, and serves commands, files and code cells until it is killed, its timeout
passes (the reaper), or its hard limit (ServeSettings.max_timeout) does (the pool).

Once a profile was used, ServeSettings.warm_sessions of its sessions are kept started, their
agent dialled back and owned by no one: a create hands one out (its envVars sent to the agent),
so it pays neither the child's setup nor the agent's start. A create from a snapshot starts its own.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cas import SnapshotEntry, check_digest
from ..errors import InputError, NotFound, StoreCorrupted
from ..sandbox import PROFILES, PythonTask, SandboxOutcome, SandboxPool, SandboxRequest
from ..sandbox.collect import Refused, collect
from ..sandbox.removal import remove_tree
from ..sandbox.types import Limits
from ..settings import ServeSettings
from . import session_agent
from .auth import Caller
from .errors import ApiError
from .objects import SandboxObjects
from .placement import Placed, Placement, Unreachable, open_remote
from .stores import open_team_store

log = logging.getLogger("memoplane.server")

# E2B's default templates, served by memoplane's runtime profiles of the same purpose.
TEMPLATE_ALIASES = {"base": "python", "code-interpreter-v1": "python"}
# A snapshot's ID used as a template (E2B's Sandbox.create(snapshot_id)) starts this profile from it.
_SNAPSHOT_PROFILE = "python"
_CONNECT_TIMEOUT = 30.0   # seconds a new child has to dial back before its creation fails
_REAP_EVERY = 1.0         # seconds between two looks for sandboxes past their timeout
# A warm session older than this is replaced, never handed out: its child's own time limit is
# max_timeout plus this, so a session handed out before then still has the whole max_timeout.
_WARM_MAX_AGE = 600.0
_WARM_REFILL_DELAY = 0.2  # seconds after a create before its profile's warm sessions are topped up
_WARM_RETRY = 30.0        # seconds before a profile whose warm session failed to start is warmed again
# A file travels through a session's channel in one message, base64-encoded: bounded, so that a
# line from the agent (untrusted: it runs in the sandbox) is bounded too.
MAX_FILE_BYTES = 64 << 20
_MAX_LINE = MAX_FILE_BYTES * 4 // 3 + (1 << 20)
# Replies a request may have waiting: a command whose output no one reads (a background command
# never waited for) would otherwise grow the server's memory without bound. Past it the request
# is dropped (it ends with an error) and the rest of its output is discarded.
_QUEUED_REPLIES = 256
_AGENT_SOURCE = Path(session_agent.__file__).read_text(encoding="utf-8")
# Preloaded by the sessions' zygotes: a child then runs this import (a lookup in sys.modules)
# instead of compiling the agent's source (~3 ms per sandbox).
_AGENT_MODULE = session_agent.__name__
_AGENT_IMPORT = f"from {_AGENT_MODULE} import main\n"
_RESTORED = "snapshot"   # where a sandbox's snapshot is restored under its /in, for its agent to copy to $HOME


class SandboxGone(ApiError):
    def __init__(self, sandbox_id: str) -> None:
        super().__init__(404, f"sandbox {sandbox_id} not found (killed, past its timeout, or never created)",
                         "create a new sandbox")


@dataclass(eq=False)   # one session is equal to itself only
class Session:
    id: str
    template: str
    profile: str
    owner: str
    metadata: dict[str, str]
    started_at: float                      # wall clock, for the API
    end_at: float                          # wall clock: when the reaper kills it
    hard_end_at: float                     # wall clock: the pool's own limit for the child
    directory: Path
    creator: str = ""                      # the API key that created it (rate tiers count per key)
    _stop_w: int = -1
    _stop_r: int = -1
    _writer: asyncio.StreamWriter | None = None
    _pending: dict[int, asyncio.Queue[dict[str, Any]]] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    connected: asyncio.Future[None] | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: SandboxOutcome | None = None
    launched_at: float = 0.0               # monotonic: a warm session's age
    out_fd: int = -1                       # the child's $MEMOPLANE_OUT, where its agent copies a snapshot
    snapshotting: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def request(self, op: str, **fields: Any) -> AsyncIterator[dict[str, Any]]:
        """The agent's replies to one request, the last one (done) included; raises ApiError
        for an error reply."""
        if self._writer is None or self.ended.is_set():
            raise SandboxGone(self.id)
        rid = next(self._ids)
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=_QUEUED_REPLIES + 1)  # +1: room for the error
        self._pending[rid] = queue
        try:
            self._writer.write((json.dumps({"id": rid, "op": op, **fields}) + "\n").encode())
            await self._writer.drain()
            while True:
                reply = await queue.get()
                if "error" in reply:
                    raise agent_error(reply["error"])
                yield reply
                if reply.get("done"):
                    return
        finally:
            self._pending.pop(rid, None)

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """One request whose only reply is its last."""
        last: dict[str, Any] = {}
        async for reply in self.request(op, **fields):
            last = reply
        return last

    async def serve_agent(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The agent dialled back: route its replies until it goes away."""
        if self._writer is not None:  # one agent per session: anything else is refused
            writer.close()
            return
        self._writer = writer
        if self.connected is not None and not self.connected.done():
            self.connected.set_result(None)
        try:
            while line := await reader.readline():
                reply = json.loads(line)
                rid = reply.get("id") if isinstance(reply, dict) else None
                if isinstance(rid, int) and rid in self._pending:
                    self._deliver(rid, self._pending[rid], reply)
        except ValueError as e:  # not JSON, or a line past _MAX_LINE: the agent is broken or hostile
            log.warning("sandbox %s: its agent sent a bad message (%s): killed", self.id, e)
        finally:
            self.gone()
            self.stop()  # without its agent a sandbox can do nothing more: end it

    def _deliver(self, rid: int, queue: asyncio.Queue[dict[str, Any]], reply: dict[str, Any]) -> None:
        if queue.qsize() < _QUEUED_REPLIES:
            queue.put_nowait(reply)
            return
        del self._pending[rid]   # what the agent sends for it from now on is dropped
        queue.put_nowait({"error": {"kind": "too_large", "message": f"more than {_QUEUED_REPLIES} replies were "
                                    "waiting to be read: the rest of this output was discarded — read a "
                                    "command's output as it runs, or write it to a file"}})

    def gone(self) -> None:
        """The agent or the child ended: every waiting request learns it."""
        for queue in self._pending.values():
            if queue.full():
                queue.get_nowait()  # make room: that it ended matters more than one more chunk
            queue.put_nowait({"error": {"kind": "gone", "message": f"sandbox {self.id} ended"}})

    def stop(self) -> None:
        """Kill the child (and all in it) now; the pool reports it as stopped."""
        if self._stop_w >= 0 and not self.ended.is_set():  # once ended, the fd is closed (and its number reused)
            with contextlib.suppress(OSError):
                os.write(self._stop_w, b"x")

    def launched(self) -> bool:
        return self._stop_w >= 0


@dataclass
class RemoteSession(Session):
    """A session whose child lives in a node agent's warm pool (placement.py): its agent's lines come
    over the agent's connection; closing it ends the sandbox there."""

    node: str = ""
    connection: asyncio.StreamWriter | None = None   # to its agent: closing it ends the sandbox there

    def stop(self) -> None:
        if self.connection is not None and not self.ended.is_set():
            self.connection.close()

    def launched(self) -> bool:
        return True   # the manager lists it only once its agent started it


def agent_error(error: Any) -> ApiError:
    """An error the agent reported. The agent runs in the sandbox: its replies are untrusted data."""
    status = {"not_found": 404, "exists": 409, "permission": 403, "invalid": 400, "too_large": 413, "gone": 502}
    if not isinstance(error, dict):
        return ApiError(502, "the sandbox sent a malformed error")
    return ApiError(status.get(str(error.get("kind")), 500), str(error.get("message", "the sandbox failed"))[:2000])


def decode(reply: dict[str, Any], name: str) -> bytes:
    try:
        return base64.b64decode(reply[name], validate=True)
    except (KeyError, TypeError, ValueError):
        raise ApiError(502, f"the sandbox sent a malformed reply (no base64 {name!r})") from None


class SessionManager:
    """Every live session, the warm pool per runtime profile, and the reaper."""

    def __init__(self, settings: ServeSettings, store: str | None = None, placement: Placement | None = None,
                 objects: SandboxObjects | None = None) -> None:
        self.settings = settings
        self.store = store   # where snapshots go: the caller's team's namespace of it (stores.py)
        self.placement = placement   # on Kubernetes: sandboxes go to the node agents, else to our pools
        self.objects = objects       # on Kubernetes: each remote sandbox shown as a Sandbox object
        self.sessions: dict[str, Session] = {}
        self._pools: dict[str, SandboxPool] = {}
        self._pool_lock = threading.Lock()
        self._reaper: asyncio.Task[None] | None = None
        self._warm: dict[str, list[Session]] = {}          # per profile: started, owned by no one
        self._warming: Counter[str] = Counter()           # per profile: warm sessions being started
        self._warm_failed_at: dict[str, float] = {}       # per profile: monotonic
        self._warm_tasks: set[asyncio.Task[None]] = set()
        self._remote: set[asyncio.Task[None]] = set()   # remote sessions' connections served, object writes
        self._stopping = threading.Event()

    def session_type(self) -> type[Session]:
        """What a local session is (the node agents' endpoint pipes theirs to the API)."""
        return Session

    def new_session(self, profile: str) -> Session:
        """A local session not yet handed out: create() says whose it is and for how long."""
        return self.session_type()(id=new_sandbox_id(), template="", profile=profile, owner="", metadata={},
                                   started_at=0.0, end_at=0.0, hard_end_at=0.0,
                                   directory=Path(tempfile.mkdtemp(prefix="memoplane-session-")))

    # -- pools ------------------------------------------------------------------------

    def pool(self, profile: str) -> SandboxPool:
        """The warm pool of a runtime profile, started on first use (blocking: call in a thread)."""
        if self.placement is not None:   # sandboxes go to agents (_create_remote), /v1/run to ComputeJobs
            raise ApiError(500, "the API on Kubernetes has no sandbox pools of its own")
        with self._pool_lock:
            if profile not in self._pools:
                self._pools[profile] = SandboxPool(profile=profile, size=self.settings.warm,
                                                   preload=(*PROFILES[profile].preload, _AGENT_MODULE),
                                                   require_isolation=self.settings.require_isolation)
            return self._pools[profile]

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._reaper = loop.create_task(self._reap_loop())
        if self.objects is not None:
            threading.Thread(target=self.objects.watch_deleted,
                             args=(self._object_deleted(loop), self.sessions.__contains__, self._stopping),
                             name="memoplane-sandbox-objects", daemon=True).start()

    def _object_deleted(self, loop: asyncio.AbstractEventLoop) -> Callable[[str], None]:
        """A Sandbox object deleted (by an operator; ours go once the sandbox ended): its sandbox ends."""
        def deleted(name: str) -> None:
            def kill() -> None:
                session = self.sessions.get(name)
                if session is not None and not session.ended.is_set():
                    log.info("sandbox %s: its Sandbox object was deleted: killed", name)
                    self._background(self.kill(session))
            loop.call_soon_threadsafe(kill)
        return deleted

    async def close(self) -> None:
        self._stopping.set()
        if self._reaper is not None:
            self._reaper.cancel()
        await asyncio.gather(*self._warm_tasks, return_exceptions=True)
        warm = [s for sessions in self._warm.values() for s in sessions]
        await asyncio.gather(*(self.kill(s) for s in [*self.sessions.values(), *warm]), return_exceptions=True)
        for pool in self._pools.values():
            await asyncio.to_thread(pool.close)

    async def create(self, caller: Caller, template: str, timeout: int | None, env: dict[str, str],
                     metadata: dict[str, str], snapshot: str | None = None) -> Session:
        """A new sandbox; with `snapshot` (a digest SessionManager.snapshot answered the caller's
        team) its $HOME starts as the snapshot's tree."""
        profile = resolve_template(template)
        seconds = self.check_timeout(timeout if timeout is not None else self.settings.default_timeout)
        if len(self.sessions) >= self.settings.max_sandboxes:
            raise ApiError(429, f"{len(self.sessions)} sandboxes are alive, the most this server runs at once",
                           "kill one, or raise MEMOPLANE_SERVE_MAX_SANDBOXES")
        if self.placement is not None:
            return await self._create_remote(self.placement, caller, template, profile, seconds, env, metadata,
                                             snapshot)
        warm = self._take_warm(profile) if snapshot is None else None
        session = warm or self.new_session(profile)
        pool = None if warm else await asyncio.to_thread(self.pool, profile)
        self._hand_out(session, caller, template, seconds, metadata)
        self.sessions[session.id] = session
        try:
            if pool is not None:
                await self._launch(session, pool, env, snapshot, self.limits())
            elif env:
                await session.call("env", envs=env)
        except BaseException:
            await self.kill(session)
            raise
        # Not now: starting the next one would compete for the CPU with this one's first command.
        asyncio.get_running_loop().call_later(_WARM_REFILL_DELAY, self._keep_warm, profile)
        return session

    def _hand_out(self, session: Session, caller: Caller, template: str, seconds: int,
                  metadata: dict[str, str]) -> None:
        """The session is the caller's team's from now, for `seconds` (the server's most at the latest)."""
        now = time.time()
        session.template, session.owner, session.creator = template, caller.team, caller.key_id
        session.metadata, session.started_at, session.end_at = dict(metadata), now, now + seconds
        session.hard_end_at = now + self.settings.max_timeout

    # -- warm sessions ------------------------------------------------------------------

    def _take_warm(self, profile: str) -> Session | None:
        """A started session of `profile` no one owns yet, the oldest young enough; None if none."""
        self._retire_old_warm()
        ready = self._warm.get(profile, [])
        while ready:
            session = ready.pop(0)
            if not session.ended.is_set():
                return session
        return None

    def _retire_old_warm(self) -> None:
        """Warm sessions past their age are killed (and replaced): see _WARM_MAX_AGE."""
        for profile, ready in self._warm.items():
            old = [s for s in ready if time.monotonic() - s.launched_at >= _WARM_MAX_AGE]
            self._warm[profile] = [s for s in ready if s not in old]
            for session in old:
                self._spawn(self.kill(session))

    def _keep_warm(self, profile: str) -> None:
        """Start what `profile` lacks of its warm sessions (none before its pool exists)."""
        if self._stopping.is_set() or profile not in self._pools:
            return
        if time.monotonic() - self._warm_failed_at.get(profile, -_WARM_RETRY) < _WARM_RETRY:
            return
        ready = [s for s in self._warm.get(profile, []) if not s.ended.is_set()]
        for _ in range(self.settings.warm_sessions - len(ready) - self._warming[profile]):
            self._warming[profile] += 1
            self._spawn(self._start_warm(profile))

    async def _start_warm(self, profile: str) -> None:
        session = self.new_session(profile)
        try:
            # Its child's limit runs from now: longer by the most it may wait to be handed out.
            limits = Limits(timeout_s=float(self.settings.max_timeout) + _WARM_MAX_AGE)
            await self._launch(session, self._pools[profile], {}, None, limits)
        except Exception as e:  # noqa: BLE001 - a create then starts its own sandbox, and says why
            log.warning("a warm %s sandbox could not start (%s): retried in %.0fs", profile, e, _WARM_RETRY)
            self._warm_failed_at[profile] = time.monotonic()
            await self.kill(session)
            return
        finally:
            self._warming[profile] -= 1
        if self._stopping.is_set():
            await self.kill(session)
        else:
            self._warm.setdefault(profile, []).append(session)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._warm_tasks.add(task)
        task.add_done_callback(self._warm_tasks.discard)

    # -- sandboxes on the node agents (Kubernetes) -----------------------------------------

    async def _create_remote(self, placement: Placement, caller: Caller, template: str, profile: str, seconds: int,
                             env: dict[str, str], metadata: dict[str, str], snapshot: str | None) -> Session:
        if snapshot is not None:
            raise ApiError(400, "starting a sandbox from a snapshot is not supported yet on Kubernetes (sandboxes "
                           "run on the node agents)", "create it without a snapshot")
        session = RemoteSession(id=new_sandbox_id(), template="", profile=profile, owner="", metadata={},
                                started_at=0.0, end_at=0.0, hard_end_at=0.0,
                                directory=Path())   # no directory here: the agent has the child's
        self._hand_out(session, caller, template, seconds, metadata)
        request = {"id": session.id, "team": caller.team, "profile": profile, "env": env,
                   "seconds": int(session.hard_end_at - session.started_at)}
        unreachable: set[str] = set()
        while True:   # each live agent once, until one answers (pick: 503 when none is left)
            node, endpoint = await asyncio.to_thread(placement.pick, profile, frozenset(unreachable))
            try:
                placed = await open_remote(node, endpoint, placement.secret, request, _MAX_LINE)
                break
            except Unreachable as e:
                placement.release(node)
                log.warning("sandbox %s: %s", session.id, e.message)
                unreachable.add(node)
            except BaseException:
                placement.release(node)
                raise
        session.node, session.connection = node, placed.writer
        self.sessions[session.id] = session
        if self.objects is not None:   # before its lines are read: its end (which removes it) comes after
            await asyncio.to_thread(self.objects.show, session.id, node, session.owner, template,
                                    session.started_at, session.end_at)
        self._background(self._serve_remote(placement, session, placed))
        return session

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._remote.add(task)
        task.add_done_callback(self._remote.discard)

    async def _serve_remote(self, placement: Placement, session: RemoteSession, placed: Placed) -> None:
        try:
            await session.serve_agent(placed.reader, placed.writer)
        except (ConnectionError, OSError) as e:   # the agent's connection broke: the sandbox is gone
            log.info("sandbox %s: node %s's connection ended: %s", session.id, session.node, e)
        finally:
            placement.release(session.node)
            if self.objects is not None:   # gone before kill() returns: the sandbox ended
                await asyncio.to_thread(self.objects.remove, session.id)
            self.sessions.pop(session.id, None)
            session.ended.set()

    async def _launch(self, session: Session, pool: SandboxPool, env: dict[str, str], snapshot: str | None,
                      limits: Limits) -> None:
        loop = asyncio.get_running_loop()
        session.launched_at = time.monotonic()
        inbox, outbox = session.directory / "in", session.directory / "out"
        inbox.mkdir()
        outbox.mkdir()
        if snapshot is not None:
            await asyncio.to_thread(self._materialize, session.owner, snapshot, inbox / _RESTORED)
        # The child runs as another host uid: it may enter the directory and connect, nothing else.
        os.chmod(session.directory, 0o755)
        os.chmod(inbox, 0o755)
        socket_path = inbox / session_agent.SOCKET_NAME
        server = await asyncio.start_unix_server(session.serve_agent, path=str(socket_path), limit=_MAX_LINE)
        os.chmod(socket_path, 0o777)
        session.connected = loop.create_future()
        session._stop_r, session._stop_w = os.pipe()
        source = _AGENT_IMPORT if _AGENT_MODULE in pool.preloaded else _AGENT_SOURCE
        request = SandboxRequest(PythonTask(source, "main", filename="<memoplane session agent>"),
                                 inbox, outbox, env=env, limits=limits)

        def run() -> None:
            try:
                outcome = pool.run(request, stop_fd=session._stop_r, on_out=lambda fd: setattr(session, "out_fd", fd))
            except Exception as e:  # noqa: BLE001 - reported as the session's end, never lost
                log.warning("sandbox %s could not run: %s", session.id, e)
                outcome = None
            loop.call_soon_threadsafe(self._ended, session, outcome, server)

        threading.Thread(target=run, name=f"memoplane-session-{session.id}", daemon=True).start()
        ended = loop.create_task(session.ended.wait())
        waiters: list[asyncio.Future[Any]] = [session.connected, ended]
        await asyncio.wait(waiters, timeout=_CONNECT_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        ended.cancel()
        if not session.connected.done():
            reason = session.outcome.failure.message if session.outcome and session.outcome.failure else \
                f"its agent did not start within {_CONNECT_TIMEOUT:.0f}s"
            raise ApiError(500, f"sandbox {session.id} could not start: {reason}",
                           "see the server's log; check `memoplane serve` runs with sandbox isolation")
        if snapshot is not None:
            await session.call("restore", name=_RESTORED)
            await asyncio.to_thread(remove_tree, inbox / _RESTORED)   # the sandbox has its copy

    def limits(self) -> Limits:
        """A session's: its output limits bound its snapshots too."""
        return Limits(timeout_s=float(self.settings.max_timeout))

    def _materialize(self, team: str, snapshot: str, dest: Path) -> None:
        """The snapshot's tree under `dest`, every chunk verified; one the team's store does not hold
        is not found (another team's digest included)."""
        try:
            check_digest(snapshot, "snapshot")
            with open_team_store(self.store, team) as store:
                if store.snapshot(snapshot) is None:   # never taken by the team, or deleted
                    raise NotFound(snapshot)
                store.materialize(snapshot, dest)
        except NotFound:
            raise ApiError(404, f"snapshot {snapshot} not found", "give a snapshotID of your team's that "
                           "GET /snapshots lists") from None
        except StoreCorrupted as e:
            raise ApiError(422, f"snapshot {snapshot} is damaged and was not restored: {e}",
                           "take a new snapshot") from None
        except InputError as e:
            raise ApiError(400, str(e)) from None

    async def snapshot(self, session: Session) -> tuple[str, int]:
        """Store the sandbox's $HOME as a tree in its team's store: (digest, bytes of its files). The
        agent copies it into its $MEMOPLANE_OUT; the host reads it there as it reads a job's
        outputs (collect.collect: regular files and directories only, beneath that mount, within
        the output limits), so a link, a device or a FIFO is refused, never followed."""
        if isinstance(session, RemoteSession):
            raise ApiError(400, f"sandbox {session.id} runs on node {session.node}: snapshots of sandboxes on "
                           "the node agents are not supported yet", "copy its files out with the files API")
        async with session.snapshotting:
            await session.call("snapshot")
            if session.ended.is_set() or session.out_fd < 0:
                raise SandboxGone(session.id)
            out_fd = os.dup(session.out_fd)   # the session's own is closed when it ends, maybe meanwhile
            try:
                return await asyncio.to_thread(self._store_tree, session, out_fd)
            finally:
                with contextlib.suppress(ApiError):   # it ended meanwhile: nothing to empty
                    await session.call("snapshot_taken")

    def _store_tree(self, session: Session, out_fd: int) -> tuple[str, int]:
        with tempfile.TemporaryDirectory(prefix="memoplane-snapshot-") as copy:
            try:
                collect(out_fd, copy, self.limits(), "none")
            except Refused as e:
                raise ApiError(422, f"sandbox {session.id} cannot be snapshotted: {e.failure.message}",
                               "keep only regular files and directories in $HOME") from None
            except OSError as e:   # the tree changed under the copy (a FIFO swapped in, ...)
                raise ApiError(409, f"sandbox {session.id} could not be snapshotted: {e}",
                               "retry once its commands stopped writing to $HOME") from None
            finally:
                os.close(out_fd)
            with open_team_store(self.store, session.owner) as store:
                tree = store.put_tree(copy)
                store.keep_snapshot(tree, session.id)
                return tree.digest, tree.size

    def snapshots(self, caller: Caller) -> list[SnapshotEntry]:
        """The caller's team's kept snapshots (blocking: call in a thread); a key scoped to one sandbox
        sees that sandbox's only."""
        with open_team_store(self.store, caller.team) as store:
            return [e for e in store.snapshots() if caller.sandbox in (None, e.sandbox)]

    def delete_snapshot(self, caller: Caller, digest: str) -> bool:
        """Stop keeping one of the team's snapshots (blocking); its data goes at the team's next GC
        past the grace period. False: the team keeps no such snapshot."""
        try:
            check_digest(digest, "snapshotID")
        except InputError:
            return False
        with open_team_store(self.store, caller.team) as store:
            return store.drop_snapshot(digest)

    def _ended(self, session: Session, outcome: SandboxOutcome | None, server: asyncio.Server) -> None:
        session.outcome = outcome
        session.ended.set()
        session.gone()
        server.close()
        if session._writer is not None:
            session._writer.close()
        os.close(session._stop_r)
        os.close(session._stop_w)
        session._stop_r = session._stop_w = -1
        if session.out_fd >= 0:
            os.close(session.out_fd)
            session.out_fd = -1
        self.sessions.pop(session.id, None)
        if session.profile in self._warm:
            self._warm[session.profile] = [s for s in self._warm[session.profile] if s is not session]
        with contextlib.suppress(OSError):
            remove_tree(session.directory)

    def get(self, caller: Caller, sandbox_id: str) -> Session:
        session = self.sessions.get(sandbox_id)
        if session is None or session.owner != caller.team or session.ended.is_set():
            raise SandboxGone(sandbox_id)
        return session

    def list(self, caller: Caller) -> list[Session]:
        return [s for s in self.sessions.values() if s.owner == caller.team and not s.ended.is_set()
                and caller.sandbox in (None, s.id)]

    async def kill(self, session: Session) -> None:
        if not session.launched() and not session.ended.is_set():
            self.sessions.pop(session.id, None)
            with contextlib.suppress(OSError):
                remove_tree(session.directory)
            return
        session.stop()
        await session.ended.wait()   # the pool has seen every process of it gone

    def set_timeout(self, session: Session, timeout: int) -> None:
        seconds = self.check_timeout(timeout)
        end_at = time.time() + seconds
        if end_at > session.hard_end_at:
            left = int(session.hard_end_at - time.time())
            raise ApiError(400, f"timeout {seconds} would outlive the sandbox's limit of "
                           f"{self.settings.max_timeout}s from its start ({left}s left)",
                           f"give a timeout of at most {left}, or raise MEMOPLANE_SERVE_MAX_TIMEOUT")
        session.end_at = end_at
        if self.objects is not None and isinstance(session, RemoteSession):
            self._background(asyncio.to_thread(self.objects.expires, session.id, end_at))

    def check_timeout(self, seconds: int) -> int:
        if not 0 < seconds <= self.settings.max_timeout:
            raise ApiError(400, f"timeout {seconds} is out of range",
                           f"give 1..{self.settings.max_timeout} seconds (MEMOPLANE_SERVE_MAX_TIMEOUT)")
        return seconds

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(_REAP_EVERY)
            now = time.time()
            for session in [s for s in self.sessions.values() if s.end_at <= now]:
                log.info("sandbox %s reached its timeout: killed", session.id)
                await self.kill(session)
            self._retire_old_warm()
            for profile in list(self._pools):
                self._keep_warm(profile)


def new_sandbox_id() -> str:
    return "mp" + secrets.token_hex(10)

def snapshot_template(template: str) -> str | None:
    """The snapshot a template names (E2B's way to start from one: its snapshotID as the template)."""
    return template if template.startswith("b3:") else None


def resolve_template(template: str) -> str:
    """The runtime profile a template names (a profile's own name, an E2B default's alias, or a snapshot)."""
    if snapshot_template(template) is not None:
        return _SNAPSHOT_PROFILE
    profile = TEMPLATE_ALIASES.get(template, template)
    if profile not in PROFILES:
        known = sorted({*PROFILES, *TEMPLATE_ALIASES})
        raise ApiError(404, f"template {template!r} is not a runtime profile of this server",
                       f"use one of {', '.join(known)}")
    return profile
