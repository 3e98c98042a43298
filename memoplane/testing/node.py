"""A real node for the local control plane (`hack/cluster up --with-node`): kube-controller-manager,
kube-scheduler, containerd + runc and a kubelet, all as plain processes with every path under the
cluster's state directory and every port on loopback.

Why this configuration (this machine; see hack/README.md "The node" for the errors each fixes):
- cgroup v1 with the cgroupfs driver. The kernel (6.18) mounts the v1 controllers (cpu, cpuacct,
  cpuset, memory, devices, freezer, blkio, pids, name=systemd) as separate hierarchies; the cgroup2
  mount at /sys/fs/cgroup/unified holds only hugetlb, and our own memory cgroup pins the memory
  controller to v1, so it cannot be moved to v2. No systemd runs, hence cgroupfs (and runc's
  SystemdCgroup=false). kubelet 1.35+ refuses cgroup v1 unless `failCgroupV1: false` (KEP-5573).
- containerd 2.3 (kubelet 1.36 no longer supports containerd 1.x, so Debian's 1.6 will not do) and
  runc 1.4 are built from the module proxy; both still support cgroup v1.
- The kubelet's pods live under a cgroup root of their own (`/memoplane-node-<key>`, created here
  in every v1 hierarchy), so `down` can find and kill whatever a container left behind and remove
  the cgroups it made.
- No image can be pulled: the sandbox image is built locally (node_images) and pinned in
  containerd's CRI config; pods use `imagePullPolicy: Never`.
- Pods use hostNetwork. There is no kube-proxy, so the `kubernetes` Service's ClusterIP does not
  route: a pod that talks to the API server sets KUBERNETES_SERVICE_HOST=127.0.0.1 and
  KUBERNETES_SERVICE_PORT=<apiserver port> (the serving certificate is valid for 127.0.0.1).
  containerd reports NetworkReady only with a CNI config, so one (the loopback plugin) is written.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from memoplane.testing import build, node_images, pidfiles, pki

NODE_NAME = "memoplane-node"
# Start order; `stop` goes in reverse, but kills the pods first (see stop()).
SERVERS = ("containerd", "kube-controller-manager", "kube-scheduler", "kubelet")
_READY_TIMEOUT_S = 180.0
_NODE_PORT_OFFSET = 12  # after the control plane's Ports and a second set's (cluster._PORT_STRIDE)
_CGROUP_ROOT = Path("/sys/fs/cgroup")
_MNT_DETACH = 2
# The kubelet links each container's log here whatever podLogsDir says (a constant in its code).
_CONTAINER_LOG_LINKS = Path("/var/log/containers")


class NodeError(pidfiles.ClusterError):
    """The node cannot start or stop cleanly; the message names the component and its log."""


class _Ports(Protocol):
    @property
    def etcd_client(self) -> int: ...


class ClusterInfo(Protocol):
    """What the node needs of the control plane (cluster.ClusterInfo, which imports this module)."""

    @property
    def kubeconfig(self) -> str: ...
    @property
    def apiserver_url(self) -> str: ...
    @property
    def ports(self) -> _Ports: ...


@dataclass(frozen=True)
class NodePorts:
    kubelet: int
    kubelet_healthz: int
    controller_manager: int
    scheduler: int

    @classmethod
    def from_base(cls, base: int) -> NodePorts:
        first = base + _NODE_PORT_OFFSET
        return cls(first, first + 1, first + 2, first + 3)

    def all(self) -> list[int]:
        return list(asdict(self).values())


@dataclass(frozen=True)
class NodePaths:
    """Every file and directory of the node, under <state dir>/node."""

    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def bin(self) -> Path:  # plain-named links to the cached binaries: containerd finds its shim on PATH
        return self.root / "bin"

    @property
    def containerd(self) -> Path:
        return self.root / "containerd"

    @property
    def socket(self) -> Path:
        return self.containerd / "containerd.sock"

    @property
    def cni_bin(self) -> Path:
        return self.root / "cni" / "bin"

    @property
    def cni_conf(self) -> Path:
        return self.root / "cni" / "net.d"

    @property
    def kubelet(self) -> Path:
        return self.root / "kubelet"

    @property
    def images(self) -> Path:
        return self.root / "images"


def paths(directory: Path) -> NodePaths:
    return NodePaths(directory / "node")


def cgroup_name(directory: Path) -> str:
    """The kubelet's cgroup root: one per state directory, so two checkouts never share one."""
    return "memoplane-node-" + hashlib.sha256(str(directory).encode()).hexdigest()[:12]


