"""A runtime that lives under /tmp (`python3 -m venv /tmp/venv`, as CI does) is
part of the job's view, read-only at its own path, although the job has a
/tmp of its own; nothing else of the host's /tmp is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.hostile

# Run by the venv's interpreter, so that the zygote is that interpreter too
# (zygote_client starts sys.executable).
POOL = """
import json, sys, tempfile
from pathlib import Path
from memoplane.sandbox import Limits, PythonTask, SandboxPool, SandboxRequest
job, inputs = sys.argv[1], json.loads(sys.argv[2])
with SandboxPool(profile="minimal", size=0) as pool, tempfile.TemporaryDirectory() as d:
    i, o = Path(d, "in"), Path(d, "out")
    i.mkdir()
    o.mkdir()
    for _ in range(2):  # a second child: the first one must not use the runtime up
        out = pool.run(SandboxRequest(PythonTask(job, inputs=inputs), i, o, limits=Limits(timeout_s=20)))
        print(json.dumps({"ok": out.ok, "value": out.value, "failure": str(out.failure)}))
"""

JOB = """
import os, sys
import tmp_venv_probe
def main(site, beside):
    try:
        open(os.path.join(site, "planted.py"), "w").close()
        write = "written"
    except OSError as e:
        write = e.strerror
    return [tmp_venv_probe.VALUE, tmp_venv_probe.__file__, sys.prefix, write,
            sorted(os.listdir(beside))]
"""


def _make_venv(venv: Path) -> Path:
    """A venv with a tiny package of its own; returns its site-packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages",
                    str(venv)], check=True)
    site = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    # What this interpreter imports (memoplane, pyseccomp), wherever it was installed,
    # e.g. when the suite itself runs from another venv.
    (site / "test-interpreter.pth").write_text("\n".join(p for p in sys.path if os.path.isdir(p)))
    (site / "tmp_venv_probe").mkdir()
    (site / "tmp_venv_probe" / "__init__.py").write_text("VALUE = 'from a venv under /tmp'\n")
    return site


def _run_jobs(python: Path, inputs: dict[str, Any]) -> list[dict[str, Any]]:
    done = subprocess.run([str(python), "-c", POOL, JOB, json.dumps(inputs)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_a_venv_under_tmp_is_importable_and_read_only(tmp_path: Path) -> None:
    assert str(tmp_path).startswith("/tmp/"), tmp_path  # the case under test
    venv = tmp_path / "venv"
    site = _make_venv(venv)
    (tmp_path / "beside-the-venv.txt").write_text("not part of the runtime")
    outs = _run_jobs(venv / "bin" / "python", {"site": str(site), "beside": str(tmp_path)})
    assert len(outs) == 2
    for out in outs:
        assert out["ok"], out["failure"]
        assert out["value"] == ["from a venv under /tmp", str(site / "tmp_venv_probe" / "__init__.py"),
                                str(venv), "Read-only file system", ["venv"]]
    assert not (site / "planted.py").exists()
