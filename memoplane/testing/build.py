"""Build the control plane's binaries from the Go module proxy, once, into a cache.

Kubernetes' commands and etcd cannot be `go install`ed: their go.mod files replace their own
sibling modules with local directories (k8s.io/api => ./staging/src/k8s.io/api). So for each
release we generate a small wrapper module that requires it, replaces every such module with
its published version (the list is read from the release's own go.mod, never typed in), copies
the upstream `package main` files and builds them. All of Kubernetes' commands (kube-apiserver,
kube-controller-manager, kube-scheduler, kubelet) live in ONE wrapper module, one directory per
command, so they resolve the same dependency versions and share Go's build cache. MinIO, Versity's
S3 gateway, helm and the node's runtime (containerd, runc, the CNI loopback plugin) install with
`go install`.

Binaries land in `<cache>/bin/<name>-<version>`; they are written under a temporary name and
renamed, so a binary that exists is complete and later runs reuse it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSIONS_FILE = REPO_ROOT / "hack" / "versions.env"
KUBERNETES_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet")
CONTAINERD_COMMANDS = ("containerd", "containerd-shim-runc-v2", "ctr")
# What `hack/cluster up --with-node` adds: the rest of a control plane, a kubelet and its runtime.
NODE_COMPONENTS = ("kube-controller-manager", "kube-scheduler", "kubelet", *CONTAINERD_COMMANDS,
                   "runc", "cni-loopback")
CONTROL_PLANE_COMPONENTS = ("etcd", "kube-apiserver", "minio", "versitygw", "helm")
COMPONENTS = (*CONTROL_PLANE_COMPONENTS, *NODE_COMPONENTS)
_PROGRESS_EVERY_S = 15.0


class BuildError(RuntimeError):
    """A component could not be built; the message names it and points at its log."""

    def __init__(self, component: str, detail: str) -> None:
        super().__init__(f"cannot build {component}: {detail}")
        self.component = component


@dataclass(frozen=True)
class Versions:
    kubernetes: str
    etcd: str
    minio: str
    versitygw: str
    helm: str
    containerd: str
    runc: str
    cni_plugins: str

    def of(self, component: str) -> str:
        if component in KUBERNETES_COMMANDS:
            return self.kubernetes
        if component in CONTAINERD_COMMANDS:
            return self.containerd
        return {
            "etcd": self.etcd,
            "minio": self.minio,
            "versitygw": self.versitygw,
            "helm": self.helm,
            "runc": self.runc,
            "cni-loopback": self.cni_plugins,
        }[component]


def load_versions(path: Path | None = None) -> Versions:
    """Read the pinned versions (simple KEY=VALUE lines) from hack/versions.env."""
    path = path or Path(os.environ.get("MEMOPLANE_VERSIONS_FILE", VERSIONS_FILE))
    values: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return Versions(
        kubernetes=values["KUBERNETES_VERSION"],
        etcd=values["ETCD_VERSION"],
        minio=values["MINIO_VERSION"],
        versitygw=values["VERSITYGW_VERSION"],
        helm=values["HELM_VERSION"],
        containerd=values["CONTAINERD_VERSION"],
        runc=values["RUNC_VERSION"],
        cni_plugins=values["CNI_PLUGINS_VERSION"],
    )


def cache_dir() -> Path:
    """Outside the repository so that every checkout and CI run on the machine shares it."""
    default = Path.home() / ".cache" / "memoplane"
    return Path(os.environ.get("MEMOPLANE_CACHE_DIR", default))


def binary_path(component: str, versions: Versions | None = None) -> Path:
    versions = versions or load_versions()
    return cache_dir() / "bin" / f"{component}-{versions.of(component)}"


def _log(msg: str) -> None:
    print(f"[hack/cluster] {msg}", file=sys.stderr, flush=True)


def _go_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # Static, small, reproducible binaries with the machine's own toolchain (no auto-download).
    env.update(CGO_ENABLED="0", GOTOOLCHAIN="local", GOFLAGS="-trimpath")
    env.pop("GOBIN", None)
    env.update(extra or {})
    return env


def _progress(log: Path) -> tuple[int, int]:
    """(modules downloaded, packages compiled) so far, from go's -v output in `log`."""
    downloads = packages = 0
    with log.open(errors="replace") as lines:
        for line in lines:
            if line.startswith("go: downloading "):
                downloads += 1
            elif line and not line.startswith(("go: ", "$ ", "#", " ", "\t")):
                packages += 1
    return downloads, packages


