"""`memoplane history --cluster` and `memoplane explain --cluster` against the running stack:
two versions of a ComputeJob, their run records in the namespace's store, the queries as a user
runs them (the store found through the job's ResultCache, the records synced into a local index).

The records are the cluster's own: the agent appends one for each computed run and names it in
status.runId."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from memoplane.api.specs import computejob_manifest
from memoplane.cluster import protocol as p

pytestmark = pytest.mark.integration
Stack = Any  # conftest.Stack (fixture `stack`)

SOURCE = 'def main(rows):\n    return {"n": len(rows)}\n'


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memoplane.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_history_and_explain_of_a_cluster_job(stack: Stack, ns: str, tmp_path: Path) -> None:
    env = {**stack.cfg.env, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    store = stack.store(ns)
    stack.apply(ns, computejob_manifest("dl", None, {"python": {"source": SOURCE, "entrypoint": "main"},
                                                     "inputs": [{"name": "rows", "value": [1, 2, 3]}]}))
    first = stack.wait(ns, "dl")
    assert first["status"]["phase"] == p.SUCCEEDED
    one = first["status"]["runId"]
    assert store.run_record(one) is not None

    stack.kube.custom.patch_namespaced_custom_object(
        p.GROUP, p.VERSION, ns, p.COMPUTEJOBS, "dl", {"spec": {"inputs": [{"name": "rows", "value": [1, 2]}]}})
    second = stack.wait(ns, "dl", lambda o: (o.get("status") or {}).get("observedGeneration") == 2
                        and o["status"].get("phase") in p.TERMINAL)
    assert second["status"]["result"]["digest"] != first["status"]["result"]["digest"]
    two = second["status"]["runId"]
    assert store.run_record(two) is not None

    shown = cli("history", "dl", "-n", ns, "--cluster", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    entries = json.loads(shown.stdout)["entries"]
    assert [e["run_id"] for e in entries] == [two, one]
    assert [e["result"] for e in entries] == [second["status"]["result"]["digest"],
                                              first["status"]["result"]["digest"]]
    assert entries[0]["why"][0].startswith("inputs.rows changed") and entries[1]["why"] == ["first recorded run"]

    explained = cli("explain", "--cluster", f"{ns}/dl", "--json", env=env)
    assert explained.returncode == 0, explained.stderr
    why = json.loads(explained.stdout)
    assert why["run_id"] == two and why["previous_run"] == one and not why["cached"]
    assert why["changes"][0].startswith("inputs.rows changed")
    text = cli("explain", "--cluster", "dl", "-n", ns, env=env)
    assert text.returncode == 0 and "inputs.rows changed" in text.stdout

    missing = cli("history", "nope", "-n", ns, "--cluster", env=env)
    assert missing.returncode != 0 and "no recorded run of job" in missing.stderr
