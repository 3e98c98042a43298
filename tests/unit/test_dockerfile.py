"""The Dockerfile installs the package the way the package metadata says.

The image itself cannot be built here (no base image can be pulled), so this checks the
Dockerfile against pyproject.toml instead: a pinned base whose Python satisfies
requires-python, every file setuptools needs COPY'd and not excluded by .dockerignore,
a non-editable `pip install .` from the directory they were copied to, the console
scripts the entrypoint runs declared in [project.scripts], libseccomp in the runtime
stage, a non-root default user, and the chart's `args` understood by the entrypoint.
Then it does what the Dockerfile does, for real: builds the wheel from the checkout,
installs it (not editable) into a fresh virtualenv and runs the entrypoints from there.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import site
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from memoplane.testing.image import BUILD_PACKAGES, RECIPE_DIR, RUNTIME_PACKAGES, Stage, package_list, parse_dockerfile

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


ARGS, STAGES = parse_dockerfile(DOCKERFILE.read_text())
FINAL = STAGES[-1]
BUILDER = next(s for s in STAGES if any("/recipe/venv.sh" in st.args for st in s.steps if st.op == "RUN"))
ENTRYPOINT_SCRIPT = (RECIPE_DIR / "memoplane-entrypoint").read_text()


def _copied(stage: Stage) -> dict[str, str]:
    """Source path -> destination, for COPY from the build context (not --from, not heredocs)."""
    out = {}
    for st in stage.steps:
        if st.op != "COPY" or "--from" in st.args or st.heredoc:
            continue
        words = [w for w in shlex.split(st.args) if not w.startswith("--")]
        *sources, dest = words
        for src in sources:
            out[src.rstrip("/")] = dest
    return out


# Debian's python3 in each release the base may name (the venv links to it).
DEBIAN_PYTHON = {"bookworm": "3.11.2", "trixie": "3.13.5"}


def _runs(stage: Stage) -> list[str]:
    return [" ".join(st.args.split()) for st in stage.steps if st.op == "RUN"]


def test_base_is_pinned_debian_and_its_python_satisfies_requires_python() -> None:
    m = re.fullmatch(r"debian:(bookworm|trixie)-slim(@sha256:[0-9a-f]{64})?", STAGES[0].base)
    assert m, f"base image {STAGES[0].base!r} is not Debian's slim image of a named release"
    assert {s.base for s in STAGES} == {STAGES[0].base}, "every stage uses the same base (the venv's python)"
    spec = SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert DEBIAN_PYTHON[m.group(1)] in spec, f"Debian {m.group(1)}'s python3 does not satisfy requires-python {spec}"
    assert "python3" in package_list(RUNTIME_PACKAGES), "the runtime stage lacks the venv's python3"
    assert "python3-venv" in package_list(BUILD_PACKAGES), "the build stage cannot make a venv"


def test_both_stages_install_from_the_recipe_lists() -> None:
    """The Dockerfile installs exactly what image/ lists, through the script the Debian builder also runs."""
    mount = "--mount=type=bind,source=image,target=/recipe"
    build_runs, final_runs = _runs(BUILDER), _runs(FINAL)
    assert build_runs[0] == f"{mount} sh /recipe/apt-install.sh /recipe/{BUILD_PACKAGES.name}", build_runs[0]
    assert final_runs[0] == (f"{mount} sh /recipe/apt-install.sh /recipe/{RUNTIME_PACKAGES.name} && "
                             "sh /recipe/runtime.sh"), final_runs[0]
    # No apt-get or pip of its own: what is installed is only what the shared scripts install.
    assert not any(re.search(r"\b(apt-get|pip)\b", run) for run in build_runs + final_runs)
    # The check comes after everything is in place: the venv copied and the entrypoint installed.
    last_copy = max(i for i, st in enumerate(FINAL.steps) if st.op == "COPY")
    runs = [(i, " ".join(st.args.split())) for i, st in enumerate(FINAL.steps) if st.op == "RUN"]
    checks = [i for i, run in runs if run == f"{mount} sh /recipe/check.sh"]
    assert checks and checks[-1] > last_copy, "image/check.sh does not run after the last COPY of the runtime stage"


def test_apt_install_reads_the_lists_as_the_debian_builder_does() -> None:
    """apt-install.sh's `sed` and package_list (mmdebstrap's --include) see the same names in every list."""
    for path in (BUILD_PACKAGES, RUNTIME_PACKAGES):
        name = path.name
        words = subprocess.run(["sh", "-c", f"echo $(sed 's/#.*//' {shlex.quote(str(path))})"], capture_output=True,
                               text=True, check=True, timeout=30).stdout.split()
        assert words == package_list(path) and words, name
    script = (RECIPE_DIR / "apt-install.sh").read_text()
    assert "$(sed 's/#.*//' \"$1\")" in script and "--no-install-recommends" in script


def test_pinned_sets_cover_the_dependencies() -> None:
    """requirements.lock pins every dependency of the project with ==; dpkg-packages.txt holds both lists' runtime."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (RECIPE_DIR / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            req = Requirement(line)
            assert [s.operator for s in req.specifier] == ["=="], f"requirements.lock: {line} is not an exact pin"
            pins[canonicalize_name(req.name)] = req
    for dep in map(Requirement, PYPROJECT["project"]["dependencies"]):
        pinned = pins.get(canonicalize_name(dep.name))
        assert pinned, f"{dep.name} is not in image/requirements.lock (hack/cluster image --relock)"
        assert next(iter(pinned.specifier)).version in dep.specifier, f"{pinned} does not satisfy {dep}"
    assert "memoplane" not in pins, "the project itself is installed from its source, not pinned"
    installed = set((RECIPE_DIR / "dpkg-packages.txt").read_text().split())
    runtime = set(package_list(RUNTIME_PACKAGES))
    assert runtime <= installed, f"{runtime - installed} missing from image/dpkg-packages.txt"
    assert not set(package_list(BUILD_PACKAGES)) & installed, "a build-only package is in the runtime"


