"""`memoplane history | diff | lineage | stale | history prune` after real `memoplane run`s."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
def main(rows):
    return {"total": sum(rows), "n": len(rows)}
"""


def memoplane(store: Path, *args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MEMOPLANE_STORE": str(store)}
    proc = subprocess.run([sys.executable, "-m", "memoplane.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_history_diff_lineage_stale_and_prune_after_real_runs(tmp_path: Path) -> None:
    store, script = tmp_path / "store", tmp_path / "job.py"
    script.write_text(SCRIPT)
    for rows in ("[1,2,3]", "[1,2,3,4]", "[1,2,3,4]"):
        memoplane(store, "run", str(script), "--input", f"rows={rows}")

    log = json.loads(memoplane(store, "history", str(script), "--json").stdout)
    assert log["job"] == f"script:{script.resolve()}:main"
    newest, middle, first = log["entries"]
    assert (newest["cached"], middle["cached"], first["cached"]) == (True, False, False)
    assert first["why"] == ["first recorded run"] and middle["why"][0].startswith("inputs.rows changed")
    assert newest["result"] == middle["result"] != first["result"]
    text = memoplane(store, "history", "job.py", cwd=tmp_path).stdout
    assert sum(line.startswith("run ") for line in text.splitlines()) == 3 and "inputs.rows changed" in text

    changed = json.loads(memoplane(store, "diff", first["run_id"], middle["run_id"], "--json").stdout)
    assert [c["what"] for c in changed["inputs"]] == ["rows"]
    assert [(c["what"], c["before"], c["after"]) for c in changed["value"]] == [("$.n", 3, 4), ("$.total", 6, 10)]
    assert changed["code"] == [] and changed["env"] == []
    assert "$.total: 6 -> 10" in memoplane(store, "diff", first["run_id"], middle["run_id"]).stdout

    down = json.loads(memoplane(store, "lineage", "down", middle["result"], "--json").stdout)
    assert {n["run"]["run_id"] for n in down["nodes"]} == {middle["run_id"], newest["run_id"]}
    assert down["edges"] == [] and not down["truncated"]

    (tmp_path / "new.json").write_text("[5]")
    assert json.loads(memoplane(store, "stale", "--input", "rows=[1,2,3,4]", "--json").stdout)["runs"] == []
    stale = json.loads(memoplane(store, "stale", "--input", "rows=[5]", "--json").stdout)["runs"]
    assert [(r["run_id"], r["because"]) for r in stale] == [(newest["run_id"], "input rows differs")]
    by_file = json.loads(memoplane(store, "stale", "-i", f"rows=@{tmp_path / 'new.json'}", "--json").stdout)
    assert len(by_file["runs"]) == 1   # a file's bytes digest differently from the JSON value

    memoplane(store, "gc", "--grace", "0", "--max-age", "0.001s")   # every ref evicted: the records keep the results
    assert json.loads(memoplane(store, "result", first["result"], "--json").stdout)["result"] == {"n": 3, "total": 6}
    pruned = json.loads(memoplane(store, "history", "prune", "--older-than", "0s", "--json").stdout)
    assert pruned["dropped"] == 3
    gone = memoplane(store, "history", str(script), check=False)
    assert gone.returncode != 0 and "no recorded run" in gone.stderr
    memoplane(store, "gc", "--grace", "0")
    assert memoplane(store, "result", first["result"], check=False).returncode != 0


def test_bad_queries_are_one_line_errors(tmp_path: Path) -> None:
    store = tmp_path / "store"
    for args, expected in ((("history", "nothing"), "no recorded run of job 'nothing'"),
                           (("history", "prune"), "needs --older-than"),
                           (("diff", "a", "b"), "is not a run id"),
                           (("lineage", "up", "b3:00"), "no recorded run returned"),
                           (("stale", "--input", "rows"), "has no '='")):
        proc = memoplane(store, *args, check=False)
        assert proc.returncode != 0 and expected in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, \
            (args, proc.stderr)
