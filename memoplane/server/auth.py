"""Who makes a request: the one hook every route of the API goes through.

This round has no API keys: the server listens on loopback and every caller is the local
team. The app (app.py) calls `authenticate(headers)` once per request, before any route or
Connect service, and puts the Caller in the request's scope (routes take it as `Who`) and in
`current_caller` (the Connect services read it there). API keys,
HMAC signatures, rate tiers and the audit log replace `local_caller` and add to that one place;
sandboxes are already looked up per team (sessions.SessionManager.get and .list).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

SCOPE_KEY = "memoplane.caller"


@dataclass(frozen=True)
class Caller:
    team: str = "local"
    key_id: str = "anonymous"


Authenticate = Callable[[Mapping[str, str]], Caller]


def local_caller(headers: Mapping[str, str]) -> Caller:
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
