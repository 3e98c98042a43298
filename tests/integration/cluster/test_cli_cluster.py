"""`memoplane submit | get | logs | result JOB` against the running stack, as a user runs them."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from memoplane.keys import digest_bytes

Stack = Any  # the `stack` fixture of this folder's conftest

SCRIPT = """
def main(rows, blob):
    print("rows:", len(rows))
    return {"total": sum(rows), "blob": len(blob)}
"""


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memoplane.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_submit_wait_get_logs_result(stack: Stack, ns: str, tmp_path: Path) -> None:
    env = stack.cfg.env
    script, data = tmp_path / "job.py", tmp_path / "data.bin"
    script.write_text(SCRIPT)
    data.write_bytes(b"\x00" * 1000)
    args = ["submit", str(script), "-n", ns, "--input", "rows=[1,2,3]", "--input", f"blob=@{data}"]
    first = cli(*args, "--name", "first", "--wait", "--json", env=env)
    assert first.returncode == 0, first.stderr
    status = json.loads(first.stdout)
    assert status["phase"] == "Succeeded" and status["cached"] is False
    assert status["result"]["value"] == {"total": 6, "blob": 1000}

    second = cli(*args, "--wait", "--json", env=env)  # a generated name, same content
    assert second.returncode == 0, second.stderr
    again = json.loads(second.stdout)
    assert again["cached"] is True and again["cacheKey"] == status["cacheKey"]

    got = cli("get", "first", "-n", ns, "--json", env=env)
    assert json.loads(got.stdout)["cacheKey"] == status["cacheKey"]
    logs = cli("logs", "first", "-n", ns, env=env)
    assert logs.returncode == 0 and "rows: 3" in logs.stdout
    out = tmp_path / "out"
    result = cli("result", "first", "-n", ns, "-o", str(out), env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "return.json").read_text()) == {"blob": 1000, "total": 6}


HASH_PATH = """
import hashlib
def main(table):
    digest = hashlib.sha256()
    with open(table, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return [type(table).__name__, digest.hexdigest()]
"""


def test_submit_uploads_a_file_over_the_config_map_limit_and_names_it_by_digest(
        stack: Stack, ns: str, tmp_path: Path) -> None:
    env = stack.cfg.env
    script, data = tmp_path / "job.py", tmp_path / "table.bin"
    script.write_text(HASH_PATH)
    content = b"".join(hashlib.shake_256(i.to_bytes(4, "big")).digest(1 << 20) for i in range(20))  # 20 MiB
    data.write_bytes(content)
    args = ["submit", str(script), "-n", ns, "--input", f"table=@{data}", "--as", "table=path", "--memory", "150Mi"]
    done = cli(*args, "--name", "uploaded", "--wait", "--json", env=env)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["phase"] == "Succeeded", status
    assert status["result"]["value"] == ["str", hashlib.sha256(content).hexdigest()]
    job = json.loads(cli("get", "uploaded", "-n", ns, "--json", env=env).stdout)
    assert job["cacheKey"] == status["cacheKey"]
    (item,) = stack.get(ns, "uploaded")["spec"]["inputs"]
    assert item == {"name": "table", "fromBlob": {"digest": digest_bytes(content)}, "as": "path"}


def test_failure_and_missing_job(stack: Stack, ns: str, tmp_path: Path) -> None:
    env = stack.cfg.env
    script = tmp_path / "bad.py"
    script.write_text("def main():\n    raise ValueError('no good')\n")
    failed = cli("submit", str(script), "-n", ns, "--wait", env=env)
    assert failed.returncode == 1
    assert "ValueError: no good" in failed.stderr and failed.stderr.strip().splitlines()[-1].startswith("memoplane:")
    missing = cli("get", "does-not-exist", "-n", ns, env=env)
    assert missing.returncode == 4 and "not found" in missing.stderr