def test_copies_everything_setuptools_needs() -> None:
    copied = _copied(BUILDER)
    needed = {"pyproject.toml"}
    readme = PYPROJECT["project"].get("readme")
    if isinstance(readme, str):
        needed.add(readme)
    find = PYPROJECT["tool"]["setuptools"]["packages"]["find"]
    for where in find["where"]:
        base = ROOT / where
        for pkg in base.iterdir():
            if (pkg / "__init__.py").is_file() and any(fnmatch.fnmatch(pkg.name, pat) for pat in find["include"]):
                needed.add(str(pkg.relative_to(ROOT)))
    assert needed, "found no packages"
    for path in sorted(needed):
        assert any(path == src or path.startswith(src + "/") for src in copied), f"{path} is not COPY'd"
        src = next(src for src in copied if path == src or path.startswith(src + "/"))
        dest = copied[src]
        # Same relative layout under WORKDIR as in the checkout.
        assert dest in ("./", ".") or dest.rstrip("/") == src, f"{src} is copied to {dest}"
    workdirs = [st.args for st in BUILDER.steps if st.op == "WORKDIR"]
    assert workdirs and workdirs[-1] == "/src"


def test_pip_installs_the_project_root_not_editable() -> None:
    runs = [run for run in _runs(BUILDER) if "/recipe/venv.sh" in run]
    assert len(runs) == 1
    words = runs[0].split("/recipe/venv.sh", 1)[1].split()
    assert words == ["."], f"expected `venv.sh .` (the project root, non-editable), got {words}"
    script = (RECIPE_DIR / "venv.sh").read_text()
    (install,) = re.findall(r"^[^#]*/pip install .*$", script, re.M)
    assert install.rstrip().endswith('-c "$recipe/requirements.lock" "$@"'), install
    assert " -e " not in install and "--editable" not in install


def test_entrypoint_runs_declared_console_scripts() -> None:
    scripts = PYPROJECT["project"]["scripts"]
    for name in ("memoplane-operator", "memoplane-agent"):
        assert f"exec {name} " in ENTRYPOINT_SCRIPT, name
        assert name in scripts, f"{name} is not in [project.scripts]"
    assert "memoplane" in scripts
    # The module each script points at exists in the checkout.
    for target in scripts.values():
        module = target.split(":")[0]
        top = module.split(".")[0]
        roots = [ROOT / w for w in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["where"]]
        assert any((r / top).is_dir() for r in roots), target
    entrypoint = next(st for st in FINAL.steps if st.op == "ENTRYPOINT")
    assert json.loads(entrypoint.args) == ["/usr/local/bin/memoplane-entrypoint"]
    copy = next(st for st in FINAL.steps if st.op == "COPY" and "memoplane-entrypoint" in st.args)
    assert copy.args == "--chmod=0755 image/memoplane-entrypoint /usr/local/bin/memoplane-entrypoint", copy.args


def test_chart_args_select_the_processes() -> None:
    """The chart runs the image with args [operator] and [agent]; the entrypoint maps them."""
    labels = set(re.findall(r"^\s*([\w|\-\"]+)\)", ENTRYPOINT_SCRIPT, re.M))
    templates = ROOT / "charts" / "memoplane" / "templates"
    for name, process in (("operator.yaml", "operator"), ("agent.yaml", "agent")):
        text = (templates / name).read_text()
        assert f"args: [{process}]" in text
        assert process in labels, f"the entrypoint has no case for {process!r}"


