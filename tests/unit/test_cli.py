"""The `memoplane` command: run, explain, result, verify, gc, cache stats, and
the one-line errors for bad input. Jobs run in the real sandbox."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes import damage_packed_chunks

SCRIPT = """
def main(rows, scale=1):
    print("summing", len(rows))
    return {"total": sum(rows) * scale}
"""


def memoplane(store: Path, *args: str, check: bool = True, cold: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MEMOPLANE_STORE": str(store)}
    if cold is not None:
        env["MEMOPLANE_COLD_STORE"] = str(cold)
    proc = subprocess.run([sys.executable, "-m", "memoplane.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "job.py"
    path.write_text(SCRIPT)
    return path


def run_json(store: Path, *args: str) -> dict:
    return json.loads(memoplane(store, "run", "--json", *args).stdout)


def test_run_then_hit(tmp_path: Path, script: Path) -> None:
    store = tmp_path / "store"
    first = run_json(store, str(script), "--input", "rows=[1,2,3]", "--input", "scale=10")
    assert first["cached"] is False and first["result"] == {"total": 60}
    assert first["explain"] == ["no earlier run of this job is recorded"]
    second = run_json(store, str(script), "--input", "rows=[1,2,3]", "--input", "scale=10")
    assert second["cached"] is True and second["result"] == {"total": 60}
    assert second["cache_key"] == first["cache_key"] and second["result_digest"] == first["result_digest"]
    assert second["compute_seconds_saved"] == pytest.approx(first["compute_seconds"])
    assert second["isolation"]["userns"] is True


def test_text_output_replays_job_stdout_on_a_hit(tmp_path: Path, script: Path) -> None:
    store = tmp_path / "store"
    memoplane(store, "run", str(script), "--input", "rows=[1]")
    hit = memoplane(store, "run", str(script), "--input", "rows=[1]")
    assert "summing 1" in hit.stdout and json.loads(hit.stdout.split("\n", 1)[1]) == {"total": 1}
    assert "cache hit" in hit.stderr


def test_explain_names_the_changed_input(tmp_path: Path, script: Path) -> None:
    store = tmp_path / "store"
    run_json(store, str(script), "--input", "rows=[1,2]")
    changed = run_json(store, str(script), "--input", "rows=[1,3]")
    assert changed["cached"] is False
    assert [line for line in changed["explain"] if line.startswith("inputs.rows changed")]
    out = json.loads(memoplane(store, "explain", "--json", str(script), "--input", "rows=[9]").stdout)
    assert out["stored"] is False and any(c.startswith("inputs.rows changed") for c in out["changes"])


def test_code_change_is_a_new_key(tmp_path: Path, script: Path) -> None:
    store = tmp_path / "store"
    first = run_json(store, str(script), "--input", "rows=[1]")
    script.write_text(SCRIPT + "\n# touched\n")
    second = run_json(store, str(script), "--input", "rows=[1]")
    assert second["cache_key"] != first["cache_key"] and second["cached"] is False
    assert any(line.startswith("code changed") for line in second["explain"])


def test_file_input_and_command_outputs(tmp_path: Path) -> None:
    store = tmp_path / "store"
    data = tmp_path / "rows.txt"
    data.write_text("a\nb\nc\n")
    cmd = ["--", "sh", "-c", "wc -l < $MEMOPLANE_IN/rows > $MEMOPLANE_OUT/count"]
    first = run_json(store, "--input", f"rows=@{data}", *cmd)
    assert first["outputs"] == ["count"] and first["cached"] is False
    again = run_json(store, "--input", f"rows=@{data}", *cmd)
    assert again["cached"] is True
    out_dir = tmp_path / "out"
    memoplane(store, "result", first["cache_key"], "-o", str(out_dir))
    assert (out_dir / "count").read_text().strip() == "3"


def test_policies(tmp_path: Path, script: Path) -> None:
    store = tmp_path / "store"
    args = [str(script), "--input", "rows=[5]"]
    run_json(store, *args)
    assert run_json(store, "--policy", "Refresh", *args)["cached"] is False
    assert run_json(store, "--policy", "Bypass", *args)["cached"] is False
    assert run_json(store, *args)["cached"] is True


def test_bytes_result_and_result_by_digest(tmp_path: Path) -> None:
    store = tmp_path / "store"
    script = tmp_path / "b.py"
    script.write_text("def main():\n    return b'\\x00binary'\n")
    out = run_json(store, str(script))
    assert out["value_kind"] == "bytes" and out["result"]["size"] == 7
    shown = json.loads(memoplane(store, "result", "--json", out["result_digest"], "-o", str(tmp_path / "o")).stdout)
    assert (tmp_path / "o" / "return.bin").read_bytes() == b"\x00binary"
    assert shown["cache_key"] == out["cache_key"]


def test_stats_verify_gc(tmp_path: Path, script: Path) -> None:
    store = tmp_path / "store"
    run_json(store, str(script), "--input", "rows=[1]")
    run_json(store, str(script), "--input", "rows=[2]")
    stats = json.loads(memoplane(store, "cache", "stats", "--json").stdout)
    assert stats["entries"] == 2 and stats["logical_bytes"] > 0 and stats["stored_bytes"] > 0
    assert json.loads(memoplane(store, "verify", "--json").stdout)["ok"] is True
    gc = json.loads(memoplane(store, "gc", "--grace", "0", "--json").stdout)
    assert gc["gc"]["deleted"] == 0
    assert run_json(store, str(script), "--input", "rows=[1]")["cached"] is True


def test_gc_moves_content_unread_for_30_days_to_the_cold_tier_and_a_hit_reads_it_back(tmp_path: Path) -> None:
    store, cold = tmp_path / "store", tmp_path / "cold"
    script = tmp_path / "big.py"
    script.write_text("def main():\n    return bytes(range(256)) * 4096\n")
    first = json.loads(memoplane(store, "run", "--json", str(script), cold=cold).stdout)
    fresh = json.loads(memoplane(store, "gc", "--json", cold=cold).stdout)
    assert fresh["tier"]["moved"] == 0 and fresh["tier"]["kept_hot"] > 0   # just written
    month_ago = time.time() - 31 * 86400
    for path in (store / "packs").rglob("*"):
        os.utime(path, (month_ago, month_ago))   # as if written a month ago and not read since
    for mark in (store / "tiers" / "marks").glob("*"):   # the run's own read (its value) was then too
        mark.rename(mark.with_name(f"{int(month_ago * 1000):015d}-{mark.name.split('-', 1)[1]}"))
    text = memoplane(store, "gc", cold=cold).stdout
    assert "to the cold tier" in text and "moved 0" not in text
    assert not [f for f in (store / "packs").rglob("*") if f.is_file()]
    assert [f for f in (store / "index").rglob("*") if f.is_file()]   # index segments stay hot
    moved = {f.name for f in (cold / "packs").rglob("*") if f.is_file()}
    assert moved
    again = json.loads(memoplane(store, "run", "--json", str(script), cold=cold).stdout)
    assert again["cached"] is True and again["result_digest"] == first["result_digest"]
    assert memoplane(store, "result", first["result_digest"], cold=cold).stdout   # the value, read through
    rewarmed = {f.name for f in (store / "packs").rglob("*") if f.is_file()}
    assert rewarmed and rewarmed <= moved   # what the hit read (the value's pack) is hot again


def test_verify_reports_damage_and_the_job_recomputes(tmp_path: Path) -> None:
    store = tmp_path / "store"
    script = tmp_path / "big.py"
    script.write_text("def main():\n    return bytes(range(256)) * 4096\n")
    first = run_json(store, str(script))
    assert damage_packed_chunks(store) > 0
    proc = memoplane(store, "verify", check=False)
    assert proc.returncode == 3 and "DAMAGED" in proc.stdout
    again = run_json(store, str(script))
    assert again["cached"] is False and again["result"] == first["result"]  # same value blob digest
    assert memoplane(store, "verify", check=False).returncode == 0


@pytest.mark.parametrize(
    ("source", "args", "reason", "exit_code"),
    [
        ("def main(x):\n    return 1 / x\n", ["--input", "x=0"], "ZeroDivisionError", 1),
        ("def main(:\n", [], "syntax", 1),
        ("def main():\n    return object()\n", [], "unserializable", 1),
        ("def main(x):\n    return x\n", ["--input", "y=1"], "unknown input 'y'", 1),
        ("def main():\n    while True:\n        pass\n", ["--timeout", "1"], "timeout", 1),
        ("def main():\n    return bytearray(8 << 30)\n", ["--memory", "256Mi"], "memory", 1),
        ("def main():\n    return 1\n", ["--input", "x=oops"], "is not JSON", 2),
        ("def main():\n    return 1\n", ["--input", "x"], "has no '='", 2),
        ("def main():\n    return 1\n", ["--memory", "lots"], "--memory", 2),
        ("def main():\n    import os\n    open(os.environ['MEMOPLANE_OUT'] + '/f', 'wb').write(b'x' * 4096)\n",
         ["--max-output", "1Ki"], "output", 1),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path: Path, source: str, args: list[str], reason: str,
                                     exit_code: int) -> None:
    store = tmp_path / "store"
    script = tmp_path / "job.py"
    script.write_text(source)
    proc = memoplane(store, "run", str(script), *args, check=False)
    assert proc.returncode == exit_code
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("memoplane: ") and reason in last
    assert "Traceback" not in last
    stats = json.loads(memoplane(store, "cache", "stats", "--json").stdout) if store.exists() else {"entries": 0}
    assert stats["entries"] == 0  # nothing cached


def test_missing_script(tmp_path: Path) -> None:
    proc = memoplane(tmp_path / "s", "run", str(tmp_path / "nope.py"), check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_unknown_key(tmp_path: Path) -> None:
    proc = memoplane(tmp_path / "s", "result", "b3:" + "0" * 64, check=False)
    assert proc.returncode == 4 and "neither a cache key nor a result digest" in proc.stderr
    bad = memoplane(tmp_path / "s", "result", "b3:nothex", check=False)
    assert bad.returncode == 2 and "KEY_OR_DIGEST" in bad.stderr


def test_job_commands_without_a_cluster_say_how_to_get_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    for args in (("result", "some-job"), ("get", "some-job"), ("logs", "some-job")):
        proc = memoplane(tmp_path / "s", *args, check=False)
        assert proc.returncode == 6 and "hack/cluster env" in proc.stderr and "Traceback" not in proc.stderr
