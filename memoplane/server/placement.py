"""Sandboxes in the node agents' warm pools (Kubernetes): which agent takes a new one, and the
handshake of the agents' session endpoint.

An agent given the session secret (settings.SESSION_SECRET_FILE_ENV) serves a TCP endpoint and
announces it in its Lease (protocol.SESSIONS_ANNOTATION). One connection is one sandbox: the agent
sends a fresh challenge, the API answers with HMAC-SHA256(secret, challenge) and what to start;
the agent starts it in its warm pool, answers `created`, and from then on pipes the session
agent's JSON lines (session_agent.py) both ways unchanged, so the API's Session reads them as it
reads a local child's (and treats them as untrusted alike). Either side closing the connection
ends the sandbox. The secret never crosses the wire and a recorded handshake does not replay;
what follows the handshake is not encrypted: the endpoint belongs on the cluster's network.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..cluster.kube import Kube
from ..cluster.schedule import LeaseTracker, NodeView, live_nodes, runtime_for
from ..settings import SESSION_SECRET_FILE_ENV, read_private_file
from .errors import ApiError

HANDSHAKE_LINE = 1 << 20   # a handshake message carries the sandbox's environment: bounded
HANDSHAKE_TIMEOUT = 30.0   # seconds for the handshake and the sandbox's start on the agent


class Refused(Exception):
    """The peer failed the handshake (a wrong proof, a malformed message)."""


class Unreachable(ApiError):
    """No connection to an agent's endpoint: another agent may take the sandbox."""


def read_secret(path: str) -> bytes:
    """The shared session secret from its file (owner-only, not empty); InputError (one line) otherwise."""
    return read_private_file(Path(path), SESSION_SECRET_FILE_ENV, "the session secret").encode()


def proof(secret: bytes, challenge: str) -> str:
    return hmac.new(secret, b"memoplane-session\n" + challenge.encode(), hashlib.sha256).hexdigest()


async def send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(json.dumps(message).encode() + b"\n")
    await writer.drain()


async def receive(reader: asyncio.StreamReader) -> dict[str, Any]:
    try:
        message = json.loads(await reader.readline())
    except ValueError as e:   # not JSON, or longer than the stream's limit
        raise Refused(f"a malformed handshake message ({e})") from None
    if not isinstance(message, dict):
        raise Refused("a handshake message that is not a JSON object")
    return message


async def challenge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes) -> dict[str, Any]:
    """The agent's side: the caller's sandbox request, once it proved it holds the secret."""
    nonce = secrets.token_hex(16)
    await send(writer, {"challenge": nonce})
    message = await receive(reader)
    if not hmac.compare_digest(str(message.get("proof", "")), proof(secret, nonce)):
        raise Refused("the caller does not hold the session secret")
    request = message.get("sandbox")
    if not isinstance(request, dict):
        raise Refused("no sandbox request after the proof")
    return request


@dataclass(frozen=True)
class Placed:
    node: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


async def open_remote(node: str, endpoint: str, secret: bytes, request: dict[str, Any], limit: int) -> Placed:
    """The API's side: a sandbox started on `node`'s agent; its connection then carries the session's lines."""
    host, _, port = endpoint.rpartition(":")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port), limit=limit),
                                                HANDSHAKE_TIMEOUT)
    except (OSError, ValueError, TimeoutError) as e:
        raise Unreachable(503, f"node {node}'s agent is unreachable at {endpoint} ({e})", "retry") from None
    try:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            nonce = str((await receive(reader)).get("challenge", ""))
            await send(writer, {"proof": proof(secret, nonce), "sandbox": request})
            answer = await receive(reader)
    except (Refused, OSError, TimeoutError) as e:
        writer.close()
        raise ApiError(503, f"node {node}'s agent did not start the sandbox ({e})", "retry") from None
    if "created" not in answer:
        writer.close()
        error = answer.get("error")
        error = error if isinstance(error, dict) else {}
        status = error.get("status")
        raise ApiError(status if isinstance(status, int) and 400 <= status < 600 else 502,
                       f"node {node}'s agent: {str(error.get('message', 'no answer'))[:500]}")
    return Placed(node, reader, writer)


class Placement:
    """Which agent takes a new sandbox: among the live agents serving sessions of the profile, the
    one with the fewest sandboxes this API placed on it, ties to the first by name (so equal nodes
    take turns). The agents' own counts lag (Leases renew every few seconds); ours are exact."""

    def __init__(self, kube: Kube, namespace: str, secret: bytes) -> None:
        self.kube, self.namespace, self.secret = kube, namespace, secret
        self.placed: Counter[str] = Counter()
        self._tracker = LeaseTracker()
        self._lock = threading.Lock()

    def pick(self, profile: str, exclude: frozenset[str] = frozenset()) -> tuple[str, str]:
        """(node, its session endpoint), counted as placed, never one of `exclude`; blocking (reads the
        Leases): call in a thread."""
        leases = self.kube.list_leases(self.namespace)
        with self._lock:
            nodes = [n for n in live_nodes(self._observe(leases))
                     if n.sessions and profile in n.profiles and n.name not in exclude]
            if not nodes:
                tried = f" (unreachable: {', '.join(sorted(exclude))})" if exclude else ""
                raise ApiError(503, f"no live node agent in namespace {self.namespace} serves {profile!r} "
                               f"sandboxes{tried}", "check the agents run with the session secret "
                               f"({SESSION_SECRET_FILE_ENV}) and are ready; retry")
            chosen = min(nodes, key=lambda n: (self.placed[n.name], n.name))
            self.placed[chosen.name] += 1
            return chosen.name, chosen.sessions

    def runtime(self, profile: str) -> str | None:
        """The runtime digest the live agents advertise for `profile` (what the operator keys jobs with)."""
        leases = self.kube.list_leases(self.namespace)
        with self._lock:
            return runtime_for(self._observe(leases), profile)

    def _observe(self, leases: list[dict[str, Any]]) -> list[NodeView]:
        """The agents as `leases` say (called under the lock: the tracker is shared)."""
        return self._tracker.observe(leases, time.monotonic(), datetime.now(UTC))

    def release(self, node: str) -> None:
        with self._lock:
            self.placed[node] -= 1
            if self.placed[node] <= 0:
                del self.placed[node]