# --- configuration ---------------------------------------------------------------------------


def _kubeconfig(path: Path, server: str, ca: Path, cert: Path, key: Path) -> Path:
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": "user", "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": "user"}}],
        "current-context": "local",
    }
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)
    return path


def apiserver_flags(directory: Path) -> list[str]:
    """What the API server needs for a node: a client certificate for kubelets (logs, exec) and
    the CA that signed the kubelet's serving certificate. Call after cluster's PKI exists."""
    keys = directory / "pki"
    cert, key = pki.issue(keys, "apiserver-kubelet-client", "kube-apiserver-kubelet-client",
                          group="system:masters")
    return [f"--kubelet-client-certificate={cert}", f"--kubelet-client-key={key}",
            f"--kubelet-certificate-authority={keys / 'ca.crt'}",
            "--kubelet-preferred-address-types=InternalIP"]


def _containerd_config(p: NodePaths) -> str:
    runc = p.bin / "runc"
    state = p.containerd / "state"
    # TOML, config version 4 (containerd 2.3's own; `containerd config default` shows every key).
    # Nothing may default to /run, /var/lib, /opt or /etc: no host config is imported.
    return f"""version = 4
root = "{p.containerd / 'root'}"
state = "{state}"
imports = []
disabled_plugins = ["io.containerd.nri.v1.nri", "io.containerd.internal.v1.tracing"]

[plugins."io.containerd.server.v1.grpc"]
  address = "{p.socket}"
[plugins."io.containerd.server.v1.ttrpc"]
  address = "{p.socket}.ttrpc"
[plugins."io.containerd.server.v1.debug"]
  address = ""
[plugins."io.containerd.server.v1.metrics"]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{p.containerd / 'opt'}"

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{node_images.PAUSE_IMAGE}"

[plugins."io.containerd.cri.v1.runtime"]
  netns_mounts_under_state_dir = true
  # We run without CAP_SYS_RESOURCE, so runc may not lower a process's oom_score_adj (the kubelet
  # asks -998 for sandboxes: "failed to update /proc/self/oom_score_adj: Permission denied");
  # this clamps what pods ask for to containerd's own score.
  restrict_oom_score_adj = true
  cdi_spec_dirs = ["{p.containerd / 'cdi'}"]
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        Root = "{state / 'runc'}"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{p.cni_bin}"]
    conf_dir = "{p.cni_conf}"
"""


_CNI_CONF = {"cniVersion": "1.0.0", "name": "memoplane-loopback", "plugins": [{"type": "loopback"}]}


def _kubelet_config(p: NodePaths, ports: NodePorts, cgroup: str, serving: tuple[Path, Path]) -> dict[str, object]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        # This host has cgroup v1 only (see the module docstring); kubelet 1.35+ needs the opt-in.
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{cgroup}",
        "containerRuntimeEndpoint": f"unix://{p.socket}",
        "address": "127.0.0.1", "port": ports.kubelet, "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1", "healthzPort": ports.kubelet_healthz,
        "tlsCertFile": str(serving[0]), "tlsPrivateKeyFile": str(serving[1]),
        # The API server's own client cert (logs, exec) and bearer tokens (webhook) are accepted;
        # every request is authorized by the API server (SubjectAccessReview).
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(p.root.parent / "pki" / "ca.crt")}},
        "authorization": {"mode": "Webhook"},
        "failSwapOn": False,
        # A shared, fairly full disk: evict only when it is really out of space.
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                         "nodefs.inodesFree": "1%"},
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        "podLogsDir": str(p.kubelet / "pod-logs"),
        "volumePluginDir": str(p.kubelet / "volume-plugins"),  # default: /usr/libexec/kubernetes/...
        "registerNode": True,
        "serializeImagePulls": False,
        "nodeStatusUpdateFrequency": "5s",
    }


