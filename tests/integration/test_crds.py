"""The generated CRDs on a real kube-apiserver: bad specs are rejected with a message that
names the field, valid ones are accepted, and status, printer columns, short names, the
category and `kubectl wait --for=condition=Ready` work."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from memoplane.api import crd, examples
from memoplane.api.conditions import mark_ready
from memoplane.api.specs import (
    computejob_manifest,
    gmemseed_manifest,
    resultcache_manifest,
)
from memoplane.inputs import ENV_NAME_FIX

# The `kubectl` fixture of conftest.py: kubectl(*args, stdin=None, check=True).
Kubectl = Callable[..., subprocess.CompletedProcess[str]]
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def crds(kubectl: Kubectl) -> None:
    kubectl("apply", "-f", str(crd.CRDS_DIR))
    for info in crd.KINDS:
        kubectl("wait", "--for=condition=Established", f"crd/{info.crd_name}", "--timeout=60s")


@pytest.fixture
def namespace(kubectl: Kubectl, crds: None) -> Iterator[str]:
    name = f"crds-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


def _obj(kind: str, name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "memoplane.io/v1alpha1", "kind": kind,
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def _job(**changes: Any) -> dict[str, Any]:
    spec = examples.computejob_spec()
    for key, value in changes.items():
        if value is None:
            spec.pop(key)
        else:
            spec[key] = value
    return spec


def _input(index: int, item: dict[str, Any]) -> dict[str, Any]:
    spec = examples.computejob_spec()
    spec["inputs"][index] = item
    return spec


def _set(base: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    node = base
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    return base


# (id, kind, spec, field path the error must name, text the error must contain)
INVALID = [
    ("python-and-command", "ComputeJob", _job(command=["true"]), "spec",
     "spec.python and spec.command are both set: keep exactly one"),
    ("neither", "ComputeJob", _job(python=None), "spec",
     "spec.python or spec.command is required: set exactly one"),
    ("duplicate-input", "ComputeJob", _input(1, {"name": "rows", "value": 1}), "spec.inputs[1]", "Duplicate value"),
    ("two-sources", "ComputeJob", _input(2, {"name": "raw", "value": 1, "fromJob": {"name": "download"}}),
     "spec.inputs[2]", "oneOf"),
    ("no-source", "ComputeJob", _input(3, {"name": "noise"}), "spec.inputs[3]", "oneOf"),
    ("negative-timeout", "ComputeJob", _set(examples.computejob_spec(), ["resources", "timeoutSeconds"], -5),
     "spec.resources.timeoutSeconds", "greater than or equal to 1"),
    ("bad-quantity", "ComputeJob", _set(examples.computejob_spec(), ["resources", "memory"], "12XB"),
     "spec.resources.memory", "should match"),
    ("negative-int-quantity", "ComputeJob", _set(examples.computejob_spec(), ["resources", "cpu"], -1),
     "spec.resources.cpu", "greater than or equal to 0"),
    ("map-over-unknown", "ComputeJob", _set(examples.computejob_spec(), ["map", "over"], "nope"),
     "spec.map.over", "'nope' is not the name of an input"),
    ("over-chunks-unknown-input", "ComputeJob",
     _set(_set(examples.computejob_spec(), ["map", "overChunks"], "nope"), ["python", "combine"], "combine"),
     "spec.map.overChunks", "'nope' is not the name of an input"),
    ("map-neither-over-nor-chunks", "ComputeJob", _set(examples.computejob_spec(), ["map"], {}),
     "spec.map", "set exactly one of over or overChunks"),
    ("over-chunks-without-combine", "ComputeJob", _set(examples.computejob_spec(), ["map", "overChunks"], "rows"),
     "spec.python.combine", "needs a combine function: set spec.python.combine"),
    ("bad-policy", "ComputeJob", _set(examples.computejob_spec(), ["cache", "policy"], "Sometimes"),
     "spec.cache.policy", "Unsupported value"),
    ("sharing-names-and-selector", "ResultCache",
     _set(examples.resultcache_spec(), ["sharing", "readers", "namespaceSelector", "matchLabels"], {"t": "a"}),
     "spec.sharing.readers", "set exactly one of namespaces or namespaceSelector"),
    ("quota-empty", "ResultCache", _set(examples.resultcache_spec(), ["quota"], {}),
     "spec.quota", "quota bounds nothing: set quota.maxBytes, quota.maxEntries or both"),
    ("two-tiers-not-supported", "ResultCache",
     _set(examples.resultcache_spec(), ["tiers"], [{"after": "720h", "store": {"bucket": "cold"}},
                                                   {"after": "8760h", "store": {"bucket": "ice"}}]),
     "spec.tiers", "more than one tier is not supported yet"),
    ("tier-read-only", "ResultCache",
     _set(examples.resultcache_spec(), ["tiers"], [{"after": "720h", "store": {"bucket": "cold", "readOnly": True}}]),
     "spec.tiers[0].store", "a tier is written by demotion"),
    ("signing-replaced", "ResultCache", _set(examples.resultcache_spec(), ["signing", "secretRef", "name"], "k"),
     "spec.signing", "signing was replaced by trust"),
    ("reexecute-fraction-zero", "ResultCache",
     _set(examples.resultcache_spec(), ["trust", "reexecute", "fraction"], 0), "spec.trust.reexecute.fraction",
     "greater than 0"),
    ("trusted-key-two-sources", "ResultCache",
     _set(examples.resultcache_spec(), ["trust", "keys"], [{"secretRef": {"name": "a"}, "configMapRef": {"name": "b"}}]),
     "spec.trust.keys[0]", "set exactly one of publicKey, secretRef or configMapRef"),
    ("retention-age-not-a-duration", "ResultCache",
     _set(examples.resultcache_spec(), ["retention", "maxAge"], "30 days"), "spec.retention.maxAge", "should match"),
    ("bad-dtype", "GMemSeed", _set(examples.gmemseed_spec(), ["dtype"], "int8"), "spec.dtype", "Unsupported value"),
    ("env-name-with-equals", "ComputeJob", _job(env={"MODE": "fast", "A=B": "1"}), "spec.env",
     f"'A=B' is not a valid variable name: {ENV_NAME_FIX}"),
    ("env-name-empty", "ComputeJob", _job(env={"": "1"}), "spec.env", f"'' is not a valid variable name: {ENV_NAME_FIX}"),
    ("env-name-reserved", "ComputeJob", _job(env={"MEMOPLANE_OUT": "/etc"}), "spec.env",
     f"'MEMOPLANE_OUT' is not a valid variable name: {ENV_NAME_FIX}"),
    ("env-value-with-nul", "ComputeJob", _job(env={"MODE": "a\u0000b"}), "spec.env.MODE", "should match"),
]


@pytest.mark.parametrize(("case", "kind", "spec", "path", "text"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_spec_is_rejected_naming_the_field(
    kubectl: Kubectl, namespace: str, case: str, kind: str, spec: dict[str, Any], path: str, text: str
) -> None:
    proc = kubectl("create", "-f", "-", stdin=json.dumps(_obj(kind, "bad", namespace, spec)), check=False)
    assert proc.returncode != 0, f"{case} was accepted"
    # CEL and OpenAPI errors read `path: ...`; a oneOf error quotes the path instead.
    lines = [line for line in proc.stderr.split("\n")
             if (f"{path}: " in line or f'"{path}"' in line) and text in line]
    assert lines, proc.stderr


@pytest.mark.parametrize(
    ("kind", "spec"),
    [
        ("ComputeJob", examples.computejob_spec()),
        ("ComputeJob", {"command": ["sh", "-c", "true"], "inputs": [{"name": "x", "value": None}]}),
        ("ComputeJob", {"python": {"source": "def main(): return 1"},
                        "resources": {"cpu": 2, "memory": "1.5Gi", "maxOutputBytes": "1e6"}}),
        ("ComputeJob", _job(env={"MODE": "a=b c", "_x": "", "a.b-C_9": "ü", ".dot": "-"})),
        ("ResultCache", examples.resultcache_spec()),
        ("ResultCache", _set(examples.resultcache_spec(), ["tiers"],
                             [{"after": "720h", "store": {"bucket": "memoplane-cold", "prefix": "ml/"}}])),
        ("GMemSeed", examples.gmemseed_spec()),
    ],
    ids=["computejob-design", "command-null-value", "quantities", "env-names", "resultcache-design",
         "resultcache-tier", "gmemseed-design"],
)
def test_valid_spec_is_accepted_unchanged(kubectl: Kubectl, namespace: str, kind: str, spec: dict[str, Any]) -> None:
    created = json.loads(kubectl("create", "-o", "json", "-f", "-",
                                 stdin=json.dumps(_obj(kind, "good", namespace, spec))).stdout)
    assert created["spec"] == spec  # nothing pruned, nothing defaulted


def test_builders_produce_manifests_the_server_accepts(kubectl: Kubectl, namespace: str) -> None:
    manifests = [
        computejob_manifest("featurize", namespace, examples.computejob_spec()),
        resultcache_manifest("default", namespace, examples.resultcache_spec()),
        gmemseed_manifest("field", namespace, examples.gmemseed_spec()),
    ]
    kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests}))
    listed = kubectl("get", "memoplane", "-n", namespace, "-o", "name").stdout.split()
    assert sorted(listed) == sorted([
        "computejob.memoplane.io/featurize", "resultcache.memoplane.io/default", "gmemseed.memoplane.io/field"])


def test_status_subresource_columns_and_wait_for_ready(kubectl: Kubectl, namespace: str) -> None:
    kubectl("create", "-f", "-", stdin=json.dumps(computejob_manifest("job", namespace, examples.computejob_spec())))
    obj = json.loads(kubectl("get", "cjob", "job", "-n", namespace, "-o", "json").stdout)
    generation = obj["metadata"]["generation"]
    status = {
        "phase": "Succeeded", "cacheKey": "b3:" + "9f2c" * 16, "shortKey": "9f2c9f2c9f2c", "cached": True,
        "node": "worker-3", "durationMs": 12, "duration": "12ms", "observedGeneration": generation,
        "result": {"digest": "b3:00", "size": 10, "value": {"total": 60}},
        "conditions": mark_ready([], "Succeeded", "computed", generation, datetime.now(UTC)),
    }
    kubectl("patch", "cjob", "job", "-n", namespace, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": status}))
    # A status write through the main resource is ignored: the subresource owns it.
    kubectl("patch", "cjob", "job", "-n", namespace, "--type=merge", "-p", '{"status": {"phase": "Failed"}}')
    kubectl("wait", "--for=condition=Ready", "cjob/job", "-n", namespace, "--timeout=30s")
    table = kubectl("get", "cjob", "job", "-n", namespace).stdout.split("\n")
    assert table[0].split() == ["NAME", "PHASE", "CACHED", "KEY", "NODE", "DURATION", "AGE"]
    assert table[1].split()[:6] == ["job", "Succeeded", "true", "9f2c9f2c9f2c", "worker-3", "12ms"]
    stored = json.loads(kubectl("get", "cjob", "job", "-n", namespace, "-o", "json").stdout)
    assert stored["status"]["result"]["value"] == {"total": 60}


def test_short_names_resolve(kubectl: Kubectl, namespace: str) -> None:
    for short in ("cjob", "rcache", "gseed"):
        assert kubectl("get", short, "-n", namespace).returncode == 0
    resources = kubectl("api-resources", "--api-group=memoplane.io", "-o", "wide").stdout
    for short in ("cjob", "rcache", "gseed"):
        assert short in resources
