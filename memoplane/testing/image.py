"""The project's image built from Debian's packages, without a registry or a Docker engine.

The Dockerfile is the recipe for users with a registry; this is its second builder, for machines
where no base image can be pulled. Both read the same files under image/ (the Debian package lists,
the pinned Python distributions, the install scripts, the entrypoint) and both end with
image/check.sh, which fails the build unless the installed set is exactly the recipe's:

1. the build stage: `mmdebstrap --variant=minbase` of the Dockerfile's Debian release with
   image/apt-build.txt (the host's apt sources: no mirror is named), then image/venv.sh in a chroot
   installs the project's wheel and its dependencies (wheels the host's pip fetched beforehand, its
   configured index) into /opt/memoplane;
2. the runtime stage: minbase with image/apt-runtime.txt, /opt/memoplane copied over, the user
   (image/runtime.sh), the entrypoint, image/check.sh;
3. `umoci` packs it as one layer with the Dockerfile runtime stage's USER, ENV, WORKDIR, EXPOSE,
   ENTRYPOINT and CMD (parsed from the Dockerfile: one place), into an OCI layout tar that
   `ctr images import` takes, named by the reference annotations.

The archive is cached under a content key (the recipe files, the Dockerfile and the wheel's digest):
a second build with nothing changed only rebuilds the wheel and compares the key.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from memoplane.testing.build import REPO_ROOT, cache_dir, file_lock

RECIPE_DIR = REPO_ROOT / "image"
DOCKERFILE = REPO_ROOT / "Dockerfile"
# The Debian packages of each stage (the Dockerfile's stages install the same files: its unit test checks).
BUILD_PACKAGES = RECIPE_DIR / "apt-build.txt"
RUNTIME_PACKAGES = RECIPE_DIR / "apt-runtime.txt"
IMAGE_NAME = "memoplane.local/memoplane"
# The Debian base image's own PATH, which the Dockerfile's `ENV PATH=...:$PATH` extends.
DEBIAN_BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MERGED_USR_HOOKS = Path("/usr/share/mmdebstrap/hooks/merged-usr")
_UMOCI_TAG = "image"
_PROGRESS_EVERY_S = 15.0
# Wheels carry file times: a fixed epoch makes the wheel's digest a function of its contents alone.
_WHEEL_EPOCH = "315532800"


class ImageError(RuntimeError):
    """The image could not be built; the message names the step and its log."""


# ---- the Dockerfile, parsed (the tests read it the same way) --------------------------------

@dataclass
class Instruction:
    op: str
    args: str
    heredoc: str = ""


@dataclass
class Stage:
    base: str
    name: str | None
    steps: list[Instruction] = field(default_factory=list)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages (continuation lines joined, heredocs kept)."""
    lines = text.splitlines()
    args: dict[str, str] = {}
    stages: list[Stage] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.rstrip().endswith("\\") and i < len(lines):
            nxt = lines[i]
            i += 1
            if nxt.lstrip().startswith("#"):
                continue
            line = line.rstrip()[:-1] + " " + nxt.strip()
        op, _, rest = line.strip().partition(" ")
        heredoc = ""
        marker = re.search(r"<<-?'?\"?(\w+)'?\"?", rest)
        if marker:
            body = []
            while i < len(lines) and lines[i].strip() != marker.group(1):
                body.append(lines[i])
                i += 1
            i += 1
            heredoc = "\n".join(body)
        ins = Instruction(op.upper(), rest.strip(), heredoc)
        if ins.op == "ARG" and not stages:
            name, _, default = ins.args.partition("=")
            args[name] = default
        elif ins.op == "FROM":
            words = ins.args.split()
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], words[0])
            stages.append(Stage(base, words[2] if len(words) > 2 and words[1].upper() == "AS" else None))
        elif stages:
            stages[-1].steps.append(ins)
    return args, stages


def dockerfile_stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())[1]


def debian_release(base: str) -> str:
    """`debian:bookworm-slim[@sha256:...]` -> `bookworm`: the release mmdebstrap builds."""
    m = re.fullmatch(r"debian:([a-z]+)-slim(@sha256:[0-9a-f]{64})?", base)
    if not m:
        raise ImageError(f"Dockerfile base {base!r} is not debian:<release>-slim: the Debian builder needs one")
    return m.group(1)


def package_list(path: Path) -> list[str]:
    """Package names of an image/apt-*.txt file: one a line, `#` starts a comment (as apt-install.sh reads it)."""
    return [word for line in path.read_text().splitlines() for word in line.split("#")[0].split()]


@dataclass(frozen=True)
class ImageConfig:
    """The runtime stage's process settings, as the OCI image config holds them."""

    user: str
    env: dict[str, str]
    workdir: str
    exposed_ports: list[str]
    entrypoint: list[str]
    cmd: list[str]


