"""`memoplane history --cluster` and `memoplane explain --cluster` against the running stack:
two versions of a ComputeJob, their run records in the namespace's store, the queries as a user
runs them (the store found through the job's ResultCache, the records synced into a local index).

Until the cluster writes run records itself (issue 13, part "record"), this test writes them
through the Store API from what the jobs' statuses say, as the agent will."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from memoplane.api.specs import computejob_manifest
from memoplane.cluster import protocol as p
from memoplane.history import InputRecord, JobIdentity, RunRecord, new_run_id
from memoplane.keys import digest_value

pytestmark = pytest.mark.integration
Stack = Any  # conftest.Stack (fixture `stack`)

SOURCE = 'def main(rows):\n    return {"n": len(rows)}\n'


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memoplane.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def record_of(obj: dict[str, Any], rows: list[int]) -> RunRecord:
    """The run record the agent writes for a Succeeded job (components as the key derivation has them)."""
    status, meta = obj["status"], obj["metadata"]
    components = {"v": 1, "code": "b3:code", "entrypoint": "main", "runtime": "b3:rt", "salt": "",
                  "inputs": {"rows": "json:" + digest_value(rows)}, "env": {}}
    now = time.time()
    return RunRecord(new_run_id(), JobIdentity(meta["namespace"], meta["name"], meta["uid"], meta["generation"]),
                     status["cacheKey"], status["result"]["digest"], (InputRecord("rows", digest_value(rows)),),
                     "b3:code", "b3:rt", {}, status.get("node") or "", None, now, now, bool(status.get("cached")),
                     0.1, cache=f"{meta['namespace']}/default", components=components)


def test_history_and_explain_of_a_cluster_job(stack: Stack, ns: str, tmp_path: Path) -> None:
    env = {**stack.cfg.env, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    store = stack.store(ns)
    stack.apply(ns, computejob_manifest("dl", None, {"python": {"source": SOURCE, "entrypoint": "main"},
                                                     "inputs": [{"name": "rows", "value": [1, 2, 3]}]}))
    first = stack.wait(ns, "dl")
    assert first["status"]["phase"] == p.SUCCEEDED
    assert store.put_run_record((one := record_of(first, [1, 2, 3])).run_id, one.to_json())

    stack.kube.custom.patch_namespaced_custom_object(
        p.GROUP, p.VERSION, ns, p.COMPUTEJOBS, "dl", {"spec": {"inputs": [{"name": "rows", "value": [1, 2]}]}})
    second = stack.wait(ns, "dl", lambda o: (o.get("status") or {}).get("observedGeneration") == 2
                        and o["status"].get("phase") in p.TERMINAL)
    assert second["status"]["result"]["digest"] != first["status"]["result"]["digest"]
    assert store.put_run_record((two := record_of(second, [1, 2])).run_id, two.to_json())

    shown = cli("history", "dl", "-n", ns, "--cluster", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    entries = json.loads(shown.stdout)["entries"]
    assert [e["run_id"] for e in entries] == [two.run_id, one.run_id]
    assert [e["result"] for e in entries] == [second["status"]["result"]["digest"],
                                              first["status"]["result"]["digest"]]
    assert entries[0]["why"][0].startswith("inputs.rows changed") and entries[1]["why"] == ["first recorded run"]

    explained = cli("explain", "--cluster", f"{ns}/dl", "--json", env=env)
    assert explained.returncode == 0, explained.stderr
    why = json.loads(explained.stdout)
    assert why["run_id"] == two.run_id and why["previous_run"] == one.run_id and not why["cached"]
    assert why["changes"][0].startswith("inputs.rows changed")
    text = cli("explain", "--cluster", "dl", "-n", ns, env=env)
    assert text.returncode == 0 and "inputs.rows changed" in text.stdout

    missing = cli("history", "nope", "-n", ns, "--cluster", env=env)
    assert missing.returncode != 0 and "no recorded run of job" in missing.stderr
