"""The models parse the DESIGN §2 examples, build manifests and keep the wire format."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
import yaml

from memoplane.api import (
    ComputeJobSpec,
    SpecError,
    computejob_manifest,
    examples,
    format_duration,
    gmemseed_manifest,
    parse_computejob,
    parse_quantity,
    resultcache_manifest,
    short_key,
)
from memoplane.api.computejob import ComputeJobStatus

DESIGN_JOB = """
apiVersion: memoplane.io/v1alpha1
kind: ComputeJob
metadata: {name: featurize, namespace: ml, generation: 1, managedFields: [{manager: kubectl}]}
spec:
  python:
    source: |
      def main(rows, scale):
          return {"total": sum(rows) * scale}
    entrypoint: main
  inputs:
    - {name: rows, value: [1, 2, 3]}
    - {name: scale, value: 10}
    - {name: raw, fromJob: {name: download}}
    - {name: noise, fromSeed: {name: field, offset: 0, count: 1000000}}
    - {name: table, fromObject: {bucket: data, key: t.parquet}}
  map: {over: rows}
  env: {MODE: fast}
  runtime: {profile: python}
  cache: {resultCache: default, policy: Use, version: "1"}
  resources: {cpu: "1", memory: 512Mi, timeoutSeconds: 60, maxOutputBytes: 1Gi}
  backoffLimit: 2
status:
  phase: Succeeded
  cacheKey: b3:9f2c0000000000000000
  cached: true
  node: worker-3
  result: {digest: "b3:ab", size: 1234, value: {total: 60}}
  durationMs: 12
  computeSecondsSaved: 41.5
  attempts: 1
  conditions: []
  observedGeneration: 1
"""


def test_design_example_parses() -> None:
    job = parse_computejob(yaml.safe_load(DESIGN_JOB))
    assert job.metadata.name == "featurize" and job.metadata.namespace == "ml"
    assert job.spec.python is not None and job.spec.python.entrypoint == "main"
    assert [i.sources() for i in job.spec.inputs] == [
        ["value"], ["value"], ["fromJob"], ["fromSeed"], ["fromObject"]]
    assert job.spec.inputs[3].from_seed is not None and job.spec.inputs[3].from_seed.count == 1_000_000
    assert job.spec.cache.policy == "Use" and job.spec.resources.memory == "512Mi"
    assert job.status.cached is True and job.status.result is not None
    assert job.status.result.value == {"total": 60}


def test_defaults_apply_in_python_only() -> None:
    spec = ComputeJobSpec.model_validate({"command": ["true"]})
    assert (spec.runtime.profile, spec.cache.policy, spec.cache.result_cache, spec.backoff_limit) == (
        "python", "Use", "default", 2)
    assert spec.to_k8s() == {"command": ["true"]}  # manifests stay as the user wrote them


def test_manifest_round_trips_and_keeps_null_values() -> None:
    spec = examples.computejob_spec()
    spec["inputs"].append({"name": "nothing", "value": None})
    manifest = computejob_manifest("featurize", "ml", spec, labels={"team": "ml"})
    assert manifest["apiVersion"] == "memoplane.io/v1alpha1" and manifest["kind"] == "ComputeJob"
    assert manifest["metadata"] == {"name": "featurize", "namespace": "ml", "labels": {"team": "ml"}}
    assert manifest["spec"] == spec
    assert ComputeJobSpec.model_validate(manifest["spec"]).to_k8s() == spec


def test_manifest_builder_accepts_a_model() -> None:
    spec = ComputeJobSpec.model_validate({"python": {"source": "def main(): return 1"}})
    manifest = computejob_manifest("one", None, spec)
    assert "namespace" not in manifest["metadata"]
    assert manifest["spec"] == {"python": {"source": "def main(): return 1"}}


@pytest.mark.parametrize("name", ["Featurize", "a_b", "-x", "x" * 254, ""])
def test_manifest_builder_rejects_bad_names(name: str) -> None:
    with pytest.raises(SpecError, match=r"metadata\.name"):
        computejob_manifest(name, "ml", examples.computejob_spec())


def test_manifest_builder_rejects_bad_spec_naming_the_field() -> None:
    spec = examples.computejob_spec()
    spec["inputs"][1] = {"name": "scale"}
    with pytest.raises(SpecError) as caught:
        computejob_manifest("j", "ml", spec)
    assert caught.value.problems == [(
        "spec.inputs[1]: input 'scale' has 0 sources: set exactly one of value, fromJob, fromSeed,"
        " fromObject, fromConfigMap, fromBlob")]
    assert "spec.inputs[1]" in str(caught.value)


def test_unknown_field_is_named() -> None:
    spec = examples.computejob_spec()
    spec["resources"]["timeout"] = 5
    with pytest.raises(SpecError) as caught:
        computejob_manifest("j", "ml", spec)
    assert caught.value.problems[0].startswith("spec.resources.timeout: unknown field")


def test_other_builders() -> None:
    cache = resultcache_manifest("default", "ml", examples.resultcache_spec())
    seed = gmemseed_manifest("field", "ml", examples.gmemseed_spec())
    assert cache["spec"] == examples.resultcache_spec() and cache["kind"] == "ResultCache"
    assert seed["spec"] == examples.gmemseed_spec() and seed["kind"] == "GMemSeed"


def test_status_dump_keeps_false_and_camel_case() -> None:
    status = ComputeJobStatus(cached=False, short_key="9f2c", duration_ms=12, phase="Running")
    assert status.to_k8s() == {"phase": "Running", "shortKey": "9f2c", "cached": False,
                               "durationMs": 12, "conditions": []}


def test_status_tolerates_unknown_fields() -> None:
    assert ComputeJobStatus.model_validate({"phase": "Pending", "addedLater": 1}).phase == "Pending"


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [("512Mi", 512 * 2**20), ("500m", Decimal("0.5")), ("1", 1), (2, 2), ("1e3", 1000), ("1.5Gi", 3 * 2**29),
     ("2k", 2000), (".5", Decimal("0.5"))],
)
def test_parse_quantity(quantity: Any, expected: Any) -> None:
    assert parse_quantity(quantity) == Decimal(expected)


@pytest.mark.parametrize("bad", ["12XB", "-1", "1 Gi", "", "Gi", -1, True, 1.5])
def test_parse_quantity_rejects(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_quantity(bad)


def test_short_key_and_duration() -> None:
    assert short_key("b3:9f2c0123456789abcdef") == "9f2c01234567"
    assert short_key("9f2c0123456789abcdef") == "9f2c01234567"
    assert [format_duration(ms) for ms in (12, 3400, 125_000, 3_720_000)] == ["12ms", "3.4s", "2m5s", "1h2m"]


def test_seed_must_fit_int64() -> None:
    spec = examples.gmemseed_spec()
    spec["layers"][0]["seed"] = 2**63
    with pytest.raises(SpecError) as caught:
        gmemseed_manifest("field", "ml", spec)
    assert caught.value.problems[0].startswith("spec.layers[0].seed: ")
