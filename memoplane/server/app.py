"""The ASGI application of `memoplane serve`: E2B's control plane (sandboxes), E2B's in-sandbox
API (envd: Connect services, files, code cells) and memoplane's own /v1/run, in one process.

Every request, whichever of the three it is for, first goes through one hook, `authenticate`
(headers -> Caller): today every caller is the local team; API keys, HMAC signatures, rate
tiers and the audit log (later rounds) go there, and sandboxes are already looked up per team.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..inputs import env_problem
from ..settings import ServeSettings
from . import memo
from .auth import SCOPE_KEY, Authenticate, Caller, Who, current_caller, local_caller
from .envd import connect_apps, session_of
from .errors import ApiError
from .files import read_file, write_files
from .sessions import Session, SessionManager

# The envd version this server speaks for: what the SDK gates its features on (octet-stream
# uploads from 0.5.7; per-file metadata, 0.6.2, is not served).
ENVD_VERSION = "0.5.7"
# Sandbox sizes reported to the SDK: a child's limits (memoplane.sandbox.types.Limits).
_CPU_COUNT, _MEMORY_MB, _DISK_MB = 1, 512, 256

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


class Timeout(BaseModel):
    timeout: int


class Reconnect(BaseModel):
    """E2B's ConnectSandbox. `memory` says how a paused sandbox resumes: a no-op for a running
    one (E2B's own rule), and sandboxes here are never paused."""

    model_config = ConfigDict(extra="forbid")
    timeout: int | None = None
    memory: Any = None


def build_app(settings: ServeSettings, store: str | None = None,
              authenticate: Authenticate = local_caller) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The whole server as one ASGI callable."""
    sessions = SessionManager(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        sessions.start()
        try:
            yield
        finally:
            await sessions.close()

    api = FastAPI(title="memoplane", version=__version__, lifespan=lifespan,
                  description="memoplane's agent API: E2B-compatible sandboxes and memoized runs.")
    api.state.sessions = sessions

    @api.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @api.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return await api_error(_, invalid_request(e))

    _control_plane(api, sessions)
    _envd_http(api, sessions)
    memo.routes(api, sessions, store)
    apps = connect_apps(sessions)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            try:
                scope[SCOPE_KEY] = authenticate(headers)
            except ApiError as e:
                await JSONResponse(e.body(), status_code=e.status)(scope, receive, send)
                return
            current_caller.set(scope[SCOPE_KEY])
            for prefix, connect in apps.items():
                if scope["path"].startswith(prefix):
                    await connect(scope, receive, send)
                    return
        await api(scope, receive, send)

    return app


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
        session = await sessions.create(who, body.template_id, body.timeout, body.env_vars, body.metadata)
        return _created(session)

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
        return _created(session)

    @api.post("/sandboxes/{sandbox_id}/timeout", status_code=204, tags=["sandboxes"])
    async def set_timeout(sandbox_id: str, body: Timeout, who: Who) -> Response:
        sessions.set_timeout(sessions.get(who, sandbox_id), body.timeout)
        return Response(status_code=204)


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