def _run_logged(component: str, argv: list[str], cwd: Path, log: Path,
                env: dict[str, str] | None = None) -> None:
    """Run a go command, appending its output to `log` and printing a heartbeat meanwhile."""
    with log.open("a") as out:
        out.write(f"$ {' '.join(argv)}   (in {cwd})\n")
        out.flush()
        proc = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                env=env or _go_env())
    started = time.monotonic()
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(_PROGRESS_EVERY_S):
            downloads, packages = _progress(log)
            _log(f"  {component}: go {argv[1]} {time.monotonic() - started:.0f}s: "
                 f"{downloads} modules downloaded, {packages} packages compiled")

    thread = threading.Thread(target=heartbeat, daemon=True)
    thread.start()
    try:
        code = proc.wait()
    finally:
        stop.set()
        thread.join()
    if code != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise BuildError(component, f"`{' '.join(argv[:3])} ...` exited {code}; "
                                    f"last lines of {log}:\n{tail}")


def _go_mod_json(gomod: Path) -> dict[str, Any]:
    out = subprocess.run(["go", "mod", "edit", "-json", str(gomod)], check=True,
                         capture_output=True, text=True, env=_go_env())
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def _download(component: str, module: str, version: str, log: Path) -> dict[str, str]:
    """`go mod download -json` one module; returns its Dir and GoMod paths."""
    out = subprocess.run(["go", "mod", "download", "-json", f"{module}@{version}"],
                         capture_output=True, text=True, env=_go_env())
    with log.open("a") as f:
        f.write(out.stderr)  # stdout is the JSON parsed below
    try:
        info: dict[str, str] = json.loads(out.stdout)
    except json.JSONDecodeError:
        raise BuildError(component, f"go mod download {module}@{version}: {out.stderr.strip()}") from None
    if out.returncode != 0 or "Error" in info:
        raise BuildError(component, f"go mod download {module}@{version}: "
                                    f"{info.get('Error', out.stderr.strip())}")
    return info


def published_replaces(upstream: dict[str, Any],
                       published: Callable[[str], str]) -> list[tuple[str, str]]:
    """(module, version) for every required module that upstream replaces by a local dir.

    Replaces of modules the release does not require are guards (etcd points
    go.etcd.io/etcd at ./FORBIDDEN_DEPENDENCY) and are dropped.
    """
    required = {r["Path"] for r in upstream.get("Require") or []}
    result = []
    for rep in upstream.get("Replace") or []:
        old, new = rep["Old"]["Path"], rep["New"]
        is_local = not new.get("Version") and new["Path"].startswith((".", "/"))
        if is_local and old in required:
            result.append((old, published(old)))
    return sorted(result)


def _write_wrapper(src: Path, name: str, module: str, version: str,
                   upstream: dict[str, Any], replaces: list[tuple[str, str]],
                   mains: dict[str, Path]) -> None:
    """A module that requires `module@version`, with published replaces and upstream's mains
    (`mains`: directory in the wrapper -> upstream directory of a `package main`)."""
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    lines = [f"// Generated by memoplane/testing/build.py: builds {module}@{version}.",
             f"module memoplane.local/build/{name}", "",
             f"go {upstream['Go']}", ""]
    for godebug in upstream.get("Godebug") or []:
        lines.append(f"godebug {godebug['Key']}={godebug['Value']}")
    lines += ["", f"require {module} {version}", "", "replace ("]
    lines += [f"\t{old} => {old} {ver}" for old, ver in replaces]
    lines += [")", ""]
    (src / "go.mod").write_text("\n".join(lines))
    for target, main_dir in mains.items():
        (src / target).mkdir(parents=True, exist_ok=True)
        for f in sorted(main_dir.glob("*.go")):
            if not f.name.endswith("_test.go"):
                (src / target / f.name).write_text(f.read_text())


