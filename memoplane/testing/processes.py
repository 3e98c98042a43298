"""The operator and node agents as local processes, for `hack/cluster up --with-memoplane`
and the integration tests: a Kubernetes-free stand-in for the Deployment and the DaemonSet.

Processes are tracked with the same pid records as the control plane (binary + kernel
start time), so stopping one never signals an unrelated process that reused its pid.
Each process gets its own log under <directory>/logs and its HTTP ports on loopback.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from memoplane.cluster.agentkeys import ClusterKeys
from memoplane.settings import (
    API_KEYS_ENV,
    CREDENTIAL_FILES,
    CREDENTIALS_ENV,
    KEY_ENVS,
    NODE_KEY_DIR_ENV,
    SESSION_SECRET_FILE_ENV,
    SIGNING_KEY_FILE_ENV,
    SIGNING_KEYID_ENV,
)
from memoplane.testing import cluster, pidfiles
from memoplane.trust import PublicKey, SigningKey
from memoplane.trust.nodekey import node_key

OPERATOR = "memoplane-operator"
AGENT_PREFIX = "memoplane-agent-"
API = "memoplane-api"
READY_TIMEOUT_S = 90.0
CRDS_DIR = cluster.checkout_root() / "crds"


# What `hack/cluster up --with-memoplane` watches: every namespace but those of test
# sessions sharing the API server (their own stacks: mpt-*; CRD and smoke tests: crds-*,
# smoke-*, which write ComputeJob status themselves). MEMOPLANE_WATCH_NAMESPACES overrides.
DEV_WATCH_NAMESPACES = "*,!mpt-*,!crds-*,!smoke-*"


def dev_watch_namespaces() -> str:
    return os.environ.get("MEMOPLANE_WATCH_NAMESPACES") or DEV_WATCH_NAMESPACES


class ProcessError(RuntimeError):
    """A memoplane process did not start or stop; the message carries its log tail."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    name: str
    pid: int
    ports: dict[str, int]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def url(self, port: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[port]}{path}"


@dataclass
class StackConfig:
    """What the processes share: the API server, the store, the scope."""

    directory: Path
    env: Mapping[str, str]                 # KUBECONFIG, MEMOPLANE_S3_* (ClusterInfo.env())
    watch_namespaces: str = ""             # kopf patterns (space separated); "" = all
    lease_namespace: str = "memoplane-system"
    capacity: int = 2
    extra_env: Mapping[str, str] = field(default_factory=dict)

    def process_env(self) -> dict[str, str]:
        return {**self.env, "MEMOPLANE_WATCH_NAMESPACES": self.watch_namespaces,
                "MEMOPLANE_NAMESPACE": self.lease_namespace, "PYTHONUNBUFFERED": "1", **self.extra_env}


def _record_path(directory: Path, name: str) -> Path:
    return directory / "pids" / f"{name}.json"


def _save(directory: Path, proc: Proc) -> None:
    path = _record_path(directory, proc.name)
    record = json.loads(path.read_text())
    record["ports"] = proc.ports
    path.write_text(json.dumps(record))


def _spawn(cfg: StackConfig, name: str, argv: list[str], env: dict[str, str], ports: dict[str, int]) -> Proc:
    for sub in ("pids", "logs"):
        (cfg.directory / sub).mkdir(parents=True, exist_ok=True)
    popen = pidfiles.spawn(cfg.directory, name, argv, env)
    proc = Proc(name, popen.pid, ports, cfg.directory / "logs" / f"{name}.log", popen)
    _save(cfg.directory, proc)
    return proc


