"""The ASGI application of `memoplane serve`: E2B's control plane (sandboxes), E2B's in-sandbox
API (envd: Connect services, files, code cells) and memoplane's own /v1/run, in one process.

Every request, whichever of the three it is for, first goes through one gate (_Gate): who calls
(`authenticate`: API keys, or the local team on loopback), whether the route's verb and sandbox
are theirs (auth.authorize), and their rate tier (limits.py); then the route runs, and the call is
recorded in the audit log (calls.py). Sandboxes are looked up per team.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..inputs import env_problem
from ..settings import ServeSettings
from . import grants, memo
from .access import KeyAuthenticator
from .auth import (
    CREATE,
    SCOPE_KEY,
    Authenticate,
    Caller,
    Incoming,
    Route,
    Who,
    authorize,
    current_caller,
    local_caller,
    route_of,
    sandbox_token,
)
from .calls import Call, CallLog
from .envd import connect_apps, session_of
from .errors import ApiError
from .files import read_file, write_files
from .limits import Limiter, RateLimited
from .sessions import MAX_FILE_BYTES, Session, SessionManager, snapshot_template
from .signing import KEY_HEADER, SIGNATURE_HEADER

# The envd version this server speaks for: what the SDK gates its features on (octet-stream
# uploads from 0.5.7; per-file metadata, 0.6.2, is not served).
ENVD_VERSION = "0.5.7"
# Sandbox sizes reported to the SDK: a child's limits (memoplane.sandbox.types.Limits).
_CPU_COUNT, _MEMORY_MB, _DISK_MB = 1, 512, 256
SNAPSHOTS_PAGE = 100   # snapshots listed per page at most
MAX_SIGNED_BODY = MAX_FILE_BYTES + (1 << 20)   # a file upload, and its form's framing
_BODY_DIGEST = "memoplane.body_sha256"
# The metadata key of a new sandbox that names the snapshot it starts from, for a client that keeps
# templateID for the runtime profile; the e2b SDK's own way is the snapshot's ID as the template.
SNAPSHOT_METADATA = "memoplane.snapshot"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class NewSandbox(BaseModel):
    """E2B's NewSandbox: what the SDK sends. Fields the SDK may send that this server does not
    honour are refused when they ask for something (an internet connection, a volume, MCP)."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")
    template_id: str = Field(alias="templateID")
    timeout: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    env_vars: dict[str, str] = Field(default_factory=dict, alias="envVars")
    auto_pause: bool = Field(False, alias="autoPause")
    auto_pause_memory: bool | None = Field(None, alias="autoPauseMemory")
    auto_resume: Any = Field(None, alias="autoResume")
    allow_internet_access: bool | None = None
    secure: bool | None = None
    network: Any = None
    mcp: Any = None
    iam: Any = None
    volume_mounts: Any = Field(None, alias="volumeMounts")

    def refuse_unsupported(self) -> None:
        wanted = {"autoPause": self.auto_pause, "autoPauseMemory": self.auto_pause_memory,
                  "autoResume": self.auto_resume, "allow_internet_access": self.allow_internet_access,
                  "network": self.network, "mcp": self.mcp, "iam": self.iam, "volumeMounts": self.volume_mounts}
        for name, value in wanted.items():
            if value:
                raise ApiError(400, f"{name} is not supported yet (sandboxes have no network, no pause, "
                               "no volumes)", f"leave {name} unset")