def test_runtime_stage_has_libseccomp_and_runs_as_non_root() -> None:
    assert "libseccomp2" in package_list(RUNTIME_PACKAGES), "libseccomp2 is not installed"
    assert "rm -rf /var/lib/apt/lists/*" in (RECIPE_DIR / "apt-install.sh").read_text()
    for path in (BUILD_PACKAGES, RUNTIME_PACKAGES):
        assert not {"gcc", "build-essential"} & set(package_list(path)), f"a compiler in {path.name}"
    users = [st.args for st in FINAL.steps if st.op == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid not in ("0", "root"), users[-1]
    assert f"--uid {uid} " in (RECIPE_DIR / "runtime.sh").read_text(), "runtime.sh does not make the USER"
    assert any(st.op == "COPY" and "--from=build" in st.args and "/opt/memoplane" in st.args for st in FINAL.steps)
    env = " ".join(st.args for st in FINAL.steps if st.op == "ENV")
    assert "PATH=/opt/memoplane/bin:" in env


def test_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for must in (".git", "**/__pycache__", ".pytest_cache", ".venv", "tests"):
        assert must in patterns, f".dockerignore does not exclude {must}"
    for src in [*_copied(BUILDER), *_copied(FINAL), "image"]:  # image/: the recipe, bind-mounted
        for pat in patterns:
            assert not fnmatch.fnmatch(src, pat) and not src.startswith(pat.rstrip("/") + "/"), (
                f".dockerignore pattern {pat!r} excludes {src}, which the Dockerfile COPYs")


def test_chart_image_defaults_to_the_package_version() -> None:
    chart = yaml.safe_load((ROOT / "charts" / "memoplane" / "Chart.yaml").read_text())
    assert chart["appVersion"] == PYPROJECT["project"]["version"]


def _see_this_environments_packages(python: Path) -> None:
    """Put this environment's site-packages (where the dependencies are) after the venv's own.

    Not system_site_packages: that is the base interpreter's, which lacks them when this
    test itself runs in a virtualenv. Plain path lines, so their .pth files (an editable
    install of memoplane among them) are not run: memoplane can only come from the wheel.
    """
    dirs = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    venv_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    Path(venv_site, "this-environments-packages.pth").write_text("\n".join(d for d in dirs if Path(d).is_dir()))


@pytest.mark.timeout(600)
def test_wheel_installs_and_runs_like_in_the_image(tmp_path: Path) -> None:
    """pip wheel the checkout, install the wheel (not editable) into a fresh venv, run it.

    The venv sees this environment's site-packages for the dependencies (no network), but
    the memoplane packages must come from the wheel: the test checks where they load from.
    """
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    # The build requirements, from this environment (the test extra has them): no network.
    for req in map(Requirement, PYPROJECT["build-system"]["requires"]):
        try:
            have = version(req.name)
        except PackageNotFoundError:
            pytest.fail(f"build requirement {req} is not installed: pip install -e '.[test]'")
        assert have in req.specifier, f"build requirement {req}: {have} is installed; pip install -e '.[test]'"
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(wheels), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("memoplane-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    py = env_dir / "bin" / "python"
    # No PYTHONPATH in the venv's processes: one naming the checkout would load memoplane from it, and
    # show pip the checkout's memoplane.egg-info as memoplane already installed (pip then keeps it).
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    inst = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
                           "--no-index", str(wheel)], capture_output=True, text=True, timeout=300, env=env)
    assert inst.returncode == 0, inst.stdout + inst.stderr
    # Only now: had pip seen this environment's memoplane, it would have kept it, not installed the wheel.
    _see_this_environments_packages(py)
    probe = ("import json, memoplane, memoplane_operator, memoplane_agent, memoplane.sandbox.seccomp_filter;"
             "print(json.dumps([m.__file__ for m in (memoplane, memoplane_operator, memoplane_agent)]))")
    # -I: isolated, so neither the checkout (cwd) nor an editable install's path hooks leak in.
    out = subprocess.run([str(py), "-I", "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env=env)
    assert out.returncode == 0, out.stderr
    for path in json.loads(out.stdout):
        assert str(env_dir) in path, f"{path} was not loaded from the installed wheel"
    for script, args in (("memoplane", ["--version"]), ("memoplane-operator", ["--help"]),
                         ("memoplane-agent", ["--help"])):
        exe = env_dir / "bin" / script
        assert exe.is_file(), f"the wheel installed no {script} script"
        run = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
        assert run.returncode == 0, f"{script} {args}: {run.stderr}"
    shown = subprocess.run([str(env_dir / "bin" / "memoplane"), "--version"], capture_output=True, text=True,
                           timeout=60, cwd=tmp_path, env=env).stdout
    assert PYPROJECT["project"]["version"] in shown


def test_debian_builder_reads_the_runtime_stage() -> None:
    """`hack/cluster image` takes the release and the process settings from the Dockerfile itself."""
    from memoplane.testing.image import DEBIAN_BASE_PATH, ImageError, debian_release, runtime_config

    config = runtime_config(STAGES)
    last = {st.op: st.args for st in FINAL.steps}
    assert config.user == last["USER"] and config.workdir == last["WORKDIR"]
    assert config.entrypoint == json.loads(last["ENTRYPOINT"]) and config.cmd == json.loads(last["CMD"])
    assert config.exposed_ports == [f"{port}/tcp" for port in last["EXPOSE"].split()]
    assert config.env["PATH"] == f"/opt/memoplane/bin:{DEBIAN_BASE_PATH}"
    assert config.env["PYTHONUNBUFFERED"] == "1"
    assert debian_release(FINAL.base) == "bookworm"
    assert debian_release("debian:trixie-slim@sha256:" + "a" * 64) == "trixie"
    with pytest.raises(ImageError, match=re.escape("python:3.11-slim")):
        debian_release("python:3.11-slim")