def log_tail(proc: Proc, lines: int = 40) -> str:
    try:
        return "".join(proc.log.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except FileNotFoundError:
        return "(no log)"


def alive(directory: Path, name: str) -> bool:
    record = pidfiles.read_record(directory, name)
    if record is None:
        return False
    pidfiles.reap(int(record["pid"]))  # type: ignore[call-overload]
    return pidfiles.is_ours(record)


def _get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(exc)


def wait_ready(directory: Path, proc: Proc, url: str, timeout: float = READY_TIMEOUT_S,
               ready: int = 200) -> None:
    """Until `url` answers `ready` (an API with keys answers 401 to anyone without one)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        # Our own child: poll() (right after fork, /proc still shows the parent's argv).
        exited = proc.popen.poll() is not None if proc.popen is not None else not alive(directory, proc.name)
        if exited:
            raise ProcessError(f"{proc.name} exited during startup; last lines of {proc.log}:\n{log_tail(proc)}")
        code, body = _get(url)
        if code == ready:
            return
        last = body.strip()
        time.sleep(0.2)
    raise ProcessError(f"{proc.name} not ready after {timeout:.0f}s ({last}); last lines of {proc.log}:\n"
                       f"{log_tail(proc)}")


OPERATOR_KEYID = "local-agents-1"   # the id it had when the agents shared it: what it signed then stays trusted
NODE_KEYS = "node-keys"


def operator_key(directory: Path) -> SigningKey:
    """The stack's operator signing key, as the chart makes one at install: generated on first
    use into a 0600 file under `directory` (0700) and kept, so a restarted stack's operator keeps
    the key its caches trust."""
    path = directory / "signing" / "private.pem"
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, SigningKey.generate(OPERATOR_KEYID).pem())
        finally:
            os.close(fd)
    return SigningKey.parse(OPERATOR_KEYID, path.read_bytes())


def signing_env(cfg: StackConfig) -> dict[str, str]:
    operator_key(cfg.directory)
    return {SIGNING_KEY_FILE_ENV: str(cfg.directory / "signing" / "private.pem"), SIGNING_KEYID_ENV: OPERATOR_KEYID}


def node_key_dir(directory: Path, node: str) -> Path:
    """Where the stack's agent of `node` keeps its own key (as a hostPath on the node would)."""
    return directory / NODE_KEYS / node


def agent_key(directory: Path, node: str) -> PublicKey:
    """The public key the stack's agent of `node` signs with (made by the agent on its first start)."""
    return node_key(node_key_dir(directory, node), node).public


def cluster_keys(directory: Path) -> ClusterKeys:
    """What `trust.clusterAgents` trusts in the stack: its operator's key and the key of every
    agent that has started (as the operator learns them from the Leases)."""
    nodes = sorted(d.name for d in (directory / NODE_KEYS).iterdir()) if (directory / NODE_KEYS).is_dir() else []
    return ClusterKeys(operator_key(directory).public, tuple(agent_key(directory, node) for node in nodes))


def session_secret(directory: Path) -> Path:
    """The stack's session secret (the API's and the agents', as the chart's Secret): made on first
    use into a 0600 file under `directory` and kept."""
    path = directory / "sessions" / "secret"
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, secrets.token_hex(32).encode())
        finally:
            os.close(fd)
    return path


def start_api(cfg: StackConfig, wait: bool = True, api_keys: Path | None = None) -> Proc:
    """`memoplane serve` as the chart's api Deployment runs it: sandboxes on the stack's agents, shown as
    Sandbox objects in the agents' namespace; no API keys, so on loopback only (its own keys directory),
    unless `api_keys` names a keys file."""
    ports = {"http": free_port()}
    env = {**cfg.process_env(), "MEMOPLANE_SERVE_NAMESPACE": cfg.lease_namespace,
           SESSION_SECRET_FILE_ENV: str(session_secret(cfg.directory)),
           "MEMOPLANE_STORE": str(cfg.directory / "api" / "store"), "MEMOPLANE_KEYS_DIR": str(cfg.directory / "api" / "keys")}
    if api_keys is not None:
        env[API_KEYS_ENV] = str(api_keys)
    argv = [sys.executable, "-m", "memoplane.cli", "serve", "--host", "127.0.0.1", "--port", str(ports["http"])]
    proc = _spawn(cfg, API, argv, env, ports)
    if wait:
        wait_ready(cfg.directory, proc, proc.url("http", "/openapi.json"), ready=200 if api_keys is None else 401)
    return proc


def start_operator(cfg: StackConfig, wait: bool = True) -> Proc:
    ports = {"metrics": free_port(), "health": free_port()}
    env = {**cfg.process_env(), "MEMOPLANE_METRICS_PORT": str(ports["metrics"]),
           "MEMOPLANE_HEALTH_PORT": str(ports["health"]), **signing_env(cfg)}
    proc = _spawn(cfg, OPERATOR, [sys.executable, "-m", "memoplane_operator"], env, ports)
    if wait:
        wait_ready(cfg.directory, proc, proc.url("health", "/healthz"))
    return proc


def agent_credentials(cfg: StackConfig) -> dict[str, str]:
    """The store keys as the chart gives them to agents: files readable by us only (0600 in a
    0700 directory under cfg.directory), with the key variables blanked (the agent inherits our
    environment, which may hold them). Nothing for a store without keys (MEMOPLANE_STORE_ROOT)."""
    keys = [cfg.env.get(name) for name in KEY_ENVS]
    if not all(keys):
        return {}
    directory = cfg.directory / "s3-credentials"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    for name, key in zip(CREDENTIAL_FILES, keys, strict=True):
        fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, f"{key}\n".encode())
        finally:
            os.close(fd)
    return {CREDENTIALS_ENV: str(directory), **{name: "" for name in KEY_ENVS}}