def _build_wrapped(name: str, wrapper: str, module: str, version: str, mains: dict[str, str], target: str,
                   published: Callable[[str], str], ldflags: str, out: Path, log: Path) -> None:
    """Build the `package main` at `target` (a key of `mains`) of the wrapper module `wrapper`
    around `module@version`."""
    info = _download(name, module, version, log)
    upstream = _go_mod_json(Path(info["GoMod"]))
    replaces = published_replaces(upstream, published)
    if not replaces:
        raise BuildError(name, f"found no local replaces in {module}@{version}'s go.mod")
    _log(f"  {name}: wrapper replaces {len(replaces)} modules with published versions")
    src = cache_dir() / "src" / f"{wrapper}-{version}"
    _write_wrapper(src, wrapper, module, version, upstream, replaces,
                   {t: Path(info["Dir"]) / d for t, d in mains.items()})
    # -mod=mod lets go add the wrapper's missing requirements and sums from the proxy.
    _run_logged(name, ["go", "build", "-mod=mod", "-v", "-ldflags", ldflags, "-o", str(out),
                       f"./{target}"], src, log)


def _kubernetes_builder(command: str) -> Callable[[Versions, Path, Path], None]:
    """Build `cmd/<command>` of the pinned Kubernetes release from the shared wrapper module."""

    def build_command(v: Versions, out: Path, log: Path) -> None:
        major, minor, patch = v.kubernetes.lstrip("v").split(".")[:3]
        staging = f"v0.{minor}.{patch}"  # staging modules are published as v0.<minor>.<patch>
        pkg = "k8s.io/component-base/version"
        ldflags = " ".join(["-s", "-w",
                            f"-X {pkg}.gitVersion={v.kubernetes}", f"-X {pkg}.gitMajor={major}",
                            f"-X {pkg}.gitMinor={minor}", f"-X {pkg}.gitTreeState=clean"])
        mains = {f"cmd/{c}": f"cmd/{c}" for c in KUBERNETES_COMMANDS}
        _build_wrapped(command, "kubernetes", "k8s.io/kubernetes", v.kubernetes, mains, f"cmd/{command}",
                       lambda _m: staging, ldflags, out, log)

    return build_command


def _build_etcd(v: Versions, out: Path, log: Path) -> None:
    # All of etcd's modules are released together under the same tag.
    _build_wrapped("etcd", "etcd", "go.etcd.io/etcd/server/v3", v.etcd, {".": "."}, ".",
                   lambda _m: v.etcd, "-s -w", out, log)


