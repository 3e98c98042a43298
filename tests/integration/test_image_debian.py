"""The image built from Debian's packages (`hack/cluster image`) has the recipe's installed set and runs.

It builds the OCI archive (or reuses it from the cache), then reads the root filesystem it was packed
from: the Debian packages (dpkg's own database) and the Python distributions (`pip freeze` of the
image's venv, run inside it) are exactly image/dpkg-packages.txt and image/requirements.lock, which the
Dockerfile's build checks too (image/check.sh). The entrypoint runs in that rootfs without a container
runtime, as the image's user, and the archive is an OCI layout named for `ctr images import`, with the
Dockerfile runtime stage's process settings.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from memoplane.testing import image

pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def built() -> image.BuiltImage:
    return image.build_image()


def _inside(rootfs: Path, *argv: str, user: str = "0:0") -> subprocess.CompletedProcess[str]:
    """Run argv in the rootfs: its own mount and pid namespaces and /proc, as `user`, the image's env."""
    config = image.runtime_config(image.dockerfile_stages())
    env = [f"{name}={value}" for name, value in config.env.items()]
    return subprocess.run(["unshare", "--mount", "--pid", "--fork", f"--mount-proc={rootfs / 'proc'}",
                           "chroot", f"--userspec={user}", str(rootfs), "/usr/bin/env", "-i", *env, *argv],
                          capture_output=True, text=True, timeout=300)


def _lines(path: Path) -> list[str]:
    return sorted(line for line in path.read_text().splitlines() if line and not line.startswith("#"))


def test_installed_set_is_the_recipes(built: image.BuiltImage) -> None:
    dpkg = _inside(built.rootfs, "dpkg-query", "-W", "-f", "${Package}\\n")
    assert dpkg.returncode == 0, dpkg.stderr
    assert sorted(dpkg.stdout.split()) == _lines(image.RECIPE_DIR / "dpkg-packages.txt")
    assert set(image.package_list(image.RUNTIME_PACKAGES)) <= set(dpkg.stdout.split())
    # The project is listed by where it was installed from (`memoplane @ file:///...`): asked apart.
    freeze = _inside(built.rootfs, "pip", "freeze", "--all", "--disable-pip-version-check", "--exclude", "memoplane")
    assert freeze.returncode == 0, freeze.stderr
    assert sorted(freeze.stdout.split()) == _lines(image.RECIPE_DIR / "requirements.lock")
    project = _inside(built.rootfs, "python", "-c", "import importlib.metadata as m; print(m.version('memoplane'))")
    assert project.stdout.strip() == image.project_version(), project.stdout + project.stderr


def test_entrypoint_runs_as_the_image_user(built: image.BuiltImage) -> None:
    config = image.runtime_config(image.dockerfile_stages())
    for args, shown in ((["memoplane", "--version"], f"memoplane {image.project_version()}"),
                        (["agent", "--help"], "usage: memoplane-agent"),
                        (["operator", "--help"], "usage: memoplane-operator"),
                        (config.cmd, "usage: IMAGE operator|agent")):
        run = _inside(built.rootfs, *config.entrypoint, *args, user=config.user)
        assert run.returncode == 0, f"{args}: {run.stderr}"
        assert shown in run.stdout, f"{args}: {run.stdout[:300]}"
    whoami = _inside(built.rootfs, "id", "-un", user=config.user)
    assert whoami.stdout.strip() == "memoplane", whoami.stdout + whoami.stderr


def _blob(archive: tarfile.TarFile, digest: str) -> Any:
    member = archive.extractfile(f"blobs/sha256/{digest.split(':', 1)[1]}")
    assert member is not None, digest
    return json.load(member)


def test_archive_is_an_oci_layout_named_for_import(built: image.BuiltImage) -> None:
    with tarfile.open(built.archive) as archive:
        layout = archive.extractfile("oci-layout")
        assert layout is not None and json.load(layout) == {"imageLayoutVersion": "1.0.0"}
        index_file = archive.extractfile("index.json")
        assert index_file is not None
        (entry,) = json.load(index_file)["manifests"]
        assert entry["annotations"] == {"org.opencontainers.image.ref.name": image.project_version(),
                                        "io.containerd.image.name": built.reference}
        manifest = _blob(archive, entry["digest"])
        config = _blob(archive, manifest["config"]["digest"])
        (layer,) = manifest["layers"]
        layer_file = archive.extractfile(f"blobs/sha256/{layer['digest'].split(':', 1)[1]}")
        assert layer_file is not None
        with tarfile.open(fileobj=gzip.GzipFile(fileobj=layer_file), mode="r|") as rootfs:
            modes = {m.name.removeprefix("./"): m.mode for m in rootfs if m.isfile()}
    want = image.runtime_config(image.dockerfile_stages())
    got = config["config"]
    assert (config["os"], config["architecture"]) == ("linux", "amd64")
    assert got["User"] == want.user and got["WorkingDir"] == want.workdir
    assert got["Env"] == [f"{name}={value}" for name, value in want.env.items()]
    assert sorted(got["ExposedPorts"]) == sorted(want.exposed_ports)
    assert (got["Entrypoint"], got["Cmd"]) == (want.entrypoint, want.cmd)
    assert modes["usr/local/bin/memoplane-entrypoint"] & 0o777 == 0o755
    assert "opt/memoplane/bin/memoplane-agent" in modes
    assert not any(name.startswith(("dev/", "recipe/", "wheels/")) for name in modes)


def test_keeps_none_of_the_builders_apt_sources(built: image.BuiltImage) -> None:
    sources = [built.rootfs / "etc" / "apt" / "sources.list",
               *sorted((built.rootfs / "etc" / "apt" / "sources.list.d").iterdir())]
    kept = [f"{path}: {line}" for path in sources for line in path.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    assert not kept, kept