def _link_binaries(p: NodePaths, versions: build.Versions) -> None:
    p.bin.mkdir(parents=True, exist_ok=True)
    p.cni_bin.mkdir(parents=True, exist_ok=True)
    links = {p.bin / c: build.binary_path(c, versions) for c in (*build.CONTAINERD_COMMANDS, "runc")}
    links[p.cni_bin / "loopback"] = build.binary_path("cni-loopback", versions)
    for link, target in links.items():
        link.unlink(missing_ok=True)
        link.symlink_to(target)


def _make_cgroup_root(name: str) -> None:
    """Create /<name> in every v1 hierarchy; a new cpuset starts empty, so copy the parent's."""
    for hierarchy in sorted(_CGROUP_ROOT.iterdir()):
        if not (hierarchy / "cgroup.procs").exists() or hierarchy.name == "unified":
            continue
        group = hierarchy / name
        group.mkdir(exist_ok=True)
        for setting in ("cpuset.cpus", "cpuset.mems"):
            if (group / setting).exists() and not (group / setting).read_text().strip():
                (group / setting).write_text((hierarchy / setting).read_text())


def _write_files(directory: Path, info: ClusterInfo, ports: NodePorts, versions: build.Versions) -> dict[str, Path]:
    """Certificates, kubeconfigs, cgroup root and configuration files; returns the kubeconfig of
    each server and the kubelet's configuration file ("kubelet-config")."""
    p = paths(directory)
    for sub in (p.pki, p.containerd, p.cni_conf, p.kubelet, p.images):
        sub.mkdir(parents=True, exist_ok=True)
    _link_binaries(p, versions)
    cluster_pki = directory / "pki"
    ca = cluster_pki / "ca.crt"
    server = info.apiserver_url
    kubeconfigs = {}
    for name, user, group in (("kube-controller-manager", "system:kube-controller-manager", None),
                              ("kube-scheduler", "system:kube-scheduler", None),
                              ("kubelet", f"system:node:{NODE_NAME}", "system:nodes")):
        cert, key = pki.issue(cluster_pki, name, user, group=group)
        kubeconfigs[name] = _kubeconfig(p.root / f"{name}.kubeconfig", server, ca, cert, key)
    serving = pki.issue(cluster_pki, "kubelet-serving", NODE_NAME, serving_ips=["127.0.0.1"])
    cgroup = cgroup_name(directory)
    _make_cgroup_root(cgroup)
    (p.containerd / "config.toml").write_text(_containerd_config(p))
    (p.cni_conf / "10-loopback.conflist").write_text(json.dumps(_CNI_CONF))
    kubelet_config = p.root / "kubelet-config.json"  # JSON is valid YAML for the kubelet
    kubelet_config.write_text(json.dumps(_kubelet_config(p, ports, cgroup, serving), indent=2))
    return {**kubeconfigs, "kubelet-config": kubelet_config}


