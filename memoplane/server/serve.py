"""`memoplane serve`: the agent API on uvicorn (loopback by default)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import logging
import socket

import uvicorn

from ..cas import open_store
from ..cluster.kube import Kube, load_config
from ..errors import InputError
from ..settings import (
    SERVE_FLAGS,
    SESSION_SECRET_FILE_ENV,
    ServeSettings,
    api_keys_path,
    flag_values,
    from_env,
    serve_tiers,
)
from .access import KeyAuthenticator
from .apikeys import ApiKeys
from .app import build_app
from .auth import Authenticate, local_caller
from .calls import CallLog
from .daemon import listening
from .limits import Limiter
from .objects import SandboxObjects
from .placement import Placement, read_secret
from .sessions import SessionManager


def serve_command(args: argparse.Namespace) -> int:
    settings = from_env(ServeSettings, **flag_values(args, SERVE_FLAGS))
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(settings, args.store))
    return 0


async def serve(settings: ServeSettings, store: str | None, sock: socket.socket | None = None) -> None:
    """Serve until interrupted; prints the address it listens on (the port may be 0: any free one).
    With a key in the API keys file every request needs one; without, only loopback is served.
    This user's `memoplane run` of the same store also runs here, through a unix socket (daemon.py)."""
    authenticate = authenticator(settings, settings.host if sock is None else str(sock.getsockname()[0]))
    if sock is None:
        sock = socket.create_server((settings.host, settings.port))
    # Connections accepted from a socket handed to uvicorn lack TCP_NODELAY (asyncio sets it only on
    # sockets it makes): every response with a body then waited ~40 ms for a delayed ACK. Accepted
    # sockets inherit it from the listening one.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    host, port = sock.getsockname()[:2]
    remote = kubernetes_sessions(settings, store)
    with open_store(store) as opened:
        calls = CallLog(opened)
        local = None if remote is not None else \
            (lambda sessions: listening(store, sessions.pool, settings.require_isolation, calls))
        app = build_app(settings, store, authenticate, Limiter(serve_tiers(settings)), calls, local=local,
                        sessions=remote)
        config = uvicorn.Config(app, log_level=settings.log_level.lower(), timeout_graceful_shutdown=5)
        mode = f"API keys of {authenticate.keys.path}" if isinstance(authenticate, KeyAuthenticator) else \
            "no API keys: loopback only"
        if remote is not None:
            mode += f"; sandboxes on the node agents of namespace {settings.namespace}, /v1/run as ComputeJobs " \
                "in the namespaces of the caller's key"
        # The startup heap (FastAPI, pydantic, the SDK's schemas: ~100k objects) is kept for good: out
        # of the collector's sight, a full collection no longer pauses a request for 60-150 ms.
        gc.collect()
        gc.freeze()
        print(f"memoplane serve: listening on http://{host}:{port} ({mode}; OpenAPI at /openapi.json)", flush=True)
        await uvicorn.Server(config).serve(sockets=[sock])


def kubernetes_sessions(settings: ServeSettings, store: str | None) -> SessionManager | None:
    """With MEMOPLANE_SERVE_NAMESPACE: sandboxes on the node agents of that namespace, each shown as a
    Sandbox object there (KUBECONFIG, else in-cluster); None: in this process's own pools."""
    if not settings.namespace:
        return None
    if not settings.session_secret_file:
        raise InputError(f"MEMOPLANE_SERVE_NAMESPACE is set but {SESSION_SECRET_FILE_ENV} is not: the node agents "
                         "start sandboxes only for a holder of the session secret",
                         f"set {SESSION_SECRET_FILE_ENV} to the file the agents have too (the chart does)")
    kube = Kube(load_config())
    return SessionManager(settings, store, Placement(kube, settings.namespace, read_secret(settings.session_secret_file)),
                          SandboxObjects(kube, settings.namespace))


def authenticator(settings: ServeSettings, host: str) -> Authenticate:
    """API keys when the keys file has an active one (any address may then be served), else
    everyone is the local team, on loopback only."""
    keys = ApiKeys(api_keys_path(settings))
    if any(k.revoked is None for k in keys.load().keys.values()):
        return KeyAuthenticator(keys, settings.clock_window)
    require_loopback(host)
    return local_caller


def require_loopback(host: str) -> None:
    """Without API keys anyone who reaches the port runs code: loopback only."""
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        raise InputError(f"--host {host!r} does not resolve", "give a loopback address, e.g. 127.0.0.1") from None
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise InputError(f"--host {host} is not a loopback address and there are no API keys, so anyone "
                         "reaching it could run code", "create one with `memoplane apikey create --team T`, "
                         "or listen on 127.0.0.1 (the default) or ::1")
