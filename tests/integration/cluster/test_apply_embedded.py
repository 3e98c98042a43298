"""`memoplane apply -f examples/dag.yaml` embedded derives the keys the cluster derives for the
same file: the operator and agents on the local control plane, the CLI on a local store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from memoplane.jobs import JsonInput

pytestmark = pytest.mark.integration
Stack = Any  # conftest.Stack (fixture `stack`)

DAG = Path(__file__).resolve().parents[3] / "examples" / "dag.yaml"
NAMES = ["download", "normalize", "report"]


def test_the_dag_has_the_same_keys_and_values_on_the_cluster_and_embedded(stack: Stack, ns: str,
                                                                           tmp_path: Path) -> None:
    stack.apply(ns, *[doc for doc in yaml.safe_load_all(DAG.read_text()) if doc])
    on_cluster = stack.wait_all(ns, NAMES)
    assert all(obj["status"]["phase"] == "Succeeded" for obj in on_cluster.values()), \
        {n: o["status"] for n, o in on_cluster.items()}

    proc = subprocess.run([sys.executable, "-m", "memoplane.cli", "apply", "-f", str(DAG), "--json",
                           "--store", str(tmp_path / "store")], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    embedded = {job["name"]: job for job in json.loads(proc.stdout)["jobs"]}

    store = stack.store(ns)
    for name in NAMES:
        status = on_cluster[name]["status"]
        assert embedded[name]["cacheKey"] == status["cacheKey"], name
        # A result manifest's digest covers its provenance (node, times), so it differs by
        # construction; what downstream keys are made of is the value's digest, and that is equal.
        value = store.load_value(store.get_result(status["result"]["digest"]).value)
        assert embedded[name]["valueDigest"] == JsonInput(value).digest, name
    assert embedded["report"]["value"] == on_cluster["report"]["status"]["result"]["value"]