class SnapshotRequest(BaseModel):
    """E2B's SandboxSnapshotRequest (the SDK's create_snapshot)."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    memory: bool | None = None

    def refuse_unsupported(self) -> None:
        if self.memory:
            raise ApiError(400, "memory snapshots are not supported yet: a snapshot keeps the sandbox's files "
                           "($HOME), not its processes", 'take one with mode="filesystem"')
        if self.name is not None:
            raise ApiError(400, "named snapshots are not supported yet", "leave name unset: use the snapshotID")


class Timeout(BaseModel):
    timeout: int


class Reconnect(BaseModel):
    """E2B's ConnectSandbox. `memory` says how a paused sandbox resumes: a no-op for a running
    one (E2B's own rule), and sandboxes here are never paused."""

    model_config = ConfigDict(extra="forbid")
    timeout: int | None = None
    memory: Any = None


def build_app(settings: ServeSettings, store: str | None = None, authenticate: Authenticate = local_caller,
              limiter: Limiter | None = None, calls: CallLog | None = None,
              clock: Callable[[], float] = time.time,
              local: Callable[[SessionManager], contextlib.AbstractAsyncContextManager[None]] | None = None,
              sessions: SessionManager | None = None,
              ) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The whole server as one ASGI callable: `authenticate` says who calls, `limiter` holds them to
    their tier, `calls` records every call (None: not recorded); `local(sessions)` is held open while
    the sessions live (the CLI's daemon socket, daemon.py); `sessions`: where sandboxes run (default:
    this process's own warm pools)."""
    sessions = sessions if sessions is not None else SessionManager(settings, store)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        sessions.start()
        try:
            async with local(sessions) if local is not None else contextlib.nullcontext():
                yield
        finally:
            await sessions.close()
            if cluster_runs is not None:
                await asyncio.to_thread(cluster_runs.close)
            if calls is not None:
                await asyncio.to_thread(calls.close)

    api = FastAPI(title="memoplane", version=__version__, lifespan=lifespan,
                  description="memoplane's agent API: E2B-compatible sandboxes and memoized runs.")
    api.state.sessions = sessions

    @api.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return _error_response(e)

    @api.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return await api_error(_, invalid_request(e))

    _control_plane(api, sessions)
    _envd_http(api, sessions)
    cluster_runs = memo.routes(api, sessions, store)
    grants.routes(api, authenticate.keys if isinstance(authenticate, KeyAuthenticator) else None)
    apps = connect_apps(sessions)
    gate = _Gate(authenticate, limiter, sessions, clock)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await api(scope, receive, send)
            return
        started = time.monotonic()
        route = route_of(scope["method"], scope["path"], _headers(scope))

        async def record() -> None:
            if calls is not None:
                await calls.record(call.finished(scope, route, time.monotonic() - started))
        call = _CallTally(send, record)
        try:
            receive = await gate.readable_body(scope, call.counting(receive))
            caller = gate.admit(scope, route, call)
        except ApiError as e:
            await _error_response(e)(scope, receive, call.send)
        else:
            scope[SCOPE_KEY] = caller
            current_caller.set(caller)
            # Freed before the response's last message: a caller who heard the end may start the next.
            call.before_last = functools.partial(gate.done, caller, route)
            try:
                await _dispatch(scope, receive, call.send, apps, api)
            finally:
                call.release()
        finally:
            if not call.recorded:   # never answered whole (the client went away): recorded all the same
                await record()

    return app


async def _dispatch(scope: Scope, receive: Receive, send: Send, apps: dict[str, Any],
                    api: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
    for prefix, connect in apps.items():
        if scope["path"].startswith(prefix):
            await connect(scope, receive, send)
            return
    await api(scope, receive, send)


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _error_response(e: ApiError) -> JSONResponse:
    retry = {"Retry-After": str(e.retry_after)} if isinstance(e, RateLimited) else None
    return JSONResponse(e.body(), status_code=e.status, headers=retry)


class _CallTally:
    """What the audit records of one call: sizes, the body's digest, the status sent. The response's
    last message waits for `record`: the call is in the audit log before its caller hears its end."""

    def __init__(self, send: Send, record: Callable[[], Awaitable[None]]) -> None:
        self._send, self.status, self.request_bytes, self.response_bytes = send, 0, 0, 0
        self._record, self.recorded = record, False
        self.digest = hashlib.sha256()
        self.claimed_key = ""
        self.caller: Caller | None = None   # once authenticated (a call refused later is still theirs)
        self.before_last: Callable[[], None] | None = None   # once, before the last message or at the end

    def release(self) -> None:
        before_last, self.before_last = self.before_last, None
        if before_last is not None:
            before_last()

    def counting(self, receive: Receive) -> Receive:
        async def counted() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                self.request_bytes += len(message.get("body", b""))
                self.digest.update(message.get("body", b""))
            return message
        return counted

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
        elif message["type"] == "http.response.body":
            self.response_bytes += len(message.get("body", b""))
            if not message.get("more_body"):
                self.release()
                self.recorded = True
                await self._record()
        await self._send(message)

    def finished(self, scope: Scope, route: Route, seconds: float) -> Call:
        caller = self.caller
        return Call(key=caller.key_id if caller else self.claimed_key, team=caller.team if caller else "",
                    verb=route.verb or "", method=scope["method"], path=scope["path"], sandbox=route.sandbox or "",
                    status=self.status or 500, request_bytes=self.request_bytes,
                    response_bytes=self.response_bytes, body_sha256=self.digest.hexdigest(),
                    seconds=round(seconds, 6))


class _Gate:
    """Authentication, the route's verb and sandbox, and the rate tiers: before any route runs."""

    def __init__(self, authenticate: Authenticate, limiter: Limiter | None, sessions: SessionManager,
                 clock: Callable[[], float]) -> None:
        self.authenticate, self.limiter, self.sessions, self.clock = authenticate, limiter, sessions, clock
        self._creating: Counter[str] = Counter()   # creations under way, per key and per team

    async def readable_body(self, scope: Scope, receive: Receive) -> Receive:
        """A signed request's body is read whole first (its digest is signed), then replayed to the route."""
        if SIGNATURE_HEADER not in _headers(scope):
            return receive
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                raise ApiError(400, "the request ended before its body")
            body += message.get("body", b"")
            more = bool(message.get("more_body"))
            if len(body) > MAX_SIGNED_BODY:
                raise ApiError(413, f"a signed body is larger than {MAX_SIGNED_BODY} bytes", "send less at once")
        scope[_BODY_DIGEST] = hashlib.sha256(body).hexdigest()
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()   # the disconnect, when it comes
            sent = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}
        return replay

    def admit(self, scope: Scope, route: Route, call: _CallTally) -> Caller:
        headers = _headers(scope)
        call.claimed_key = (headers.get(KEY_HEADER) or headers.get("x-api-key", "").partition(".")[0])[:64]
        path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        target = f"{path}?{scope['query_string'].decode('latin-1')}" if scope["query_string"] else path
        caller = call.caller = self.authenticate(Incoming(scope["method"], scope["path"], target, headers,
                                                          scope.get(_BODY_DIGEST)))
        authorize(caller, route)
        if self.limiter is not None and route.counts_as is not None:
            if route.counts_as == CREATE:
                alive = self.sessions.list(caller)
                self.limiter.check_alive(caller, sum(s.creator == caller.key_id for s in alive)
                                         + self._creating["key:" + caller.key_id],
                                         len(alive) + self._creating["team:" + caller.team])
            self.limiter.take(caller, route.counts_as, self.clock())
        if route.counts_as == CREATE:
            self._creating.update(("key:" + caller.key_id, "team:" + caller.team))
        return caller

    def done(self, caller: Caller, route: Route) -> None:
        if route.counts_as == CREATE:
            self._creating.subtract(("key:" + caller.key_id, "team:" + caller.team))
        if self.limiter is not None and route.counts_as is not None:
            self.limiter.finished(caller, route.counts_as)


def invalid_request(e: RequestValidationError) -> ApiError:
    """A body or query that does not fit the schema, as one line naming the first bad field (400, in
    E2B's error shape: FastAPI's own 422 list is not what the SDKs read)."""
    first = e.errors()[0] if e.errors() else {}
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "the request"
    return ApiError(400, f"{where}: {first.get('msg', 'invalid')}", "see /openapi.json for the fields")


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def _created(session: Session) -> dict[str, Any]:
    return {"templateID": session.template, "sandboxID": session.id, "clientID": "memoplane",
            "envdVersion": ENVD_VERSION, "alias": session.template}


def _reachable(session: Session, who: Caller) -> dict[str, Any]:
    """A created or connected sandbox, with the token the SDK sends to its envd (X-Access-Token)."""
    return {**_created(session), "envdAccessToken": sandbox_token(who, session.id)}


def _listed(session: Session) -> dict[str, Any]:
    return {**_created(session), "startedAt": _iso(session.started_at), "endAt": _iso(session.end_at),
            "cpuCount": _CPU_COUNT, "memoryMB": _MEMORY_MB, "diskSizeMB": _DISK_MB, "state": "running",
            "metadata": session.metadata}


def _control_plane(api: FastAPI, sessions: SessionManager) -> None:
    """E2B's REST API for sandboxes: create, list, get, kill, set the timeout."""

    @api.post("/sandboxes", status_code=201, tags=["sandboxes"])
    @api.post("/v2/sandboxes", status_code=201, tags=["sandboxes"])
    async def create(body: NewSandbox, who: Who) -> dict[str, Any]:
        body.refuse_unsupported()
        for name, value in body.env_vars.items():
            problem = env_problem(name, value)
            if problem:
                raise ApiError(400, f"envVars: {problem[0]}", problem[1])
        snapshot = body.metadata.get(SNAPSHOT_METADATA) or snapshot_template(body.template_id)
        if snapshot_template(body.template_id) not in (None, snapshot):
            raise ApiError(400, f"templateID and metadata {SNAPSHOT_METADATA} name two different snapshots",
                           "name the snapshot once")
        if snapshot is not None:   # restoring reads the team's snapshots: the key needs their verb too
            authorize(who, Route("snapshot", None, None))
        session = await sessions.create(who, body.template_id, body.timeout, body.env_vars, body.metadata, snapshot)
        return _reachable(session, who)

    @api.post("/v1/sandboxes/{sandbox_id}/snapshot", tags=["sandboxes"])
    async def snapshot(sandbox_id: str, who: Who) -> dict[str, Any]:
        """Store the sandbox's $HOME (/tmp) in the team's store; a new sandbox created with
        metadata {"memoplane.snapshot": snapshotID} starts from it, also after a restart."""
        digest, size = await sessions.snapshot(sessions.get(who, sandbox_id))
        return {"snapshotID": digest, "sizeBytes": size, "metadataKey": SNAPSHOT_METADATA}

    @api.post("/sandboxes/{sandbox_id}/snapshots", status_code=201, tags=["sandboxes"])
    async def create_snapshot(sandbox_id: str, body: SnapshotRequest, who: Who) -> dict[str, Any]:
        """E2B's create_snapshot (filesystem mode): the same snapshot; Sandbox.create(snapshotID) starts from it."""
        body.refuse_unsupported()
        digest, _ = await sessions.snapshot(sessions.get(who, sandbox_id))
        return {"snapshotID": digest, "names": []}

    @api.get("/snapshots", tags=["snapshots"])
    @api.get("/v1/snapshots", tags=["snapshots"])
    async def list_snapshots(response: Response, who: Who, sandbox_id: str | None = Query(None, alias="sandboxID"),
                             limit: int = Query(SNAPSHOTS_PAGE, ge=1, le=SNAPSHOTS_PAGE),
                             next_token: str | None = Query(None, alias="nextToken")) -> list[dict[str, Any]]:
        """The team's kept snapshots, oldest first (E2B's list_snapshots): `limit` a page, the next
        page's token in X-Next-Token. A kept snapshot outlives its sandbox until it is deleted."""
        after = _snapshot_token(next_token) if next_token else None
        kept = [e for e in await asyncio.to_thread(sessions.snapshots, who) if sandbox_id in (None, e.sandbox)
                and (after is None or (e.created, e.tree) > after)]
        page = kept[:limit]
        if len(kept) > limit:   # the token is the last one's place: deleting it meanwhile skips nothing
            response.headers["X-Next-Token"] = f"{page[-1].created!r}_{page[-1].tree}"
        return [{"snapshotID": e.tree, "names": [], "sandboxID": e.sandbox, "sizeBytes": e.size,
                 "createdAt": _iso(e.created)} for e in page]

    @api.delete("/templates/{snapshot_id}", status_code=204, tags=["snapshots"])
    @api.delete("/v1/snapshots/{snapshot_id}", status_code=204, tags=["snapshots"])
    async def delete_snapshot(snapshot_id: str, who: Who) -> Response:
        """Delete one of the team's snapshots (E2B's delete_snapshot): it can no longer start a sandbox,
        and its files go at the team's next `memoplane gc` past the grace period (unless shared with
        a kept snapshot or result). Templates (runtime profiles) are not deleted here: 404."""
        if not await asyncio.to_thread(sessions.delete_snapshot, who, snapshot_id):
            raise ApiError(404, f"snapshot {snapshot_id[:80]} not found", "GET /snapshots lists your team's")
        return Response(status_code=204)

    @api.get("/sandboxes", tags=["sandboxes"])
    @api.get("/v2/sandboxes", tags=["sandboxes"])
    async def list_sandboxes(request: Request, who: Who) -> list[dict[str, Any]]:
        query = request.query_params
        states = set(query.get("state", "running").split(","))
        wanted = _metadata_filter(query.get("metadata"))
        return [_listed(s) for s in sessions.list(who)
                if "running" in states and all(s.metadata.get(k) == v for k, v in wanted.items())]

    @api.get("/sandboxes/{sandbox_id}", tags=["sandboxes"])
    async def get(sandbox_id: str, who: Who) -> dict[str, Any]:
        return _listed(sessions.get(who, sandbox_id))

    @api.delete("/sandboxes/{sandbox_id}", status_code=204, tags=["sandboxes"])
    async def kill(sandbox_id: str, who: Who) -> Response:
        await sessions.kill(sessions.get(who, sandbox_id))
        return Response(status_code=204)

    @api.post("/sandboxes/{sandbox_id}/connect", tags=["sandboxes"])
    @api.post("/v2/sandboxes/{sandbox_id}/connect", tags=["sandboxes"])
    async def connect(sandbox_id: str, body: Reconnect, who: Who) -> dict[str, Any]:
        """Connect to a running sandbox; a longer timeout than it has extends it (never shortens)."""
        session = sessions.get(who, sandbox_id)
        if body.timeout is not None and time.time() + body.timeout > session.end_at:
            sessions.set_timeout(session, body.timeout)
        return _reachable(session, who)

    @api.post("/sandboxes/{sandbox_id}/timeout", status_code=204, tags=["sandboxes"])
    async def set_timeout(sandbox_id: str, body: Timeout, who: Who) -> Response:
        sessions.set_timeout(sessions.get(who, sandbox_id), body.timeout)
        return Response(status_code=204)


def _snapshot_token(token: str) -> tuple[float, str]:
    created, _, tree = token.partition("_")
    try:
        return float(created), tree
    except ValueError:
        raise ApiError(400, f"nextToken {token[:80]!r} is not one this server sent",
                       "pass the X-Next-Token of the previous page, or none") from None


def _metadata_filter(text: str | None) -> dict[str, str]:
    """The SDK's metadata query: key=value pairs joined by '&', URL-encoded."""
    from urllib.parse import parse_qsl

    return dict(parse_qsl(text or ""))


def _envd_http(api: FastAPI, sessions: SessionManager) -> None:
    """envd's plain HTTP routes: health, file download and upload, and code cells (the
    code interpreter's /execute: one JSON object per line)."""

    def session(request: Request, who: Caller) -> Session:
        return session_of(sessions, who, {k.lower(): v for k, v in request.headers.items()})

    @api.get("/health", status_code=204, tags=["envd"])
    async def health(request: Request, who: Who) -> Response:
        if "e2b-sandbox-id" in request.headers:
            try:
                session(request, who)
            except ApiError:
                return Response(status_code=502)  # what the SDK's is_running reads as "not running"
        return Response(status_code=204)

    @api.get("/files", tags=["envd"])
    async def download(request: Request, path: str, who: Who) -> Response:
        return Response(await read_file(session(request, who), path), media_type="application/octet-stream")

    @api.post("/files", tags=["envd"])
    async def upload(request: Request, who: Who) -> list[dict[str, Any]]:
        return await write_files(session(request, who), request)

    @api.post("/execute", tags=["envd"])
    async def execute(request: Request, who: Who) -> StreamingResponse:
        target = session(request, who)
        body = await request.json()
        if body.get("language") not in (None, "python"):
            raise ApiError(400, f"language {body.get('language')!r} is not supported", "run Python cells")
        if body.get("context_id") is not None:
            raise ApiError(400, "code contexts are not supported yet", "run in the default context")
        replies = target.request("code", code=str(body.get("code", "")))
        return StreamingResponse(_cell_lines(replies), media_type="application/x-ndjson")


async def _cell_lines(replies: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """A cell's replies as the code interpreter's stream: outputs as they come, then its error or result."""
    async for reply in replies:
        for stream in ("stdout", "stderr"):
            if "cell_" + stream in reply:
                yield _line({"type": stream, "text": reply["cell_" + stream], "timestamp": time.time()})
        if reply.get("exception"):
            yield _line({"type": "error", **reply["exception"]})
        elif reply.get("done") and reply.get("result") is not None:
            yield _line({"type": "result", "text": reply["result"], "is_main_result": True})


def _line(message: dict[str, Any]) -> bytes:
    return (json.dumps(message) + "\n").encode()