def runtime_config(stages: list[Stage]) -> ImageConfig:
    """USER, ENV, WORKDIR, EXPOSE, ENTRYPOINT and CMD of the last stage (the later instruction wins)."""
    env = {"PATH": DEBIAN_BASE_PATH}
    user = workdir = ""
    ports: list[str] = []
    entrypoint: list[str] = []
    cmd: list[str] = []
    for st in stages[-1].steps:
        if st.op == "ENV":
            for pair in shlex.split(st.args):
                name, _, value = pair.partition("=")
                env[name] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), value)
        elif st.op == "USER":
            user = st.args
        elif st.op == "WORKDIR":
            workdir = st.args
        elif st.op == "EXPOSE":
            ports += [p if "/" in p else f"{p}/tcp" for p in st.args.split()]
        elif st.op == "ENTRYPOINT":
            entrypoint = json.loads(st.args)
        elif st.op == "CMD":
            cmd = json.loads(st.args)
    return ImageConfig(user, env, workdir, ports, entrypoint, cmd)


# ---- building ---------------------------------------------------------------------------

@dataclass(frozen=True)
class BuiltImage:
    archive: Path  # the OCI layout tar
    rootfs: Path  # the runtime root filesystem it was packed from
    reference: str  # memoplane.local/memoplane:<version>
    key: str
    cached: bool
    seconds: float

    @property
    def size_bytes(self) -> int:
        return self.archive.stat().st_size


def _log(msg: str) -> None:
    print(f"[hack/cluster image] {msg}", file=sys.stderr, flush=True)


def project_version() -> str:
    version: str = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    return version


def images_dir() -> Path:
    return cache_dir() / "images"


def _run(step: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    """Run one step, its output appended to `log`, with a progress line every 15 s meanwhile."""
    with log.open("a") as out:
        out.write(f"$ {shlex.join(argv)}\n")
        out.flush()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env)
    started = time.monotonic()
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(_PROGRESS_EVERY_S):
            lines = log.read_text(errors="replace").splitlines()
            _log(f"  {step}: {time.monotonic() - started:.0f}s, last: {lines[-1][:100] if lines else ''}")

    thread = threading.Thread(target=heartbeat, daemon=True)
    thread.start()
    try:
        code = proc.wait()
    finally:
        stop.set()
        thread.join()
    if code != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise ImageError(f"{step}: `{shlex.join(argv[:3])} ...` exited {code}; last lines of {log}:\n{tail}")


def _require_tools() -> None:
    if os.geteuid() != 0:
        raise ImageError("the Debian builder needs root (mmdebstrap's root mode, chroot): run it as root")
    missing = [tool for tool in ("mmdebstrap", "umoci", "chroot", "tar") if shutil.which(tool) is None]
    if missing:
        raise ImageError(f"missing {', '.join(missing)}: apt-get install mmdebstrap umoci (Debian's packages)")


def _build_wheel(out: Path, log: Path) -> Path:
    """The project's wheel from the checkout, with fixed file times so its digest names its contents."""
    env = {**os.environ, "SOURCE_DATE_EPOCH": _WHEEL_EPOCH}
    env.pop("PYTHONPATH", None)  # the checkout's egg-info would otherwise pass for the installed project
    _run("wheel", [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                   "--wheel-dir", str(out), str(REPO_ROOT)], log, env)
    (wheel,) = out.glob("memoplane-*.whl")
    return wheel


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def content_key(wheel: Path) -> str:
    """The recipe files, the Dockerfile, this builder and the wheel: what the image is made of."""
    h = hashlib.sha256()
    for path in [*sorted(p for p in RECIPE_DIR.iterdir() if p.is_file()), DOCKERFILE, Path(__file__)]:
        h.update(f"{path.name}\0{_digest(path)}\0".encode())
    h.update(f"wheel\0{_digest(wheel)}".encode())
    return h.hexdigest()


def _fetch_wheels(wheel: Path, wheelhouse: Path, log: Path) -> None:
    """The dependencies' wheels, pinned by requirements.lock: from the wheelhouse alone when it has them all,
    else by the host's pip from its configured index."""
    argv = [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheelhouse),
            "--find-links", str(wheelhouse), "-c", str(RECIPE_DIR / "requirements.lock"), str(wheel)]
    try:
        _run("dependency wheels, cached", [*argv, "--no-index"], log)
    except ImageError:
        _log("  the wheelhouse lacks some: fetching them with pip")
        _run("dependency wheels", argv, log)