def start_agent(cfg: StackConfig, node: str, wait: bool = True, argv: list[str] | None = None) -> Proc:
    """`argv`: another program than the agent (a test agent that wraps it)."""
    ports = {"http": free_port()}
    env = {**cfg.process_env(), "NODE_NAME": node, "MEMOPLANE_HTTP_HOST": "127.0.0.1",
           "MEMOPLANE_HTTP_PORT": str(ports["http"]), "MEMOPLANE_CAPACITY": str(cfg.capacity),
           "MEMOPLANE_LOCAL_CACHE": str(cfg.directory / "node-cache" / node), **agent_credentials(cfg),
           NODE_KEY_DIR_ENV: str(node_key_dir(cfg.directory, node)),
           SESSION_SECRET_FILE_ENV: str(session_secret(cfg.directory)), "MEMOPLANE_SESSION_HOST": "127.0.0.1",
           "MEMOPLANE_SESSION_PORT": "0", "MEMOPLANE_SESSION_WARM": "1"}   # one warm child: tests share the machine
    proc = _spawn(cfg, AGENT_PREFIX + node, argv or [sys.executable, "-m", "memoplane_agent"], env, ports)
    if wait:
        wait_ready(cfg.directory, proc, proc.url("http", "/readyz"))
    return proc


def stop(directory: Path, name: str) -> None:
    """SIGTERM (the process drains), then SIGKILL; only the recorded process."""
    pidfiles.stop(directory, name)


def kill(directory: Path, name: str) -> None:
    """SIGKILL at once (a crash): the process gets no chance to clean up."""
    record = pidfiles.read_record(directory, name)
    if record is None or not pidfiles.is_ours(record):
        return
    pid = int(record["pid"])  # type: ignore[call-overload]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pidfiles.is_ours(record) and time.monotonic() < deadline:
        pidfiles.reap(pid)
        time.sleep(0.05)
    _record_path(directory, name).unlink(missing_ok=True)


def names(directory: Path) -> list[str]:
    pids = directory / "pids"
    if not pids.is_dir():
        return []
    return sorted(p.stem for p in pids.glob("memoplane-*.json"))


def load(directory: Path, name: str) -> Proc | None:
    record = pidfiles.read_record(directory, name)
    if record is None:
        return None
    return Proc(name, int(record["pid"]), dict(record.get("ports") or {}),  # type: ignore[call-overload]
                directory / "logs" / f"{name}.log")


def apply_crds(env: Mapping[str, str]) -> None:
    kubeconfig = env["KUBECONFIG"]
    for args in (["apply", "-f", str(CRDS_DIR)],
                 ["wait", "--for=condition=Established", "--timeout=60s", "-f", str(CRDS_DIR)]):
        proc = subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", *args], capture_output=True, text=True,
                              timeout=90)
        if proc.returncode != 0:
            raise ProcessError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")


def up(cfg: StackConfig, nodes: tuple[str, ...] = ("node-a", "node-b"), api: bool = False) -> list[Proc]:
    """CRDs applied, then the operator, one agent per node and (`api`) the agent API, each waited for
    (idempotent)."""
    apply_crds(cfg.env)
    started = []
    if not alive(cfg.directory, OPERATOR):
        started.append(start_operator(cfg, wait=False))
    for node in nodes:
        if not alive(cfg.directory, AGENT_PREFIX + node):
            started.append(start_agent(cfg, node, wait=False))
    if api and not alive(cfg.directory, API):
        started.append(start_api(cfg, wait=False))
    ready = {OPERATOR: ("health", "/healthz"), API: ("http", "/openapi.json")}
    try:
        for proc in started:
            port, path = ready.get(proc.name, ("http", "/readyz"))
            wait_ready(cfg.directory, proc, proc.url(port, path))
    except ProcessError:
        down(cfg.directory)
        raise
    return started


def down(directory: Path) -> list[str]:
    """Stop every memoplane process recorded under `directory` (the operator last)."""
    stopped = []
    for name in sorted(names(directory), key=lambda n: n == OPERATOR):
        if alive(directory, name):
            stopped.append(name)
        stop(directory, name)
    return stopped
