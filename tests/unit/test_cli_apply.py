"""`memoplane apply -f`: ComputeJob manifests run embedded (real sandbox runs), with propagation,
early cutoff and run records naming the upstream runs; what is not supported embedded is
refused in one line naming the document and the field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from memoplane.cas import open_store
from memoplane.cluster import mapping as mp
from memoplane.commands import manifests as mf
from memoplane.commands.pipeline import Context, apply, element_job_name
from memoplane.history import RunRecord
from memoplane.jobs import JsonInput
from memoplane.sandbox import SandboxPool
from memoplane.trust.local import Keyring

DAG = Path(__file__).resolve().parents[2] / "examples" / "dag.yaml"


def memoplane(store: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MEMOPLANE_STORE": str(store)}
    return subprocess.run([sys.executable, "-m", "memoplane.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300, input=stdin)


def apply_json(store: Path, *files: str | Path, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    proc = memoplane(store, "apply", "--json", *[a for f in files for a in ("-f", str(f))], *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {job["name"]: job for job in report["jobs"]}


def edited_dag(tmp_path: Path, old: str, new: str) -> Path:
    text = DAG.read_text()
    assert old in text
    path = tmp_path / f"dag-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(text.replace(old, new))
    return path


def test_dag_computes_then_serves_then_propagates_a_change(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = apply_json(store, DAG)
    assert (first["computed"], first["cached"]) == (3, 0)
    assert [j["name"] for j in first["jobs"]] == ["download", "normalize", "report"]
    assert by_name(first)["report"]["value"]["n"] == 1000

    second = apply_json(store, DAG)
    assert (second["computed"], second["cached"]) == (0, 3)
    for name, job in by_name(second).items():
        assert job["cacheKey"] == by_name(first)[name]["cacheKey"] and job["result"] == by_name(first)[name]["result"]
        assert job["runId"] != by_name(first)[name]["runId"]   # a served run is a run, recorded

    ten = apply_json(store, edited_dag(tmp_path, "value: 1000", "value: 10"))
    jobs = by_name(ten)
    assert ten["computed"] == 3 and jobs["report"]["value"]["n"] == 10
    assert jobs["normalize"]["upstreamChanged"] == ["download"]
    assert jobs["report"]["upstreamChanged"] == ["download", "normalize"]
    assert not any(j["earlyCutoff"] for j in jobs.values())


def test_a_comment_only_change_recomputes_the_upstream_and_cuts_off_downstream(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = by_name(apply_json(store, DAG))
    comment = edited_dag(tmp_path, "# stand-in for fetching data", "# a stand-in (comment edited)")
    after = apply_json(store, comment)
    jobs = by_name(after)
    assert (after["computed"], after["cached"]) == (1, 2)
    assert jobs["download"]["state"] == "computed" and jobs["download"]["cacheKey"] != first["download"]["cacheKey"]
    assert jobs["download"]["valueDigest"] == first["download"]["valueDigest"]
    for name in ("normalize", "report"):
        assert jobs[name]["state"] == "cached" and jobs[name]["cacheKey"] == first[name]["cacheKey"]
        assert jobs[name]["earlyCutoff"] is True and jobs[name]["cutoffUpstreams"] == ["download"]
        assert jobs[name]["upstreamChanged"] == []
    again = edited_dag(tmp_path, "# stand-in for fetching data", "# edited once more")
    text = memoplane(store, "apply", "-f", str(again)).stdout   # the text output says so too
    assert text.count("early cutoff: download recomputed, its value unchanged: nothing ran") == 2, text


def test_run_records_name_the_upstream_runs_of_the_same_apply(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    jobs = by_name(apply_json(store_dir, DAG))
    with open_store(str(store_dir)) as store:
        records = {name: RunRecord.from_json(store.run_record(job["runId"]) or b"") for name, job in jobs.items()}
    assert records["report"].job.namespace == "default" and records["report"].job.name == "report"
    inputs = {i.name: i for i in records["report"].inputs}
    for input_name, upstream in (("rows", "download"), ("normalized", "normalize")):
        got = inputs[input_name]
        assert got.source == "fromJob" and got.upstream_job == f"default/{upstream}"
        assert got.upstream_run == jobs[upstream]["runId"] and got.upstream_result == jobs[upstream]["result"]
        assert got.digest == jobs[upstream]["valueDigest"]
    assert records["download"].inputs[0].source == "value" and records["download"].key == jobs["download"]["cacheKey"]


def test_stdin_and_text_output(tmp_path: Path) -> None:
    proc = memoplane(tmp_path / "store", "apply", "-f", "-", stdin=DAG.read_text())
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("download") and "computed  key b3:" in lines[0]
    assert lines[-1].startswith("memoplane apply: 3 jobs: 3 computed")
    assert '"n": 1000' in proc.stdout


MAP = """
apiVersion: memoplane.io/v1alpha1
kind: ComputeJob
metadata: {name: squares}
spec:
  python: {source: "def main(x, k):\\n    return x * x + k\\n"}
  inputs:
    - {name: x, value: [3, 1, 3, 2]}
    - {name: k, value: 100}
  map: {over: x}
