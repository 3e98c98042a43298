"""The node's own tiny images, written as OCI archives without a registry or a build tool.

No image can be pulled here, so the sandbox ("pause") image is compiled from hack/node/pause.c
with `gcc -static`, and the tests' toolbox image is Debian's static busybox (package
busybox-static). An OCI archive is a tar of an OCI image layout: `oci-layout`, `index.json`
and content-addressed blobs (one uncompressed tar layer, a config, a manifest). Everything is
written deterministically (fixed mtimes and owners), so the same inputs give the same digest
and importing again is a no-op. The project's own image is built elsewhere (from Debian's
packages, with umoci); node.import_image takes both.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from memoplane.testing import build

PAUSE_SOURCE = build.REPO_ROOT / "hack" / "node" / "pause.c"
WHOAMI_SOURCE = build.REPO_ROOT / "hack" / "node" / "whoami"  # a minimal in-cluster client (Go)
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static
PAUSE_IMAGE = "memoplane.local/pause:1"
TOOLBOX_IMAGE = "memoplane.local/toolbox:1"
# containerd's import names an image by this annotation of the index entry.
_NAME_ANNOTATION = "io.containerd.image.name"
_REF_ANNOTATION = "org.opencontainers.image.ref.name"


class ImageError(RuntimeError):
    """An image cannot be built; the message names what is missing and how to get it."""


@dataclass(frozen=True)
class _File:
    path: str  # inside the image, without a leading slash
    data: bytes = b""
    mode: int = 0o755
    link_to: str | None = None  # a symlink's target


def _layer(files: list[_File]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for f in files:
            info = tarfile.TarInfo(f.path)
            info.mode, info.mtime, info.uid, info.gid = f.mode, 0, 0, 0
            if f.link_to is not None:
                info.type, info.linkname = tarfile.SYMTYPE, f.link_to
                tar.addfile(info)
            elif f.path.endswith("/"):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(f.data)
                tar.addfile(info, io.BytesIO(f.data))
    return out.getvalue()


def _descriptor(media_type: str, blob: bytes) -> dict[str, object]:
    return {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(blob).hexdigest(), "size": len(blob)}


def write_oci_archive(path: Path, name: str, files: list[_File], entrypoint: list[str]) -> str:
    """Write a one-layer linux/amd64 image called `name` as an OCI archive; returns its
    manifest digest."""
    layer = _layer(files)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": entrypoint, "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
    }, sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": _descriptor("application/vnd.oci.image.config.v1+json", config),
        "layers": [_descriptor("application/vnd.oci.image.layer.v1.tar", layer)],
    }, sort_keys=True).encode()
    entry = {**_descriptor("application/vnd.oci.image.manifest.v1+json", manifest),
             "platform": {"architecture": "amd64", "os": "linux"},
             "annotations": {_NAME_ANNOTATION: name, _REF_ANNOTATION: name.rsplit(":", 1)[1]}}
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [entry]}, sort_keys=True).encode()
    members = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", index)]
    members += [(f"blobs/sha256/{hashlib.sha256(b).hexdigest()}", b) for b in (layer, config, manifest)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member, data in members:
            info = tarfile.TarInfo(member)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    tmp.rename(path)
    return str(entry["digest"])


def _is_static(binary: Path) -> bool:
    """True for an ELF64 executable without a PT_INTERP program header (no dynamic loader)."""
    with binary.open("rb") as f:
        header = f.read(64)
        if header[:5] != b"\x7fELF\x02":
            return False
        phoff = int.from_bytes(header[0x20:0x28], "little")
        entry_size = int.from_bytes(header[0x36:0x38], "little")
        count = int.from_bytes(header[0x38:0x3A], "little")
        f.seek(phoff)
        table = f.read(entry_size * count)
    return all(int.from_bytes(table[i * entry_size:i * entry_size + 4], "little") != 3 for i in range(count))


def _compile_pause(out: Path) -> bytes:
    if shutil.which("gcc") is None:
        raise ImageError("gcc is not on PATH: the pause image is compiled from hack/node/pause.c "
                         "(Debian: apt-get install gcc libc6-dev)")
    return _compile(["gcc", "-static", "-Os", "-s", "-o", str(out), str(PAUSE_SOURCE)], out)


def _compile(argv: list[str], out: Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> bytes:
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageError(f"`{' '.join(argv)}` exited {proc.returncode}: {proc.stderr.strip()}")
    return out.read_bytes()


def _build_whoami(out: Path) -> bytes:
    """Static, with the machine's Go (build.py's environment: CGO off, no toolchain download)."""
    return _compile(["go", "build", "-trimpath", "-ldflags=-s -w", "-o", str(out), "."], out, cwd=WHOAMI_SOURCE,
                    env=build._go_env())


def pause_archive(directory: Path) -> Path:
    """The sandbox image: /pause and nothing else."""
    path = directory / "pause.oci.tar"
    binary = _compile_pause(directory / "pause")
    write_oci_archive(path, PAUSE_IMAGE, [_File("pause", binary)], ["/pause"])
    return path


def toolbox_archive(directory: Path) -> Path:
    """The tests' image: a static busybox as /bin/sh and friends, /bin/whoami (hack/node/whoami),
    /pause, and an empty /tmp."""
    if not BUSYBOX.is_file() or not _is_static(BUSYBOX):
        raise ImageError(f"{BUSYBOX} is missing or dynamically linked: the toolbox image is Debian's static "
                         "busybox (apt-get install busybox-static)")
    binary = _compile_pause(directory / "pause")
    files = [_File("bin/"), _File("bin/busybox", BUSYBOX.read_bytes()), _File("pause", binary),
             _File("bin/whoami", _build_whoami(directory / "whoami")),
             _File("tmp/", mode=0o1777), _File("etc/"), _File("proc/"), _File("sys/"), _File("dev/")]
    files += [_File(f"bin/{tool}", link_to="busybox")
              for tool in ("sh", "cat", "ls", "sleep", "test", "wget", "mount", "touch", "true")]
    path = directory / "toolbox.oci.tar"
    write_oci_archive(path, TOOLBOX_IMAGE, files, ["/bin/sh"])
    return path
