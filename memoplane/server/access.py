"""API-key authentication: signed requests (the strong mode), bearer tokens (what the e2b SDK sends:
the weaker mode) and sandbox access tokens (what the SDK sends to envd, issued at create).

Signed requests are checked against a bounded clock window, and their nonces are remembered for
that window: a replay inside it is refused, one outside it is refused as expired.
"""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace

from ..errors import InputError
from .apikeys import ApiKey, ApiKeys, KeysFile, secret_hash
from .auth import ACCESS_TOKEN_HEADER, SANDBOX_HEADER, Caller, Incoming, sandbox_token_key
from .errors import ApiError
from .signing import (
    BODY_HEADER,
    KEY_HEADER,
    NONCE_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    signature,
    string_to_sign,
)

_SIGN_FIX = "sign with memoplane.server.client.SignedAuth and the token `memoplane apikey create` printed"
MAX_NONCES = 200_000   # nonces remembered at most: past it, new signed requests wait (503) for old ones to expire


class NonceCache:
    """Nonces seen within the clock window, oldest first; entries older than the window are dropped."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._seen: OrderedDict[str, float] = OrderedDict()

    def first_use(self, nonce: str, now: float) -> bool:
        while self._seen and next(iter(self._seen.values())) < now - 2 * self.window:
            self._seen.popitem(last=False)
        if nonce in self._seen:
            return False
        if len(self._seen) >= MAX_NONCES:
            raise ApiError(503, "too many signed requests within the clock window", "retry in a few seconds")
        self._seen[nonce] = now
        return True


class KeyAuthenticator:
    """`authenticate` for a server with API keys (auth.Authenticate)."""

    def __init__(self, keys: ApiKeys, window: float, clock: Callable[[], float] = time.time) -> None:
        self.keys, self.window, self.clock = keys, window, clock
        self.nonces = NonceCache(window)

    def __call__(self, incoming: Incoming) -> Caller:
        headers = incoming.headers
        if SIGNATURE_HEADER in headers:
            return self._signed(incoming)
        if ACCESS_TOKEN_HEADER in headers and SANDBOX_HEADER in headers:
            return self._sandbox_token(headers[ACCESS_TOKEN_HEADER], headers[SANDBOX_HEADER])
        bearer = headers.get("x-api-key") or _bearer(headers.get("authorization", ""))
        if bearer:
            return self._bearer(bearer)
        raise ApiError(401, "this server needs an API key", "send X-Memoplane-Signature (signed) or X-API-KEY: "
                       "the token `memoplane apikey create` printed")

    def _key(self, keyid: str) -> tuple[ApiKey, KeysFile]:
        try:
            keys = self.keys.load()
        except InputError as e:   # the server's own file is broken: no key can be checked
            raise ApiError(500, str(e)) from None
        key = keys.keys.get(keyid)
        if key is None or key.revoked is not None:
            raise ApiError(401, f"API key {keyid[:40]!r} is unknown or revoked", "use a valid key")
        return key, keys

    def _signed(self, incoming: Incoming) -> Caller:
        h = incoming.headers
        missing = [n for n in (KEY_HEADER, TIMESTAMP_HEADER, NONCE_HEADER, BODY_HEADER) if not h.get(n)]
        if missing:
            raise ApiError(401, f"a signed request needs the header {missing[0]}", _SIGN_FIX)
        key, keys = self._key(h[KEY_HEADER])
        message = string_to_sign(key.keyid, h[TIMESTAMP_HEADER], h[NONCE_HEADER], incoming.method,
                                 incoming.target, h[BODY_HEADER])
        if not hmac.compare_digest(signature(bytes.fromhex(key.signing_key), message), h[SIGNATURE_HEADER]):
            raise ApiError(401, "the request's signature does not match", _SIGN_FIX)
        if not hmac.compare_digest(h[BODY_HEADER], incoming.body_digest or ""):
            raise ApiError(401, f"the body does not match its signed digest ({BODY_HEADER})", _SIGN_FIX)
        now = self.clock()
        try:
            skew = abs(now - int(h[TIMESTAMP_HEADER]))
        except ValueError:
            raise ApiError(401, f"{TIMESTAMP_HEADER} is not Unix seconds", _SIGN_FIX) from None
        if skew > self.window:
            raise ApiError(401, f"the request's timestamp is {skew:.0f}s from the server's clock (window "
                           f"{self.window:.0f}s)", "sync the client's clock; sign each request when it is sent")
        if not self.nonces.first_use(f"{key.keyid}:{h[NONCE_HEADER]}", now):
            raise ApiError(401, "the request was already received (a replay)", "sign each request with a new nonce")
        return _caller(key, keys)

    def _bearer(self, token: str) -> Caller:
        keyid, _, secret = token.strip().partition(".")
        key, keys = self._key(keyid)
        if not hmac.compare_digest(secret_hash(secret), key.secret_hash):
            raise ApiError(401, f"the secret of API key {keyid} does not match", "use the whole token KEYID.SECRET")
        return _caller(key, keys)

    def _sandbox_token(self, token: str, sandbox_id: str) -> Caller:
        keyid = sandbox_token_key(token, sandbox_id)
        if keyid is None:
            raise ApiError(401, f"the access token is not one of sandbox {sandbox_id[:40]}",
                           "use the envdAccessToken its create or connect returned")
        key, keys = self._key(keyid)
        if key.sandbox not in (None, sandbox_id):
            raise ApiError(403, f"API key {keyid} is scoped to sandbox {key.sandbox}", "use that sandbox")
        return replace(_caller(key, keys), sandbox=sandbox_id)


def _bearer(authorization: str) -> str:
    scheme, _, token = authorization.partition(" ")
    return token if scheme.lower() == "bearer" else ""


def _caller(key: ApiKey, keys: KeysFile) -> Caller:
    """Who the key is, with its team's tier and the teams that granted it their results, as the keys
    file says now: a grant or its withdrawal counts from the next request."""
    return Caller(key.team, key.keyid, frozenset(key.verbs), key.sandbox, keys.tier_of(key.team),
                  keys.readable_by(key.team), tuple(key.namespaces))
