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

from memoplane.cluster import protocol as p
from memoplane.jobs import JsonInput

pytestmark = pytest.mark.integration
Stack = Any  # conftest.Stack (fixture `stack`)

DAG = Path(__file__).resolve().parents[3] / "examples" / "dag.yaml"
NAMES = ["download", "normalize", "report"]
MORE = """
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {scale: "3"}
---
apiVersion: memoplane.io/v1alpha1
kind: ComputeJob
metadata: {name: scaled}
spec:
  python: {source: "def main(x, scale):\\n    return x * int(scale)\\n"}
  inputs:
    - {name: x, value: [1, 2, 2, 5]}
    - {name: scale, fromConfigMap: {name: settings, key: scale}}
  map: {over: x}
"""


def embedded_apply(tmp_path: Path, *files: Path) -> dict[str, dict[str, Any]]:
    args = [a for f in files for a in ("-f", str(f))]
    proc = subprocess.run([sys.executable, "-m", "memoplane.cli", "apply", *args, "--json",
                           "--store", str(tmp_path / "store")], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {job["name"]: job for job in json.loads(proc.stdout)["jobs"]}


def test_the_dag_has_the_same_keys_and_values_on_the_cluster_and_embedded(stack: Stack, ns: str,
                                                                           tmp_path: Path) -> None:
    stack.apply(ns, *[doc for doc in yaml.safe_load_all(DAG.read_text()) if doc])
    on_cluster = stack.wait_all(ns, NAMES)
    assert all(obj["status"]["phase"] == "Succeeded" for obj in on_cluster.values()), \
        {n: o["status"] for n, o in on_cluster.items()}

    embedded = embedded_apply(tmp_path, DAG)

    store = stack.store(ns)
    for name in NAMES:
        status = on_cluster[name]["status"]
        assert embedded[name]["cacheKey"] == status["cacheKey"], name
        # A result manifest's digest covers its provenance (node, times), so it differs by
        # construction; what downstream keys are made of is the value's digest, and that is equal.
        value = store.load_value(store.get_result(status["result"]["digest"]).value)
        assert embedded[name]["valueDigest"] == JsonInput(value).digest, name
    assert embedded["report"]["value"] == on_cluster["report"]["status"]["result"]["value"]


def test_seed_config_map_and_map_inputs_have_the_same_keys_on_the_cluster_and_embedded(stack: Stack, ns: str,
                                                                                       tmp_path: Path) -> None:
    more = tmp_path / "more.yaml"
    more.write_text(MORE)
    seed_file = DAG.parent / "gmemseed.yaml"
    for doc in [d for f in (seed_file, more) for d in yaml.safe_load_all(f.read_text()) if d]:
        body = {**doc, "metadata": {**doc["metadata"], "namespace": ns}}
        if doc["kind"] == "ConfigMap":
            stack.kube.core.create_namespaced_config_map(ns, body)
        else:
            assert stack.kube.create(p.GMEMSEEDS if doc["kind"] == "GMemSeed" else p.COMPUTEJOBS, ns, body) is not None
    on_cluster = stack.wait_all(ns, ["estimate-pi", "scaled"])
    assert all(obj["status"]["phase"] == "Succeeded" for obj in on_cluster.values()), \
        {n: o["status"] for n, o in on_cluster.items()}

    embedded = embedded_apply(tmp_path, seed_file, more)
    for name in ("estimate-pi", "scaled"):
        assert embedded[name]["cacheKey"] == on_cluster[name]["status"]["cacheKey"], name
        assert embedded[name]["value"] == on_cluster[name]["status"]["result"]["value"], name
    assert embedded["scaled"]["value"] == [3, 6, 6, 15]
