"""spec.map.overChunks on the cluster: the operator splits a CSV from a ConfigMap into
record-aligned chunks, runs the missing leaves and combine nodes on the agents in batches,
and serves the rest from the cache; the root's key and value equal an embedded
`memoplane run --over-chunks` of the same file and script. Outcomes (agent run counters,
status counts, keys, values) are asserted, never timings."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import CHUNK_TASK_BYTES

from memoplane.api.specs import computejob_manifest
from memoplane.cluster import mapping as mp
from memoplane.cluster import protocol as p
from memoplane.history import RunRecord

pytestmark = pytest.mark.integration
Stack = Any  # conftest.Stack (fixture `stack`)

SCRIPT = (Path(__file__).resolve().parents[3] / "examples" / "sum_column.py").read_text()
ROWS = 3000


def table(rows: int) -> list[str]:
    rnd = random.Random(7)
    return [f"{i},{rnd.randrange(1000)},{'y' * rnd.randrange(20)}\n" for i in range(rows)]


def csv(lines: list[str]) -> str:
    return "id,value,label\n" + "".join(lines)


def expected(lines: list[str]) -> dict[str, int]:
    values = [int(line.split(",")[1]) for line in lines]
    return {"sum": sum(values), "count": len(values)}


def put_table(stack: Stack, ns: str, name: str, text: str) -> None:
    stack.kube.core.create_namespaced_config_map(ns, {"apiVersion": "v1", "kind": "ConfigMap",
                                                      "metadata": {"name": name, "namespace": ns},
                                                      "data": {"table.csv": text}})


def chunk_job(name: str, config_map: str) -> dict[str, Any]:
    return computejob_manifest(name, None, {
        "python": {"source": SCRIPT, "entrypoint": "main", "combine": "combine"},
        "inputs": [{"name": "rows", "fromConfigMap": {"name": config_map, "key": "table.csv"}},
                   {"name": "column", "value": 1}],
        "map": {"overChunks": "rows"}})


def embedded(tmp_path: Path, text: str) -> dict[str, Any]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "table.csv"
    data.write_text(text)
    (tmp_path / "sum.py").write_text(SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "memoplane.cli", "run", "--json", str(tmp_path / "sum.py"),
                           "--over-chunks", "rows", "--combine", "combine", "--input", f"rows=@{data}",
                           "--input", "column=1", "--chunk-bytes", str(CHUNK_TASK_BYTES)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MEMOPLANE_STORE": str(tmp_path / "store")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def test_over_chunks_runs_the_tree_on_agents_and_an_edit_reruns_a_leaf_and_a_path(stack: Stack, ns: str,
                                                                                  tmp_path: Path) -> None:
    lines = table(ROWS)
    put_table(stack, ns, "cold", csv(lines))
    runs = stack.total_runs()
    stack.apply(ns, chunk_job("cold", "cold"))
    cold = stack.wait(ns, "cold", timeout=300)
    s = cold["status"]
    assert s["phase"] == "Succeeded", s
    assert s["result"]["value"] == expected(lines)            # the unsplit computation
    leaves, combines = s["map"]["leaves"], s["map"]["combines"]
    assert s["map"]["chunks"] >= 8 and leaves["total"] == leaves["computed"] >= 8 and leaves["cached"] == 0
    assert combines["total"] == combines["computed"] >= 2
    # One sandbox run per distinct node, none twice.
    assert stack.total_runs() - runs == leaves["total"] + combines["total"]
    record = stack.store(ns).run_record(s["runId"])   # the parent's run: the root it served
    assert record is not None and RunRecord.from_dict(json.loads(record)).key == s["cacheKey"]
    kids, _ = stack.kube.list(p.COMPUTEJOBS, ns, f"{mp.PARENT_LABEL}={cold['metadata']['uid']}")
    assert kids and all(k["metadata"]["annotations"][mp.FORM_ANNOTATION] == mp.JOBS_FORM for k in kids)

    # The same file and script embedded: the same root key (every node is the same job) and value.
    local = embedded(tmp_path / "cold", csv(lines))
    assert local["chunks"]["root_key"] == s["cacheKey"]
    assert local["result"] == s["result"]["value"]
    assert local["chunks"]["leaves"] == leaves["total"] and local["chunks"]["combines"] == combines["total"]

    # One row edited in the middle: one or two leaves and a path of combines run again.
    edited = list(lines)
    edited[ROWS // 2] = f"{ROWS // 2},123456,edited\n"
    put_table(stack, ns, "edited", csv(edited))
    runs = stack.total_runs()
    stack.apply(ns, chunk_job("edited", "edited"))
    again = stack.wait(ns, "edited", timeout=300)
    s2 = again["status"]
    assert s2["phase"] == "Succeeded", s2
    assert s2["result"]["value"] == expected(edited)
    leaves2, combines2 = s2["map"]["leaves"], s2["map"]["combines"]
    assert 1 <= leaves2["computed"] <= 2 and leaves2["cached"] == leaves2["total"] - leaves2["computed"]
    depth = max(1, (combines["total"]).bit_length())
    assert 1 <= combines2["computed"] <= 2 * depth + 2 < combines["total"] + 2 * depth + 2
    assert stack.total_runs() - runs == leaves2["computed"] + combines2["computed"]
    assert embedded(tmp_path / "edited", csv(edited))["chunks"]["root_key"] == s2["cacheKey"]


def test_a_failing_leaf_fails_the_parent_naming_its_batch(stack: Stack, ns: str) -> None:
    lines = table(ROWS)
    lines[ROWS // 3] = f"{ROWS // 3},not-a-number,bad\n"
    put_table(stack, ns, "bad", csv(lines))
    stack.apply(ns, chunk_job("bad", "bad"))
    s = stack.wait(ns, "bad", timeout=300)["status"]
    assert s["phase"] == "Failed", s
    assert s["reason"] == mp.REASON_SUBTASK_FAILED and "chunk-map node" in s["message"], s
    assert "ValueError" in s["message"] and s["map"]["failed"] >= 1, s


def test_submit_over_chunks_from_the_command_line(stack: Stack, ns: str, tmp_path: Path) -> None:
    lines = table(ROWS // 2)
    (tmp_path / "sum.py").write_text(SCRIPT)
    (tmp_path / "t.csv").write_text(csv(lines))
    proc = subprocess.run([sys.executable, "-m", "memoplane.cli", "submit", str(tmp_path / "sum.py"), "-n", ns,
                           "--input", f"rows=@{tmp_path / 't.csv'}", "--input", "column=1", "--over-chunks", "rows",
                           "--combine", "combine", "--name", "cli", "--wait", "--json"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **stack.cfg.env})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads(proc.stdout)
    assert got["phase"] == "Succeeded" and got["result"]["value"] == expected(lines), got
    assert got["cacheKey"] == embedded(tmp_path / "embedded", csv(lines))["chunks"]["root_key"]


MAKE_TABLE = ("def main(n):\n"
              "    return ''.join(f'{i},{i % 97},x\\n' for i in range(n)).encode()\n")


def test_over_chunks_of_an_upstream_file_follows_the_upstream(stack: Stack, ns: str) -> None:
    upstream = computejob_manifest("table", None, {"python": {"source": MAKE_TABLE, "entrypoint": "main"},
                                                   "inputs": [{"name": "n", "value": 2000}]})
    parent = computejob_manifest("total", None, {
        "python": {"source": SCRIPT, "entrypoint": "main", "combine": "combine"},
        "inputs": [{"name": "rows", "fromJob": {"name": "table"}}, {"name": "column", "value": 1}],
        "map": {"overChunks": "rows"}})
    stack.apply(ns, upstream, parent)
    first = stack.wait_all(ns, ["table", "total"], timeout=300)["total"]["status"]
    assert first["phase"] == "Succeeded", first
    assert first["result"]["value"] == {"sum": sum(i % 97 for i in range(2000)), "count": 2000}

    # Rows appended upstream: the parent is recomputed over the new file; the old chunks are hits.
    stack.kube.json_patch(p.COMPUTEJOBS, ns, "table", [{"op": "replace", "path": "/spec/inputs/0/value",
                                                        "value": 2100}])
    want = {"sum": sum(i % 97 for i in range(2100)), "count": 2100}
    again = stack.wait(ns, "total", lambda o: (o.get("status") or {}).get("phase") == "Succeeded"
                       and o["status"]["result"]["value"] == want, timeout=300)["status"]
    leaves = again["map"]["leaves"]
    assert leaves["cached"] >= 1 and 1 <= leaves["computed"] <= 2, again["map"]


def test_a_leaf_that_returns_bytes_fails_the_parent_clearly(stack: Stack, ns: str) -> None:
    put_table(stack, ns, "raw", csv(table(ROWS // 3)))
    raw = chunk_job("raw", "raw")
    raw["spec"]["python"]["source"] = "def main(rows, column):\n    return rows[:4]\n\ndef combine(a, b):\n    return a\n"
    stack.apply(ns, raw)
    s = stack.wait(ns, "raw", timeout=300)["status"]
    assert s["phase"] == "Failed" and s["message"].startswith("spec.map.overChunks: the sub-task of key"), s
    assert "not JSON" in s["message"], s