---
apiVersion: memoplane.io/v1alpha1
kind: ComputeJob
metadata: {name: total}
spec:
  python: {source: "def main(values):\\n    return sum(values)\\n"}
  inputs:
    - {name: values, fromJob: {name: squares}}
"""


def test_map_runs_one_task_per_distinct_element_with_the_clusters_parent_key(tmp_path: Path) -> None:
    path = tmp_path / "map.yaml"
    path.write_text(MAP)
    store = tmp_path / "store"
    first = by_name(apply_json(store, path))
    squares = first["squares"]
    assert squares["value"] == [109, 101, 109, 104] and first["total"]["value"] == 423
    assert squares["map"] == {"total": 4, "computed": 3, "cached": 0}
    with open_store(str(store)) as opened:
        record = RunRecord.from_json(opened.run_record(squares["runId"]) or b"")
        children = [RunRecord.from_json(opened.run_record(i.upstream_run or "") or b"") for i in record.inputs]
    assert [c.job.name for c in children] == [element_job_name("squares", x) for x in (3, 1, 3, 2)]
    assert squares["cacheKey"] == mp.map_key("x", [c.key for c in children])
    total_input = RunRecord.from_json(opened.run_record(first["total"]["runId"]) or b"").inputs[0]
    assert total_input.upstream_run == squares["runId"]

    path.write_text(MAP.replace("[3, 1, 3, 2]", "[3, 1, 3, 2, 5]"))
    second = by_name(apply_json(store, path))
    assert second["squares"]["map"] == {"total": 5, "computed": 1, "cached": 3}
    assert second["total"]["value"] == 423 + 125


def test_config_maps_seeds_and_local_objects_as_inputs(tmp_path: Path) -> None:
    data = tmp_path / "t.csv"
    data.write_text("a,b\n1,2\n")
    path = tmp_path / "inputs.yaml"
    path.write_text("""
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {mode: fast}
---
apiVersion: memoplane.io/v1alpha1
kind: GMemSeed
metadata: {name: field}
spec: {seed: 1337}
---
apiVersion: memoplane.io/v1alpha1
kind: ComputeJob
metadata: {name: reader}
spec:
  python:
    source: |
      def main(mode, table, noise):
          return {"mode": mode.decode(), "table": table.decode(), "noise": len(noise)}
  inputs:
    - {name: mode, fromConfigMap: {name: settings, key: mode}}
    - {name: table, fromObject: {bucket: data, key: t.csv}}
    - {name: noise, fromSeed: {name: field, offset: 0, count: 8}}
""")
    store = tmp_path / "store"
    refused = memoplane(store, "apply", "-f", str(path))
    assert refused.returncode == 1
    assert "spec.inputs[1].fromObject: not supported embedded without a local copy: pass --object data/t.csv=PATH" \
        in refused.stdout
    got = by_name(apply_json(store, path, extra=("--object", f"data/t.csv={data}")))["reader"]
    assert got["state"] == "computed"
    assert got["value"] == {"mode": "fast", "table": "a,b\n1,2\n", "noise": 8}
    with open_store(str(store)) as opened:
        record = RunRecord.from_json(opened.run_record(got["runId"]) or b"")
    assert [i.source for i in record.inputs] == ["fromConfigMap", "fromObject", "fromSeed"]


SUM = """
def main(rows):
    return {"sum": sum(int(line) for line in rows.split(b"\\n") if line), "rows": rows.count(b"\\n")}


def combine(a, b):
    return {"sum": a["sum"] + b["sum"], "rows": a["rows"] + b["rows"]}