def _bootstrap(release: str, packages_file: Path, target: Path, log: Path, *, fresh: bool) -> None:
    """Debian's minbase of `release` plus the listed packages, from the host's apt sources, into `target`.

    Kept as a tar per release and package list, like a Docker layer cache: a change of the project
    only reinstalls the venv. `fresh` (a relock) bootstraps again, with the packages' current versions.
    """
    names = package_list(packages_file)
    key = hashlib.sha256(f"{release}\0{' '.join(names)}".encode()).hexdigest()[:16]
    base = images_dir() / "bases" / f"{release}-{packages_file.stem}-{key}.tar"
    if fresh or not base.exists():
        base.parent.mkdir(parents=True, exist_ok=True)
        partial = base.with_name(base.name + ".partial")
        _run(f"mmdebstrap {packages_file.stem}", [
            "mmdebstrap", "--mode=root", "--variant=minbase", "--format=tar", f"--hook-dir={MERGED_USR_HOOKS}",
            f"--include={','.join(names)}", release, str(partial)], log)
        partial.rename(base)
    else:
        _log(f"  {packages_file.stem}: the bootstrapped base {base.name} (hack/cluster image --relock renews it)")
    target.mkdir(parents=True, exist_ok=True)
    _run(f"unpack {base.name}", ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", str(base),
                                 "-C", str(target)], log)


def _chroot(step: str, rootfs: Path, argv: list[str], log: Path) -> None:
    env = {"PATH": DEBIAN_BASE_PATH, "HOME": "/root", "LANG": "C.UTF-8", "PIP_NO_CACHE_DIR": "1",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    _run(step, ["chroot", str(rootfs), *argv], log, env)


def _with_recipe(rootfs: Path) -> Path:
    """The recipe directory inside the rootfs at /recipe (the Dockerfile's bind mount)."""
    inside = rootfs / "recipe"
    shutil.rmtree(inside, ignore_errors=True)
    shutil.copytree(RECIPE_DIR, inside)
    return inside


def _build_venv(release: str, work: Path, wheel: Path, wheelhouse: Path, log: Path, *, relocking: bool) -> Path:
    build_root = work / "build-rootfs"
    _bootstrap(release, BUILD_PACKAGES, build_root, log, fresh=relocking)
    _with_recipe(build_root)
    shutil.copytree(wheelhouse, build_root / "wheels")
    shutil.copy2(wheel, build_root / "wheels" / wheel.name)
    _chroot("venv", build_root, ["sh", "/recipe/venv.sh", "--no-index", "--find-links", "/wheels",
                                 f"/wheels/{wheel.name}"], log)
    return build_root / "opt" / "memoplane"


def relock(rootfs: Path) -> None:
    """Write the recipe's installed set (image/dpkg-packages.txt, image/requirements.lock) from a built rootfs."""
    def inside(*argv: str) -> str:
        return subprocess.run(["chroot", str(rootfs), *argv], check=True, capture_output=True, text=True,
                              env={"PATH": DEBIAN_BASE_PATH}).stdout

    dpkg = sorted(inside("dpkg-query", "-W", "-f", "${Package}\\n").split())
    (RECIPE_DIR / "dpkg-packages.txt").write_text("".join(f"{name}\n" for name in dpkg))
    freeze = sorted(inside("/opt/memoplane/bin/pip", "freeze", "--all", "--disable-pip-version-check",
                           "--exclude", "memoplane").split())
    header = "# The Python distributions of /opt/memoplane (pip freeze --all). Rewrite: hack/cluster image --relock\n"
    (RECIPE_DIR / "requirements.lock").write_text(header + "".join(f"{line}\n" for line in freeze))
    _log(f"relocked: {len(dpkg)} Debian packages, {len(freeze)} Python distributions")


def _runtime_rootfs(release: str, rootfs: Path, venv: Path, log: Path, *, relocking: bool) -> None:
    _bootstrap(release, RUNTIME_PACKAGES, rootfs, log, fresh=relocking)
    _with_recipe(rootfs)
    _chroot("user", rootfs, ["sh", "/recipe/runtime.sh"], log)
    _run("copy venv", ["cp", "-a", str(venv), str(rootfs / "opt" / "memoplane")], log)
    entrypoint = rootfs / "usr" / "local" / "bin" / "memoplane-entrypoint"
    shutil.copyfile(RECIPE_DIR / "memoplane-entrypoint", entrypoint)
    entrypoint.chmod(0o755)
    if relocking:
        relock(rootfs)
        _with_recipe(rootfs)
    _chroot("check", rootfs, ["sh", "/recipe/check.sh"], log)
    shutil.rmtree(rootfs / "recipe")
    # mmdebstrap copied the builder's own apt sources in; they are this machine's, not the image's.
    (rootfs / "etc" / "apt" / "sources.list").write_text("# hack/cluster image keeps no apt sources\n")
    # An image's /dev is empty (the runtime makes it); mmdebstrap's root mode leaves device nodes.
    for entry in (rootfs / "dev").iterdir():
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def _umoci_config_args(config: ImageConfig, version: str) -> list[str]:
    args = [f"--config.user={config.user}", f"--config.workingdir={config.workdir}",
            "--clear=config.entrypoint", "--clear=config.cmd",
            f"--config.label=org.opencontainers.image.version={version}",
            "--history.created_by=hack/cluster image (mmdebstrap + umoci, recipe image/)"]
    args += [f"--config.env={name}={value}" for name, value in config.env.items()]
    args += [f"--config.exposedports={port}" for port in config.exposed_ports]
    args += [f"--config.entrypoint={word}" for word in config.entrypoint]
    args += [f"--config.cmd={word}" for word in config.cmd]
    return args


def _name_in_index(layout: Path, reference: str, version: str) -> None:
    """Name the manifest: the OCI tag annotation, and containerd's full image name for `ctr images import`."""
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text())
    (manifest,) = index["manifests"]
    manifest["annotations"] = {"org.opencontainers.image.ref.name": version, "io.containerd.image.name": reference}
    index_path.write_text(json.dumps(index, separators=(",", ":")))


