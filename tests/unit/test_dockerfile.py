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
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


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


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
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


ARGS, STAGES = parse(DOCKERFILE.read_text())
FINAL = STAGES[-1]
BUILDER = next(s for s in STAGES if any("pip install" in st.args for st in s.steps if st.op == "RUN"))


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


def test_base_is_pinned_and_its_python_satisfies_requires_python() -> None:
    m = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-(bookworm|trixie)(@sha256:[0-9a-f]{64})?", STAGES[0].base)
    assert m, f"base image {STAGES[0].base!r} is not pinned to an exact Python and Debian release"
    assert {s.base for s in STAGES} == {STAGES[0].base}, "every stage uses the same base (the venv's python)"
    version = ".".join(m.groups()[:3])
    spec = SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert version in spec, f"Python {version} of the base does not satisfy requires-python {spec}"


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
    runs = [st.args for st in BUILDER.steps if st.op == "RUN" and "pip install" in st.args]
    assert len(runs) == 1
    install = re.search(r"pip install ([^&;]*)", runs[0])
    assert install, runs[0]
    words = install.group(1).split()
    assert words == ["."], f"expected `pip install .` (the project root, non-editable), got {words}"


def test_entrypoint_runs_declared_console_scripts() -> None:
    scripts = PYPROJECT["project"]["scripts"]
    entry = next(st for st in FINAL.steps if st.op == "COPY" and "memoplane-entrypoint" in st.args)
    body = entry.heredoc
    for name in ("memoplane-operator", "memoplane-agent"):
        assert f"exec {name} " in body, name
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
    assert "--chmod=0755" in entry.args


def test_chart_args_select_the_processes() -> None:
    """The chart runs the image with args [operator] and [agent]; the entrypoint maps them."""
    entry = next(st for st in FINAL.steps if st.op == "COPY" and "memoplane-entrypoint" in st.args).heredoc
    labels = set(re.findall(r"^\s*([\w|\-\"]+)\)", entry, re.M))
    templates = ROOT / "charts" / "memoplane" / "templates"
    for name, process in (("operator.yaml", "operator"), ("agent.yaml", "agent")):
        text = (templates / name).read_text()
        assert f"args: [{process}]" in text
        assert process in labels, f"the entrypoint has no case for {process!r}"


def test_runtime_stage_has_libseccomp_and_runs_as_non_root() -> None:
    runs = " ".join(st.args for st in FINAL.steps if st.op == "RUN")
    assert re.search(r"apt-get install [^&]*\blibseccomp2\b", runs), "libseccomp2 is not installed"
    assert "rm -rf /var/lib/apt/lists/*" in runs
    assert not any("gcc" in st.args for st in FINAL.steps), "no compiler in the runtime image"
    users = [st.args for st in FINAL.steps if st.op == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid not in ("0", "root"), users[-1]
    assert any(st.op == "COPY" and "--from=build" in st.args and "/opt/memoplane" in st.args for st in FINAL.steps)
    env = " ".join(st.args for st in FINAL.steps if st.op == "ENV")
    assert "PATH=/opt/memoplane/bin:" in env


def test_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for must in (".git", "**/__pycache__", ".pytest_cache", ".venv", "tests"):
        assert must in patterns, f".dockerignore does not exclude {must}"
    for src in _copied(BUILDER):
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