"""


def test_over_chunks_runs_the_chunk_tree_with_the_keys_of_memoplane_run(tmp_path: Path) -> None:
    numbers = "".join(f"{i}\n" for i in range(20000))
    (tmp_path / "rows.txt").write_text(numbers)
    (tmp_path / "sum.py").write_text(SUM)
    path = tmp_path / "chunks.yaml"
    path.write_text(yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "table"}, "data": {"rows": numbers}},
        _manifest("total", {"python": {"source": SUM, "combine": "combine"},
                            "inputs": [{"name": "rows", "fromConfigMap": {"name": "table", "key": "rows"}}],
                            "map": {"overChunks": "rows"}})]))
    store = tmp_path / "store"
    env = ("--chunk-bytes", "4096")
    os.environ["MEMOPLANE_CHUNK_TASK_BYTES"] = "4096"
    try:
        first = by_name(apply_json(store, path))["total"]
        again = by_name(apply_json(store, path))["total"]
        run = memoplane(store, "run", str(tmp_path / "sum.py"), "--over-chunks", "rows", "--combine", "combine",
                        "--input", f"rows=@{tmp_path / 'rows.txt'}", *env, "--json")
    finally:
        del os.environ["MEMOPLANE_CHUNK_TASK_BYTES"]
    assert first["state"] == "computed" and first["value"] == {"sum": sum(range(20000)), "rows": 20000}
    assert first["map"]["total"] > 3, first["map"]     # a tree, not one node
    assert again["state"] == "cached" and again["cacheKey"] == first["cacheKey"]
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["chunks"]["root_key"] == first["cacheKey"]


def _manifest(name: str, spec: dict[str, Any], kind: str = "ComputeJob") -> dict[str, Any]:
    return {"apiVersion": "memoplane.io/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec}


PY = {"python": {"source": "def main(x):\n    return x\n"}, "inputs": [{"name": "x", "value": 1}]}


@pytest.mark.parametrize(("docs", "expected"), [
    ([_manifest("a", {"python": {"source": "x"}, "command": ["true"]})],
     "document 1 (ComputeJob 'a'): "),
    ([_manifest("a", PY), _manifest("b", {**PY, "verify": {"replicas": 2}})],
     "document 2 (ComputeJob 'b'): spec.verify.replicas 2: not supported embedded: needs distinct nodes"),
    ([_manifest("c", {**PY, "cache": {"resultCache": "fast"}})],
     "spec.cache.resultCache 'fast': not supported embedded"),
    ([_manifest("default", {"store": {"bucket": "memoplane"}}, kind="ResultCache"), _manifest("a", PY)],
     "document 1 (ResultCache 'default'): ResultCache is not supported embedded"),
    ([{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}],
     "kind 'Secret' (v1) is not supported by memoplane apply"),
    ([_manifest("a", {"python": {"source": "def main(b):\n    return b\n"},
                      "inputs": [{"name": "b", "fromJob": {"name": "b"}}]}),
      _manifest("b", {"python": {"source": "def main(c):\n    return c\n"},
                      "inputs": [{"name": "c", "fromJob": {"name": "c"}}]}),
      _manifest("c", {"python": {"source": "def main(a):\n    return a\n"},
                      "inputs": [{"name": "a", "fromJob": {"name": "a"}}]})],
     "fromJob inputs form a cycle: a -> b -> c -> a"),
])
def test_refusals_are_one_line_naming_the_document_and_field(tmp_path: Path, docs: list[dict[str, Any]],
                                                             expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    proc = memoplane(tmp_path / "store", "apply", "-f", str(path))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").rglob("runs/*"))   # nothing ran


def test_a_failed_job_is_retried_up_to_its_backoff_limit_and_its_downstream_skipped(tmp_path: Path) -> None:
    boom = {"python": {"source": "def main(x):\n    raise RuntimeError('boom')\n"},
            "inputs": [{"name": "x", "value": 1}], "backoffLimit": 1}
    after = {"python": {"source": "def main(y):\n    return y\n"}, "inputs": [{"name": "y", "fromJob": {"name": "boom"}}]}
    path = tmp_path / "fail.yaml"
    path.write_text(yaml.safe_dump_all([_manifest("boom", boom), _manifest("after", after)]))
    slept: list[float] = []
    keyring = Keyring(tmp_path / "keys")
    with open_store(str(tmp_path / "store")) as store, \
            SandboxPool(profile="python", size=0, require_isolation=False) as pool:
        ctx = Context(mf.load(str(path)), store, keyring.policy(), keyring.signer(), lambda _: lambda: pool,
                      sleep=slept.append)
        outcomes = {o.ref[1]: o for o in apply(ctx)}
        failed_runs = [RunRecord.from_json(store.run_record(i) or b"") for i in store.run_record_ids()]
    assert outcomes["boom"].state == "failed" and outcomes["boom"].attempts == 2 and "boom" in outcomes["boom"].message
    assert slept == [1.0]   # memoplane.cluster.retry's first backoff
    assert outcomes["after"].state == "skipped" and outcomes["after"].message == "upstream boom did not succeed"
    assert len(failed_runs) == 2 and all(r.failure and r.result is None for r in failed_runs)
    assert JsonInput(1).digest == failed_runs[0].inputs[0].digest


def test_a_missing_upstream_and_a_map_of_bytes_fail_clearly(tmp_path: Path) -> None:
    orphan = {"python": {"source": "def main(y):\n    return y\n"}, "inputs": [{"name": "y", "fromJob": {"name": "nope"}}]}
    raw = {"python": {"source": "def main(x):\n    return bytes([x])\n"}, "inputs": [{"name": "x", "value": [1, 2]}],
           "map": {"over": "x"}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump_all([_manifest("orphan", orphan), _manifest("raw", raw)]))
    proc = memoplane(tmp_path / "store", "apply", "--json", "-f", str(path))
    assert proc.returncode == 1
    jobs = by_name(json.loads(proc.stdout))
    assert jobs["orphan"]["state"] == "failed"
    assert jobs["orphan"]["message"] == "input 'y': ComputeJob 'nope' does not exist: create it, or fix the name"
    assert jobs["raw"]["state"] == "failed" and jobs["raw"]["message"].startswith("spec.map: element 0: ComputeJob 'raw-")
    assert jobs["raw"]["message"].endswith("returned bytes, not JSON: a map's values must be JSON")


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    proc = memoplane(tmp_path / "store", "apply", "-f", "-", stdin="a: b\n  c: d\n")
    assert proc.returncode == 2
    assert proc.stderr == "memoplane: <stdin>: not valid YAML at line 2, column 4 (mapping values are not allowed " \
                          "here) — fix the YAML syntax\n"