def _pack(rootfs_parent: Path, layout: Path, config: ImageConfig, version: str, reference: str,
          archive: Path, log: Path) -> None:
    image = f"{layout}:{_UMOCI_TAG}"
    _run("umoci repack", ["umoci", "repack", "--image", image, str(rootfs_parent)], log)
    _run("umoci config", ["umoci", "config", "--image", image, *_umoci_config_args(config, version)], log)
    _run("umoci gc", ["umoci", "gc", "--layout", str(layout)], log)
    _name_in_index(layout, reference, version)
    partial = archive.with_name(archive.name + ".partial")
    # Members named without "./" (`index.json`, `blobs/sha256/...`), as readers look them up.
    _run("tar", ["tar", "--sort=name", "-C", str(layout), "-cf", str(partial), "oci-layout", "index.json", "blobs"],
         log)
    partial.rename(archive)


def build_image(*, relocking: bool = False) -> BuiltImage:
    """Build (or reuse) `<cache>/images/memoplane-<version>.oci.tar`; relocking rewrites image/'s pinned sets."""
    _require_tools()
    started = time.monotonic()
    version = project_version()
    reference = f"{IMAGE_NAME}:{version}"
    out_dir = images_dir()
    archive = out_dir / f"memoplane-{version}.oci.tar"
    work = out_dir / f"work-{version}"
    bundle = work / "bundle"
    key_file = archive.with_suffix(".key")
    with file_lock(images_dir() / "build.lock"):
        wheels = out_dir / "project-wheel"
        shutil.rmtree(wheels, ignore_errors=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        log = out_dir / f"memoplane-{version}.log"
        log.write_text("")
        wheel = _build_wheel(wheels, log)
        key = content_key(wheel)
        if (not relocking and archive.exists() and key_file.exists() and key_file.read_text() == key
                and (bundle / "rootfs" / "opt" / "memoplane").is_dir()):
            _log(f"{reference}: reused {archive} (key {key[:12]})")
            return BuiltImage(archive, bundle / "rootfs", reference, key, True, time.monotonic() - started)
        release = debian_release(dockerfile_stages()[-1].base)
        _log(f"{reference}: building from Debian {release} (log {log})")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        wheelhouse = out_dir / "wheels"
        wheelhouse.mkdir(exist_ok=True)
        _log("1/4 the dependencies' wheels (requirements.lock)")
        _fetch_wheels(wheel, wheelhouse, log)
        _log("2/4 the build stage: minbase + image/apt-build.txt, then image/venv.sh")
        venv = _build_venv(release, work, wheel, wheelhouse, log, relocking=relocking)
        layout = work / "oci"
        _run("umoci init", ["umoci", "init", "--layout", str(layout)], log)
        _run("umoci new", ["umoci", "new", "--image", f"{layout}:{_UMOCI_TAG}"], log)
        _run("umoci unpack", ["umoci", "unpack", "--image", f"{layout}:{_UMOCI_TAG}", str(bundle)], log)
        _log("3/4 the runtime stage: minbase + image/apt-runtime.txt, the venv, the user, image/check.sh")
        _runtime_rootfs(release, bundle / "rootfs", venv, log, relocking=relocking)
        shutil.rmtree(work / "build-rootfs")
        _log("4/4 packing the OCI image (umoci)")
        _pack(bundle, layout, runtime_config(dockerfile_stages()), version, reference, archive, log)
        key = content_key(wheel)  # a relock rewrote the recipe
        key_file.write_text(key)
        seconds = time.monotonic() - started
        _log(f"{reference}: {archive} ({archive.stat().st_size / 2**20:.0f} MiB) in {seconds:.0f}s")
        return BuiltImage(archive, bundle / "rootfs", reference, key, False, seconds)