def _go_install(name: str, target: str, ldflags: str, out: Path, log: Path,
                extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
    gobin = out.parent / f".gobin-{name}"
    shutil.rmtree(gobin, ignore_errors=True)
    gobin.mkdir(parents=True)
    _run_logged(name, ["go", "install", "-v", *extra_args, "-ldflags", ldflags, target], cache_dir(), log,
                env=_go_env({"GOBIN": str(gobin), **(env or {})}))
    built = list(gobin.iterdir())
    if len(built) != 1:
        raise BuildError(name, f"go install produced {built}")
    built[0].rename(out)
    gobin.rmdir()


def _build_minio(v: Versions, out: Path, log: Path) -> None:
    # No -X version stamps: MinIO parses its release tag as a date, and this is no release.
    _go_install("minio", f"github.com/minio/minio@{v.minio}", "-s -w", out, log)


def _build_versitygw(v: Versions, out: Path, log: Path) -> None:
    # Its go.mod has no local replaces, so a plain install works (the posix backend is built in).
    # Stamp the version as its release build does (the default says "git").
    _go_install("versitygw", f"github.com/versity/versitygw/cmd/versitygw@{v.versitygw}",
                f"-s -w -X main.Version={v.versitygw}", out, log)


def _build_helm(v: Versions, out: Path, log: Path) -> None:
    # Stamp the full version, as helm's release build does (the default says only v3.<minor>).
    ldflags = f"-s -w -X helm.sh/helm/v3/internal/version.version={v.helm}"
    _go_install("helm", f"helm.sh/helm/v3/cmd/helm@{v.helm}", ldflags, out, log)


def _containerd_builder(command: str) -> Callable[[Versions, Path, Path], None]:
    """containerd's go.mod has no local replaces: each command is a plain `go install`. Static
    (CGO off): the btrfs snapshotter, the only part needing cgo, is left out; overlayfs is used."""

    def build_command(v: Versions, out: Path, log: Path) -> None:
        module = "github.com/containerd/containerd/v2"
        _go_install(command, f"{module}/cmd/{command}@{v.containerd}",
                    f"-s -w -X {module}/version.Version={v.containerd}", out, log)

    return build_command


def _build_runc(v: Versions, out: Path, log: Path) -> None:
    # cgo and libseccomp (Debian: libseccomp-dev to build, libseccomp2 to run): seccomp profiles
    # of pods are applied by runc; its release build uses the same `seccomp` tag.
    _go_install("runc", f"github.com/opencontainers/runc@{v.runc}",
                f"-s -w -X main.version={v.runc.lstrip('v')}", out, log,
                extra_args=("-tags", "seccomp urfave_cli_no_docs"), env={"CGO_ENABLED": "1"})


def _build_cni_loopback(v: Versions, out: Path, log: Path) -> None:
    pkg = "github.com/containernetworking/plugins"
    _go_install("cni-loopback", f"{pkg}/plugins/main/loopback@{v.cni_plugins}",
                f"-s -w -X {pkg}/pkg/utils/buildversion.BuildVersion={v.cni_plugins}", out, log)


_BUILDERS: dict[str, Callable[[Versions, Path, Path], None]] = {
    "etcd": _build_etcd,
    **{c: _kubernetes_builder(c) for c in KUBERNETES_COMMANDS},
    "minio": _build_minio,
    "versitygw": _build_versitygw,
    "helm": _build_helm,
    **{c: _containerd_builder(c) for c in CONTAINERD_COMMANDS},
    "runc": _build_runc,
    "cni-loopback": _build_cni_loopback,
}
# How each built binary is checked to run: (argv after the binary, extra environment).
_VERSION_CHECKS: dict[str, tuple[list[str], dict[str, str]]] = {
    **{c: (["--version"], {}) for c in ("etcd", *KUBERNETES_COMMANDS, "minio", "versitygw", "runc")},
    "helm": (["version", "--short"], {}),
    "containerd": (["--version"], {}),
    "containerd-shim-runc-v2": (["-v"], {}),
    "ctr": (["--version"], {}),
    "cni-loopback": ([], {"CNI_COMMAND": "VERSION"}),
}


@contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """Two checkouts building at once would race on the same outputs; serialise them."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_binary(component: str, versions: Versions | None = None) -> Path:
    """Return the cached binary of `component`, building it first if it is missing."""
    versions = versions or load_versions()
    out = binary_path(component, versions)
    if out.exists():
        return out
    if shutil.which("go") is None:
        raise BuildError(component, "`go` is not on PATH")
    with file_lock(cache_dir() / "build.lock"):
        if out.exists():  # built by another process while we waited for the lock
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        log = cache_dir() / "logs" / f"{component}-{versions.of(component)}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("")
        tmp = out.with_name(out.name + ".tmp")
        tmp.unlink(missing_ok=True)
        _log(f"building {component} {versions.of(component)} (log: {log})")
        started = time.monotonic()
        _BUILDERS[component](versions, tmp, log)
        args, env = _VERSION_CHECKS[component]
        check = subprocess.run([str(tmp), *args], capture_output=True, text=True, timeout=60,
                               env={**os.environ, **env})
        if check.returncode != 0:
            raise BuildError(component, f"built binary does not run: {check.stderr.strip()}")
        tmp.rename(out)
        _log(f"built {component} in {time.monotonic() - started:.0f}s: "
             f"{check.stdout.strip().splitlines()[0] if check.stdout.strip() else out}")
    return out


def ensure_all(components: tuple[str, ...] = COMPONENTS) -> dict[str, Path]:
    """Build or reuse every component; raises BuildError naming the first that fails."""
    versions = load_versions()
    return {c: ensure_binary(c, versions) for c in components}