def _containerd_argv(directory: Path) -> tuple[list[str], dict[str, str]]:
    """containerd's argv and environment (its config is written by _write_files)."""
    p = paths(directory)
    path_env = {"PATH": f"{p.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    binary = build.binary_path("containerd", build.load_versions())
    return [str(binary), f"--config={p.containerd / 'config.toml'}", "--log-level=info"], path_env


def _argvs(directory: Path, info: ClusterInfo, ports: NodePorts) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Write the node's files and return each server's argv and extra environment."""
    versions = build.load_versions()
    p = paths(directory)
    files = _write_files(directory, info, ports, versions)
    kubeconfigs, kubelet_config, ca = files, files["kubelet-config"], directory / "pki" / "ca.crt"
    path_env = {"PATH": f"{p.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    common = ["--bind-address=127.0.0.1", "--leader-elect=false", f"--cert-dir={p.pki}"]
    return {
        "containerd": _containerd_argv(directory),
        "kube-controller-manager": ([
            str(build.binary_path("kube-controller-manager", versions)),
            f"--kubeconfig={kubeconfigs['kube-controller-manager']}",
            f"--authentication-kubeconfig={kubeconfigs['kube-controller-manager']}",
            f"--authorization-kubeconfig={kubeconfigs['kube-controller-manager']}",
            f"--secure-port={ports.controller_manager}", *common,
            # Token controller signs with the API server's key; root-ca publisher -> kube-root-ca.crt.
            f"--service-account-private-key-file={directory / 'pki' / 'sa.key'}", f"--root-ca-file={ca}",
            "--use-service-account-credentials=true", "--controllers=*",
        ], {}),
        "kube-scheduler": ([
            str(build.binary_path("kube-scheduler", versions)),
            f"--kubeconfig={kubeconfigs['kube-scheduler']}",
            f"--authentication-kubeconfig={kubeconfigs['kube-scheduler']}",
            f"--authorization-kubeconfig={kubeconfigs['kube-scheduler']}",
            f"--secure-port={ports.scheduler}", *common,
        ], {}),
        "kubelet": ([
            str(build.binary_path("kubelet", versions)), f"--config={kubelet_config}",
            f"--kubeconfig={kubeconfigs['kubelet']}", f"--hostname-override={NODE_NAME}",
            "--node-ip=127.0.0.1", f"--root-dir={p.kubelet / 'root'}", "--v=1",
        ], path_env),
    }


# --- images ----------------------------------------------------------------------------------


def _ctr(directory: Path, *args: str, timeout: float = 300.0) -> str:
    argv = [str(paths(directory).bin / "ctr"), f"--address={paths(directory).socket}", "--namespace=k8s.io", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise NodeError(f"ctr {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def _archive_digests(archive: Path) -> list[str]:
    """The manifest digests an OCI archive's index.json lists."""
    import tarfile

    with tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        if member is None:
            raise NodeError(f"{archive} has no index.json: not an OCI archive (OCI image layout as a tar)")
        index = json.loads(member.read())
    return [str(m["digest"]) for m in index.get("manifests", [])]


def images(directory: Path) -> dict[str, str]:
    """Image name -> digest, as containerd's k8s.io namespace (the kubelet's) has them."""
    result = {}
    for line in _ctr(directory, "images", "ls").splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 3:
            result[fields[0]] = fields[2]
    return result


def _check_image_name(name: str) -> str:
    """The repository part of `name`, which must be a full name with a tag."""
    repository, _, tag = name.rpartition(":")
    if not repository or not tag or "/" in tag:
        raise NodeError(f"image name {name!r}: give a full name with a tag, e.g. memoplane.local/memoplane:dev")
    return repository


def import_image(directory: Path, archive: Path, name: str | None = None) -> str:
    """Import an OCI archive (`*.oci.tar`, an OCI image layout as a tar) into the node's
    containerd, for the kubelet (namespace k8s.io), and return the image's name. Idempotent by
    digest: an image of that name with the archive's digest is left alone. `name`: the image's
    full name when the archive's index names only a tag (umoci writes the tag as
    org.opencontainers.image.ref.name); without it the archive's io.containerd.image.name is used."""
    repository = _check_image_name(name) if name is not None else None
    digests = _archive_digests(archive)
    if len(digests) != 1:
        raise NodeError(f"{archive}: expected one manifest in index.json, found {len(digests)}")
    have = images(directory)
    args = ["images", "import", "--platform=linux/amd64"]
    if name is not None:
        if have.get(name) == digests[0]:
            return name
        args.append(f"--base-name={repository}")
    elif digests[0] in have.values():
        return next(n for n, d in have.items() if d == digests[0])
    _ctr(directory, *args, str(archive))
    after = images(directory)
    imported = [n for n, d in after.items() if d == digests[0] and (name is None or n == name)]
    if not imported:
        raise NodeError(f"ctr imported {archive} but no image has its digest {digests[0]} "
                        f"(images: {sorted(after)}); name it with name='<registry>/<repo>:<tag>'")
    return imported[0]


# --- processes -------------------------------------------------------------------------------


def _insecure_ok(url: str) -> bool:
    """Health of a server with a self-signed loopback certificate (controller-manager, scheduler)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=2.0, context=context) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


def _server_healthy(directory: Path, name: str, ports: NodePorts) -> bool:
    if name == "containerd":
        return paths(directory).socket.is_socket()
    url = {"kube-controller-manager": f"https://127.0.0.1:{ports.controller_manager}/healthz",
           "kube-scheduler": f"https://127.0.0.1:{ports.scheduler}/healthz",
           "kubelet": f"http://127.0.0.1:{ports.kubelet_healthz}/healthz"}[name]
    return _insecure_ok(url)


def _kubectl(info: ClusterInfo, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["kubectl", f"--kubeconfig={info.kubeconfig}", *args], capture_output=True, text=True,
                          timeout=60)


def _set_loopback_address(info: ClusterInfo) -> None:
    """Give the node the address 127.0.0.1, where its kubelet listens (logs, exec, port-forward).

    The kubelet refuses to report a loopback node IP ("failed to validate nodeIP: nodeIP can't be
    loopback address", logged at each status update) and so leaves the addresses alone; without
    --node-ip it would report the host's own address, where nothing of ours listens. So we set
    them once, and the kubelet's status patches never touch them again."""
    addresses = [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": NODE_NAME}]
    out = _kubectl(info, "patch", "node", NODE_NAME, "--subresource=status", "--type=merge",
                   "-p", json.dumps({"status": {"addresses": addresses}}))
    if out.returncode != 0:
        raise NodeError(f"cannot set node {NODE_NAME}'s address: {out.stderr.strip()}")


def node_conditions(info: ClusterInfo) -> dict[str, str]:
    """The node's conditions (type -> status), {} while it is not registered."""
    out = _kubectl(info, "get", "node", NODE_NAME, "-o", "json")
    if out.returncode != 0:
        return {}
    return {c["type"]: c["status"] for c in json.loads(out.stdout)["status"].get("conditions", [])}


def _wait(directory: Path, what: str, ready: Callable[[], bool], procs: dict[str, subprocess.Popen[bytes]],
          timeout: float = _READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for name, proc in procs.items():
            code = proc.poll()
            if code is not None:
                raise NodeError(f"{name} exited with code {code} while waiting for {what}; last lines of "
                                f"{directory / 'logs' / (name + '.log')}:\n{pidfiles.log_tail(directory, name)}")
        if ready():
            return
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {n}:\n{pidfiles.log_tail(directory, n, 15)}" for n in procs)
            raise NodeError(f"{what} not within {timeout:.0f}s\n{tails}")
        time.sleep(0.5)


def start(directory: Path, info: ClusterInfo) -> dict[str, int]:
    """Start the node on the running control plane `info`; returns the pids. The caller owns
    the state directory's lock; on failure everything started here is stopped again."""
    build.ensure_all(build.NODE_COMPONENTS)
    ports = NodePorts.from_base(info.ports.etcd_client)
    argvs = _argvs(directory, info, ports)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        procs["containerd"] = pidfiles.spawn(directory, "containerd", *argvs["containerd"])
        _wait(directory, "containerd's socket", lambda: _server_healthy(directory, "containerd", ports), procs)
        for archive in (node_images.pause_archive(paths(directory).images),
                        node_images.toolbox_archive(paths(directory).images)):
            import_image(directory, archive)
        for name in SERVERS[1:]:
            procs[name] = pidfiles.spawn(directory, name, *argvs[name])
        for name in SERVERS[1:]:
            _wait(directory, f"{name} /healthz", lambda n=name: _server_healthy(directory, n, ports), procs)  # type: ignore[misc]
        _wait(directory, f"node {NODE_NAME} registered", lambda: bool(node_conditions(info)), procs)
        _set_loopback_address(info)
        _wait(directory, f"node {NODE_NAME} Ready", lambda: node_conditions(info).get("Ready") == "True", procs)
    except BaseException:
        stop(directory)
        raise
    return {n: p.pid for n, p in procs.items()}


def kill_runtime(directory: Path) -> int:
    """SIGKILL the node's containerd (a crash, not a shutdown): exactly the process its pid file
    records. The shims, and with them the running containers, outlive it. Returns its pid."""
    record = pidfiles.read_record(directory, "containerd")
    if record is None or not pidfiles.is_ours(record):
        raise NodeError(f"containerd of {directory} is not running: nothing to kill")
    pid = int(str(record["pid"]))
    os.kill(pid, signal.SIGKILL)
    pidfiles.stop(directory, "containerd")  # waits for the exit and removes the pid file
    return pid


def start_runtime(directory: Path) -> int:
    """Start containerd again after kill_runtime, with the same config and state; returns its pid
    once its socket answers. The kubelet reconnects to it by itself."""
    if running(directory).get("containerd"):
        raise NodeError(f"containerd of {directory} is already running")
    socket = paths(directory).socket
    socket.unlink(missing_ok=True)  # the killed one's: the wait below is for the new one's
    argv, env = _containerd_argv(directory)
    proc = pidfiles.spawn(directory, "containerd", argv, env)
    _wait(directory, "containerd's socket", socket.is_socket, {"containerd": proc})
    return proc.pid


def healthy(directory: Path, info: ClusterInfo) -> dict[str, bool]:
    """Each node server's health check, plus `node Ready` (the kubelet as the API server sees it)."""
    ports = NodePorts.from_base(info.ports.etcd_client)
    result = {name: _server_healthy(directory, name, ports) for name in SERVERS}
    result[f"node {NODE_NAME} Ready"] = node_conditions(info).get("Ready") == "True"
    return result


def ensure_unmounted(directory: Path) -> None:
    """Refuse to go on while anything is mounted under `directory`: deleting it would follow a
    pod's bind mounts (hostPath) into the host's files."""
    left = mounts_under(directory)
    if left:
        raise NodeError(f"still mounted under {directory}: {left[:5]}; run `hack/cluster down` again or "
                        f"unmount them (umount -l) before deleting it")


def running(directory: Path) -> dict[str, bool]:
    result = {}
    for name in SERVERS:
        record = pidfiles.read_record(directory, name)
        if record is not None:
            pidfiles.reap(int(record["pid"]))  # type: ignore[call-overload]
            result[name] = pidfiles.is_ours(record)
    return result


def _remove_pods(directory: Path) -> None:
    """Kill and delete every task and container in containerd's k8s.io namespace, so that the
    shims exit (they outlive containerd otherwise)."""
    try:
        tasks = [line.split()[0] for line in _ctr(directory, "tasks", "ls", timeout=30).splitlines()[1:] if line.split()]
        for task in tasks:
            subprocess.run([str(paths(directory).bin / "ctr"), f"--address={paths(directory).socket}",
                            "--namespace=k8s.io", "tasks", "delete", "--force", task],
                           capture_output=True, timeout=30)
        containers = [line.split()[0] for line in _ctr(directory, "containers", "ls", timeout=30).splitlines()[1:]
                      if line.split()]
        if containers:
            _ctr(directory, "containers", "delete", *containers, timeout=60)
    except (NodeError, subprocess.TimeoutExpired, FileNotFoundError):
        pass  # containerd is already gone: the cgroup sweep below gets what is left


def _cgroup_dirs(name: str) -> list[Path]:
    """Every cgroup under the kubelet's root in every hierarchy, deepest first."""
    found = [group for hierarchy in _CGROUP_ROOT.iterdir() if (group := hierarchy / name).is_dir()]
    nested = [d for root in found for d in root.rglob("*") if d.is_dir()]
    return sorted(nested, key=lambda d: len(d.parts), reverse=True) + found


def leftover_pids(directory: Path) -> set[int]:
    """Processes still in the node's cgroups, plus shims of its containerd."""
    pids: set[int] = set()
    for group in _cgroup_dirs(cgroup_name(directory)):
        try:
            pids |= {int(p) for p in (group / "cgroup.procs").read_text().split()}
        except (FileNotFoundError, OSError):
            continue
    socket = str(paths(directory).socket)
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(socket.encode() in arg for arg in cmdline) and b"containerd-shim" in cmdline[0]:
                pids.add(int(proc.name))
    return pids


def _kill_leftovers(directory: Path) -> None:
    deadline = time.monotonic() + 10.0
    while (pids := leftover_pids(directory)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    for group in _cgroup_dirs(cgroup_name(directory)):
        try:
            group.rmdir()
        except OSError:
            pass


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or under `directory`, deepest first (from /proc/self/mountinfo)."""
    prefix = str(directory.resolve())
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")  # octal escapes (\\040 for a space)
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return sorted(found, key=lambda m: m.count("/"), reverse=True)


def _unmount_all(directory: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for _ in range(3):  # a lazy unmount of a parent can reveal nothing new, but stacked mounts need repeats
        points = mounts_under(directory)
        if not points:
            return
        for point in points:
            libc.umount2(point.encode(), _MNT_DETACH)
    left = mounts_under(directory)
    if left:
        raise NodeError(f"cannot unmount {left[:5]} under {directory}: {os.strerror(ctypes.get_errno())}")


def stop(directory: Path) -> list[str]:
    """Stop the node: the kubelet first (so it restarts nothing), then every pod through containerd,
    then the servers; then kill whatever is left in the node's cgroups and unmount everything
    under the state directory (overlay rootfs, tmpfs of secret/projected volumes, shm, netns)."""
    alive = [n for n, ok in running(directory).items() if ok]
    sockets = shim_sockets(directory)
    pidfiles.stop(directory, "kubelet")
    if running(directory).get("containerd"):
        _remove_pods(directory)
    for name in reversed(SERVERS[:-1]):
        pidfiles.stop(directory, name)
    _kill_leftovers(directory)
    _unmount_all(directory)
    _remove_log_links(directory)
    for socket in sockets:  # a shim killed rather than shut down leaves its socket behind
        socket.unlink(missing_ok=True)
    return alive


def shim_sockets(directory: Path) -> set[Path]:
    """The sockets of our shims. containerd puts them in /run/containerd/s whatever its state dir
    (a constant of the shim protocol); each task's bootstrap.json names its shim's."""
    tasks = paths(directory).containerd / "state" / "io.containerd.runtime.v2.task"
    found = set()
    for bootstrap in tasks.glob("*/*/bootstrap.json"):
        try:
            address = str(json.loads(bootstrap.read_text())["address"])
        except (OSError, ValueError, KeyError):
            continue
        if address.startswith("unix://"):
            found.add(Path(address.removeprefix("unix://")))
    return found


def _remove_log_links(directory: Path) -> None:
    """The kubelet's links to our pods' logs (it removes them itself only with the pods)."""
    if not _CONTAINER_LOG_LINKS.is_dir():
        return
    ours = str(paths(directory).kubelet) + "/"
    for link in _CONTAINER_LOG_LINKS.iterdir():
        if link.is_symlink() and os.readlink(link).startswith(ours):
            link.unlink()
