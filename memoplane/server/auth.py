"""Who makes a request, and what it may do: the one hook every route of the API goes through.

The app (app.py) calls `authenticate(incoming)` once per request, before any route or Connect
service, then `authorize` (the route's verb, the key's sandbox), and puts the Caller in the
request's scope (routes take it as `Who`) and in `current_caller` (the Connect services read it
there). Without API keys (`local_caller`, loopback only) every caller is the local team with every
verb; with them, access.KeyAuthenticator checks signatures, bearer tokens and sandbox access tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from .apikeys import LOCAL_TEAM, VERBS
from .errors import ApiError

SCOPE_KEY = "memoplane.caller"
SANDBOX_HEADER = "e2b-sandbox-id"
ACCESS_TOKEN_HEADER = "x-access-token"   # what the e2b SDK sends to envd: a sandbox's access token


@dataclass(frozen=True)
class Caller:
    team: str = LOCAL_TEAM
    key_id: str = "anonymous"
    verbs: frozenset[str] = frozenset(VERBS)
    sandbox: str | None = None     # the one sandbox this caller may reach (None: any of its team's)
    tier: str | None = None        # its team's rate tier (None: not limited)
    reads_from: tuple[str, ...] = ()   # teams whose results its /v1/run may be served (they granted it)
    namespaces: tuple[str, ...] = ()   # on Kubernetes: where its /v1/run may make ComputeJobs


@dataclass(frozen=True)
class Incoming:
    """What authentication sees of a request: `target` is the raw path with its query, `body_digest`
    the SHA-256 (hex) of the whole body when the request is signed (None otherwise: not read)."""

    method: str
    path: str
    target: str
    headers: Mapping[str, str]
    body_digest: str | None = None


Authenticate = Callable[[Incoming], Caller]


def local_caller(incoming: Incoming) -> Caller:
    """No authentication (loopback only): every caller is the local team."""
    return Caller()


# The caller of the request being served, for code that sees no ASGI scope (the Connect services).
# Set by the app with the scope's, from the same single call of `authenticate`: a request is
# authenticated once (a signed request's replay check must see it once).
current_caller: ContextVar[Caller] = ContextVar("memoplane_caller")


def request_caller(request: Request) -> Caller:
    caller = request.scope[SCOPE_KEY]
    assert isinstance(caller, Caller)
    return caller


Who = Annotated[Caller, Depends(request_caller)]


# -- what a route needs ---------------------------------------------------------------------

CREATE, EXECUTE = "create", "execute"   # what the rate tiers count (limits.py)
_SANDBOX_PATH = re.compile(r"^(?:/v[12])?/sandboxes/([^/]+)")
_OPEN = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/health"}   # any authenticated caller


@dataclass(frozen=True)
class Route:
    verb: str | None         # None: any authenticated caller
    counts_as: str | None    # CREATE, EXECUTE or None
    sandbox: str | None      # the sandbox it reaches, when it names one
    filtered: bool = False   # it shows only what the caller may see (listing sandboxes)


def route_of(method: str, path: str, headers: Mapping[str, str]) -> Route:
    """Every route's verb; a path not listed here needs admin (denied by default)."""
    in_sandbox = headers.get(SANDBOX_HEADER) or None
    if path in _OPEN:
        return Route(None, None, in_sandbox)
    if path == "/v1/run":
        return Route("run", EXECUTE, None)
    if path in ("/sandboxes", "/v2/sandboxes"):
        return Route("exec", CREATE, None) if method == "POST" else Route("exec", None, None, filtered=True)
    if path in ("/snapshots", "/v1/snapshots"):
        return Route("snapshot", None, None, filtered=True)
    if path.startswith(("/templates/", "/v1/snapshots/")):
        return Route("snapshot", None, None)
    named = _SANDBOX_PATH.match(path)
    if named:
        return Route("snapshot" if path.endswith(("/snapshot", "/snapshots")) else "exec", None, named.group(1))
    if path == "/process.Process/Start" or path == "/execute":
        return Route("exec", EXECUTE, in_sandbox)
    if path.startswith("/process.Process/"):
        return Route("exec", None, in_sandbox)
    if path == "/files" or path.startswith("/filesystem.Filesystem/"):
        return Route("files", None, in_sandbox)
    return Route("admin", None, in_sandbox)


def authorize(caller: Caller, route: Route) -> None:
    """403 unless the caller's key carries the route's verb and, if scoped to a sandbox, reaches only it."""
    if route.verb is not None and route.verb not in caller.verbs:
        raise ApiError(403, f"API key {caller.key_id} lacks the verb {route.verb!r} this call needs",
                       f"use a key made with --verb {route.verb}")
    if caller.sandbox is not None and route.verb is not None and not route.filtered and route.sandbox != caller.sandbox:
        raise ApiError(403, f"API key {caller.key_id} is scoped to sandbox {caller.sandbox}",
                       "use a key of the team without --sandbox for other sandboxes and new ones")


# -- sandbox access tokens (what the e2b SDK sends to envd) --------------------------------

_TOKEN_SECRET = secrets.token_bytes(32)   # per process: sandboxes do not outlive the server either


def sandbox_token(caller: Caller, sandbox_id: str) -> str:
    """A token that lets `caller`'s key reach `sandbox_id` only (E2B's envdAccessToken)."""
    return f"{caller.key_id}.{_token_mac(caller.key_id, sandbox_id)}"


def sandbox_token_key(token: str, sandbox_id: str) -> str | None:
    """The key id a sandbox token was issued to, if it is one for `sandbox_id`."""
    keyid, _, mac = token.partition(".")
    return keyid if mac and hmac.compare_digest(mac, _token_mac(keyid, sandbox_id)) else None


def _token_mac(keyid: str, sandbox_id: str) -> str:
    return hmac.new(_TOKEN_SECRET, f"{keyid}\n{sandbox_id}".encode(), hashlib.sha256).hexdigest()
