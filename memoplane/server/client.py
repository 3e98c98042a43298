"""Signing requests to `memoplane serve` from Python: an httpx authentication that signs each request
with an API key's token (`<keyid>.<secret>`, from `memoplane apikey create`).

    client = httpx.Client(base_url="http://host:3000", auth=SignedAuth(token))
    client.post("/v1/run", json={"code": "def main(): return 1"})

A plain bearer token (X-API-KEY: <token>, what the e2b SDK sends as its api_key) also works: the
weaker mode, since whoever sees one request can replay it or send others (see README).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator

import httpx

from .apikeys import signing_key, split_token
from .signing import sign


class SignedAuth(httpx.Auth):
    requires_request_body = True

    def __init__(self, token: str, clock: Callable[[], float] = time.time) -> None:
        self.keyid, secret = split_token(token)
        self._key = signing_key(secret)
        self._clock = clock

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        target = request.url.raw_path.decode("ascii")
        request.headers.update(sign(self.keyid, self._key, request.method, target, request.content, self._clock()))
        yield request
