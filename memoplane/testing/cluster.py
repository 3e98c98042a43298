"""A local control plane from real components: etcd, kube-apiserver, MinIO and a second S3
server (Versity's gateway, so the store is tested against two S3 implementations) on loopback.

This is controller-runtime's envtest pattern, done in Python so that the test suite, the
`hack/cluster` script and CI share one implementation. `up` is idempotent: a healthy running
set is reused, a crashed earlier set is stopped and replaced. Processes are tracked by pid
files that also record the binary and the kernel's start time of the process, so `down`
never signals an unrelated process that happens to reuse a pid.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

from memoplane.testing import build, node, pidfiles, pki

# Raised here too; callers catch cluster.ClusterError.
from memoplane.testing.pidfiles import ClusterError as ClusterError

_PORT_RANGE = (21000, 29000)  # below the usual ephemeral range (32768+), above well-known ones
_PORT_STRIDE = 16  # a set takes 6 ports (Ports); the rest of a slot holds a second set in tests
_READY_TIMEOUT_S = 90.0
# Start order; `down` stops in reverse (apiserver before the etcd it depends on).
_SERVERS = ("etcd", "minio", "versitygw", "kube-apiserver")
# The S3 servers of a set, all with the same credentials; MinIO is the default (s3_endpoint).
S3_SERVERS = ("minio", "versitygw")


@dataclass(frozen=True)
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    minio: int
    minio_console: int
    versitygw: int

    @classmethod
    def from_base(cls, base: int) -> Ports:
        return cls(base, base + 1, base + 2, base + 3, base + 4, base + 5)

    def all(self) -> list[int]:
        return list(asdict(self).values())


@dataclass(frozen=True)
class ClusterInfo:
    """What a client needs; also written as state.json in the state directory."""

    state_dir: str
    kubeconfig: str
    apiserver_url: str
    token: str
    ca_file: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    ports: Ports
    pids: dict[str, int]
    owner: str = "cli"  # "cli", or "pytest:<pid>" for a set a test session started
    servers: tuple[str, ...] = _SERVERS  # what this set runs (no S3 servers: it uses another set's)
    s3_endpoints: dict[str, str] | None = None  # every S3 server of S3_SERVERS by name
    with_node: bool = False  # a kubelet node runs too (node.SERVERS are in `servers`)

    def env(self, s3_server: str = "minio") -> dict[str, str]:
        """What a client needs, with MEMOPLANE_S3_ENDPOINT naming `s3_server` (one of S3_SERVERS)."""
        return {
            "KUBECONFIG": self.kubeconfig,
            "MEMOPLANE_S3_ENDPOINT": (self.s3_endpoints or {"minio": self.s3_endpoint})[s3_server],
            "MEMOPLANE_S3_ACCESS_KEY": self.s3_access_key,
            "MEMOPLANE_S3_SECRET_KEY": self.s3_secret_key,
        }


@dataclass(frozen=True)
class UpResult:
    info: ClusterInfo
    already_running: bool  # a healthy set from an earlier `up` was reused
    built: list[str]  # components that had to be built (empty: the cache was warm)
    seconds_to_ready: float


def checkout_root() -> Path:
    return build.REPO_ROOT


def state_dir() -> Path:
    """Keyed by checkout, so two checkouts on one machine each get their own cluster."""
    override = os.environ.get("MEMOPLANE_CLUSTER_DIR")
    if override:
        return Path(override).resolve()
    key = hashlib.sha256(str(checkout_root()).encode()).hexdigest()[:12]
    return build.cache_dir() / "clusters" / key


def port_base(directory: Path) -> int:
    """A stable base port derived from the state directory; MEMOPLANE_CLUSTER_PORT_BASE wins."""
    override = os.environ.get("MEMOPLANE_CLUSTER_PORT_BASE")
    if override:
        return int(override)
    slots = (_PORT_RANGE[1] - _PORT_RANGE[0]) // _PORT_STRIDE
    digest = int(hashlib.sha256(str(directory).encode()).hexdigest(), 16)
    return _PORT_RANGE[0] + (digest % slots) * _PORT_STRIDE


# --- processes -------------------------------------------------------------------------



def _running(directory: Path) -> dict[str, bool]:
    """For each server with a pid file: is the recorded process still alive?"""
    result = {}
    for name in (*_SERVERS, *node.SERVERS):
        record = pidfiles.read_record(directory, name)
        if record is not None:
            pidfiles.reap(int(record["pid"]))  # type: ignore[call-overload]
            result[name] = pidfiles.is_ours(record)
    return result


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise up/down on one state directory (two shells, or pytest plus a shell)."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory.parent / f"{directory.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --- health ------------------------------------------------------------------------------


class _Check(NamedTuple):
    url: str
    token: str | None = None
    ca_file: str | None = None


def _ssl_context(ca_file: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_file)


def _http_ok(check: _Check, timeout: float = 2.0) -> bool:
    request = urllib.request.Request(check.url)
    if check.token:
        request.add_header("Authorization", f"Bearer {check.token}")
    context = _ssl_context(check.ca_file) if check.ca_file else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


def _health_checks(info: ClusterInfo) -> dict[str, _Check]:
    return {
        "etcd": _Check(f"http://127.0.0.1:{info.ports.etcd_client}/health"),
        "kube-apiserver": _Check(f"{info.apiserver_url}/readyz", info.token, info.ca_file),
        "minio": _Check(f"{info.s3_endpoint}/minio/health/live"),
        "versitygw": _Check(f"{(info.s3_endpoints or {}).get('versitygw')}{_VERSITYGW_HEALTH}"),
    }


def _unhealthy_after_grace(info: ClusterInfo, grace_s: float = 10.0) -> list[str]:
    """Components still failing their health check after `grace_s` (a busy machine answers
    slowly; a running set must not be thrown away for one slow reply)."""
    deadline = time.monotonic() + grace_s
    while True:
        sick = [name for name, ok in healthy(info).items() if not ok]
        if not sick or time.monotonic() > deadline:
            return sick
        time.sleep(0.5)


def healthy(info: ClusterInfo) -> dict[str, bool]:
    result = {name: _http_ok(check) for name, check in _health_checks(info).items()}
    if info.with_node:
        result.update(node.healthy(Path(info.state_dir), info))
    return result



def _wait_ready(directory: Path, info: ClusterInfo,
                procs: dict[str, subprocess.Popen[bytes]]) -> None:
    pending = dict(_health_checks(info))
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while pending:
        for name in list(pending):
            code = procs[name].poll() if name in procs else None   # another set's MinIO: its health only
            if code is not None:
                raise ClusterError(f"{name} exited with code {code} during startup; last lines "
                                   f"of {directory / 'logs' / (name + '.log')}:\n"
                                   f"{pidfiles.log_tail(directory, name)}")
            if _http_ok(pending[name], timeout=1.0):
                del pending[name]
        if not pending:
            return
        if time.monotonic() > deadline:
            names = ", ".join(sorted(pending))
            tails = "\n".join(f"--- {n}:\n{pidfiles.log_tail(directory, n)}" for n in pending)
            raise ClusterError(f"{names} not ready after {_READY_TIMEOUT_S:.0f}s\n{tails}")
        time.sleep(0.1)


# --- configuration -------------------------------------------------------------------------


def _check_ports_free(ports: Ports, patience: float = 0.0) -> None:
    """Fail naming the first port something listens on. `patience`: how long to wait
    for a just-stopped set to let go (its last threads close its sockets after the
    process already looks dead)."""
    deadline = time.monotonic() + patience
    busy = sorted(set(ports.all()) & _listening_ports())
    while busy and time.monotonic() < deadline:
        time.sleep(0.1)
        busy = sorted(set(ports.all()) & _listening_ports())
    for port in busy:
            raise ClusterError(
                f"port 127.0.0.1:{port} is in use (a process listens on it); ports "
                f"{ports.all()} were derived from this checkout's state directory. Another "
                "process holds it: stop it, or choose other ports with "
                f"MEMOPLANE_CLUSTER_PORT_BASE=<n> (uses n..n+{len(ports.all()) - 1}).")


def _listening_ports() -> set[int]:
    """Local ports with a TCP socket in LISTEN state (IPv4 and IPv6).

    Read from /proc rather than probed with bind(): connections a stopped set closed
    linger in TIME_WAIT, which a bind() probe reports as busy but the servers ignore."""
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _write_kubeconfig(path: Path, server: str, ca_file: str, token: str) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "memoplane-local",
                      "cluster": {"server": server, "certificate-authority": ca_file}}],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "memoplane-local",
                      "context": {"cluster": "memoplane-local", "user": "admin",
                                  "namespace": "default"}}],
        "current-context": "memoplane-local",
    }
    path.write_text(json.dumps(config, indent=2))  # JSON is valid YAML for kubectl
    path.chmod(0o600)


def _apiserver_argv(binary: Path, directory: Path, ports: Ports,
                    keys: dict[str, Path], with_node: bool) -> list[str]:
    return [
        str(binary),
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={ports.apiserver}",
        # Its listener lacks SO_REUSEADDR, so the server side of connections it closed on
        # shutdown (TIME_WAIT, 60 s) would block a restart on the same port; SO_REUSEPORT
        # lets the new one bind. A live listener is still refused by _check_ports_free.
        "--permit-port-sharing=true",
        f"--etcd-servers=http://127.0.0.1:{ports.etcd_client}",
        f"--tls-cert-file={keys['apiserver.crt']}",
        f"--tls-private-key-file={keys['apiserver.key']}",
        f"--client-ca-file={keys['ca.crt']}",
        f"--service-account-key-file={keys['sa.pub']}",
        f"--service-account-signing-key-file={keys['sa.key']}",
        f"--service-account-issuer=https://127.0.0.1:{ports.apiserver}",
        f"--token-auth-file={directory / 'tokens.csv'}",
        # Node: kubelets (group system:nodes) get exactly what their own pods need.
        "--authorization-mode=Node,RBAC",
        "--service-cluster-ip-range=10.0.0.0/24",
        "--allow-privileged=true",
        # Without a node no controller-manager runs, so nothing would create the service accounts
        # this plugin demands; with one, it mounts each pod's projected token.
        *(node.apiserver_flags(directory) if with_node else ["--disable-admission-plugins=ServiceAccount"]),
        # No kube-proxy: don't maintain the `kubernetes` Service's endpoints (its ClusterIP does not
        # route; pods on the node reach the API server on 127.0.0.1, see node.py).
        "--endpoint-reconciler-type=none",
        "--enable-priority-and-fairness=false",
        "--profiling=false",
        "--v=0",
    ]


def _etcd_argv(binary: Path, directory: Path, ports: Ports) -> list[str]:
    client = f"http://127.0.0.1:{ports.etcd_client}"
    peer = f"http://127.0.0.1:{ports.etcd_peer}"
    return [
        str(binary), "--name=memoplane", f"--data-dir={directory / 'data' / 'etcd'}",
        f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=memoplane={peer}",
        # Test data is thrown away at `down`; fsync would only cost time (envtest does this too).
        "--unsafe-no-fsync=true", "--log-level=warn",
    ]


def _minio_argv(binary: Path, directory: Path, ports: Ports) -> list[str]:
    return [str(binary), "server", "--quiet", f"--address=127.0.0.1:{ports.minio}",
            f"--console-address=127.0.0.1:{ports.minio_console}", str(directory / "data" / "minio")]


_VERSITYGW_HEALTH = "/memoplane-health"


def _versitygw_argv(binary: Path, directory: Path, ports: Ports) -> list[str]:
    # Metadata in a sidecar directory rather than xattrs: works on any filesystem (tmpfs, overlay).
    data = directory / "data" / "versitygw"
    return [str(binary), "--quiet", f"--port=127.0.0.1:{ports.versitygw}", f"--health={_VERSITYGW_HEALTH}",
            "posix", f"--sidecar={data / 'meta'}", str(data / "buckets")]


def _prepare(directory: Path, ports: Ports, store: ClusterInfo | None = None) -> tuple[ClusterInfo, dict[str, Path]]:
    """A fresh data dir, keys, token and kubeconfig; returns the cluster's description (with
    `store`: that set's MinIO, not one of its own)."""
    node.ensure_unmounted(directory)
    for sub in ("data", "pki", "pids", "node"):
        shutil.rmtree(directory / sub, ignore_errors=True)
    for stale in ("state.json", "env"):  # written again only once the new set is ready
        (directory / stale).unlink(missing_ok=True)
    for sub in ("data/etcd", "data/minio", "data/versitygw/meta", "data/versitygw/buckets", "pids", "logs"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    (directory / "data" / "etcd").chmod(0o700)  # etcd warns about anything wider
    for log in (directory / "logs").glob("*.log"):
        log.unlink()
    keys = pki.write_pki(directory / "pki")
    token = secrets.token_hex(24)
    tokens = directory / "tokens.csv"
    tokens.write_text(f"{token},admin,admin,system:masters\n")
    tokens.chmod(0o600)
    server = f"https://127.0.0.1:{ports.apiserver}"
    kubeconfig = directory / "kubeconfig"
    _write_kubeconfig(kubeconfig, server, str(keys["ca.crt"]), token)
    info = ClusterInfo(
        state_dir=str(directory), kubeconfig=str(kubeconfig), apiserver_url=server,
        token=token, ca_file=str(keys["ca.crt"]),
        s3_endpoint=f"http://127.0.0.1:{ports.minio}", s3_access_key="memoplane",
        s3_secret_key=secrets.token_hex(20), ports=ports, pids={},
        s3_endpoints={"minio": f"http://127.0.0.1:{ports.minio}",
                      "versitygw": f"http://127.0.0.1:{ports.versitygw}"})
    if store is not None:
        info = ClusterInfo(**{**asdict(info), "ports": ports, "s3_endpoint": store.s3_endpoint,
                              "s3_endpoints": store.s3_endpoints,
                              "s3_access_key": store.s3_access_key, "s3_secret_key": store.s3_secret_key,
                              "servers": tuple(n for n in _SERVERS if n not in S3_SERVERS)})
    return info, keys


def _save_info(directory: Path, info: ClusterInfo) -> None:
    path = directory / "state.json"
    path.write_text(json.dumps(asdict(info), indent=2))
    path.chmod(0o600)


def load_info(directory: Path | None = None) -> ClusterInfo | None:
    try:
        raw = json.loads(((directory or state_dir()) / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    raw["ports"] = Ports(**raw["ports"])
    raw["servers"] = tuple(raw.get("servers", _SERVERS))
    raw["with_node"] = bool(raw.get("with_node", False))
    return ClusterInfo(**raw)


# --- commands ----------------------------------------------------------------------------


def _stop_all(directory: Path) -> None:
    node.stop(directory)
    for name in reversed(_SERVERS):
        pidfiles.stop(directory, name)


def up(directory: Path | None = None, owner: str = "cli", store: ClusterInfo | None = None,
       with_node: bool = False) -> UpResult:
    """Bring the control plane up, or return the healthy one already running here. `store`:
    another set whose MinIO this one uses (a second cluster sharing an object store) instead of
    starting its own. `with_node`: a kubelet node too (node.py); a running set without one is
    replaced."""
    directory = directory or state_dir()
    started = time.monotonic()
    versions = build.load_versions()
    # helm is built by `build` for charts, but the servers are all that `up` needs.
    needed = (*_SERVERS, *build.NODE_COMPONENTS) if with_node else _SERVERS
    missing = [c for c in needed if not build.binary_path(c, versions).exists()]
    binaries = build.ensure_all(needed)
    with _locked(directory):
        running = _running(directory)
        info = load_info(directory)
        if info and running and all(running.get(n) for n in info.servers) and info.with_node >= with_node:
            sick = _unhealthy_after_grace(info)
            if not sick:
                return UpResult(info, True, missing, time.monotonic() - started)
            build._log(f"an earlier run in {directory} is not healthy ({', '.join(sick)})")
        if running:
            build._log(f"cleaning up an earlier run in {directory} "
                       f"(alive: {sorted(n for n, ok in running.items() if ok) or 'none'})")
            _stop_all(directory)
        ports = Ports.from_base(port_base(directory))
        _check_ports_free(ports, patience=10.0 if running else 0.0)
        info, keys = _prepare(directory, ports, store)
        minio_env = {"MINIO_ROOT_USER": info.s3_access_key,
                     "MINIO_ROOT_PASSWORD": info.s3_secret_key,
                     "MINIO_BROWSER": "off", "MINIO_UPDATE": "off"}
        versitygw_env = {"ROOT_ACCESS_KEY_ID": info.s3_access_key, "ROOT_SECRET_ACCESS_KEY": info.s3_secret_key}
        argvs = {"etcd": (_etcd_argv(binaries["etcd"], directory, ports), None),
                 "minio": (_minio_argv(binaries["minio"], directory, ports), minio_env),
                 "versitygw": (_versitygw_argv(binaries["versitygw"], directory, ports), versitygw_env),
                 "kube-apiserver": (_apiserver_argv(binaries["kube-apiserver"], directory, ports, keys, with_node),
                                    None)}
        # The apiserver retries etcd until it answers, so all start at once.
        procs = {name: pidfiles.spawn(directory, name, *argvs[name]) for name in info.servers}
        info = ClusterInfo(**{**asdict(info), "ports": ports, "owner": owner,
                              "pids": {n: p.pid for n, p in procs.items()}})
        try:
            _wait_ready(directory, info, procs)
            if with_node:
                pids = node.start(directory, info)
                info = replace(info, with_node=True, servers=(*info.servers, *node.SERVERS),
                               pids={**info.pids, **pids})
        except BaseException:
            _stop_all(directory)
            raise
        _save_info(directory, info)
        (directory / "env").write_text(env_script(info))
        return UpResult(info, False, missing, time.monotonic() - started)


def down(directory: Path | None = None) -> list[str]:
    """Stop the processes `up` started (by pid file only) and remove the state directory."""
    directory = directory or state_dir()
    if not directory.exists():
        return []
    with _locked(directory):
        stopped = [n for n, alive in _running(directory).items() if alive]
        _stop_all(directory)
        node.ensure_unmounted(directory)
        shutil.rmtree(directory, ignore_errors=True)
    (directory.parent / f"{directory.name}.lock").unlink(missing_ok=True)
    return stopped


def status(directory: Path | None = None) -> dict[str, dict[str, object]]:
    directory = directory or state_dir()
    info = load_info(directory)
    running = _running(directory)
    health = healthy(info) if info else {}
    return {name: {"pid": (info.pids.get(name) if info else None),
                   "running": running.get(name, False),
                   "healthy": health.get(name, False)} for name in (info.servers if info else _SERVERS)}


def orphaned_by_test_session(info: ClusterInfo) -> bool:
    """True if a test session started this set and died without stopping it."""
    kind, _, pid = info.owner.partition(":")
    return kind == "pytest" and not Path(f"/proc/{pid}").exists()


def env_script(info: ClusterInfo) -> str:
    return "".join(f"export {k}='{v}'\n" for k, v in info.env().items())


def rss_kib(info: ClusterInfo) -> dict[str, int]:
    """Resident memory of each running server, from /proc (VmRSS)."""
    result = {}
    for name, pid in info.pids.items():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    result[name] = int(line.split()[1])
        except FileNotFoundError:
            result[name] = 0
    return result
