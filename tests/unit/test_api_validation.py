"""Bad specs are rejected with a message naming the field, by the models (CLI, operator)
and by the generated CRD schema (API server), and the two agree.

The CRD side is checked offline: OpenAPI v3 validation (openapi-schema-validator), the
list-type rules, and the CEL rules evaluated with cel-python. The real API server runs
the same cases in tests/integration/test_crds.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import celpy
import pytest
from openapi_schema_validator import OAS30Validator

from memoplane.api import crd, examples
from memoplane.api.computejob import (
    AS_NEEDS_FILE,
    AS_WITH_COMMAND,
    COMBINE_NEEDED_MESSAGE,
    COMBINE_UNUSED_MESSAGE,
    COMPUTEJOB,
    MAP_ONE_OF_MESSAGE,
    ComputeJobSpec,
)
from memoplane.api.gmemseed import GMEMSEED, GMemSeedSpec
from memoplane.api.resultcache import (
    KEY_SOURCE_MESSAGE,
    NAMESPACE_SET_MESSAGE,
    NO_KEYS_MESSAGE,
    QUOTA_EMPTY_MESSAGE,
    RESULTCACHE,
    SIGNING_MESSAGE,
    TIER_OVERLAP_MESSAGE,
    TIER_READ_ONLY_MESSAGE,
    TIERS_MESSAGE,
    ResultCacheSpec,
)
from memoplane.api.specs import SpecError, parse
from memoplane.inputs import ENV_NAME_FIX

SOURCES = "set exactly one of value, fromJob, fromSeed, fromObject, fromConfigMap, fromBlob"
Spec = dict[str, Any]


def _spec_schema(info: crd.KindInfo) -> dict[str, Any]:
    return crd.openapi_schema(info)["properties"]["spec"]


# --- an offline stand-in for the API server's schema validation -----------------------

_CEL = celpy.Environment()


# CEL keywords a property may be named; the API server shows such a property to rules as __NAME__.
_CEL_RESERVED = {"as", "break", "const", "continue", "else", "for", "function", "if", "import", "let", "loop",
                 "package", "namespace", "return", "var", "void", "while"}


def _escaped(value: Any) -> Any:
    if isinstance(value, dict):
        return {(f"__{k}__" if k in _CEL_RESERVED else k): _escaped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escaped(v) for v in value]
    return value


def _cel(expr: str, value: Any) -> Any:
    program = _CEL.program(_CEL.compile(expr))
    return program.evaluate({"self": celpy.json_to_cel(_escaped(value))})


def _cel_failures(schema: dict[str, Any], value: Any, path: str) -> list[str]:
    failures = []
    for rule in schema.get("x-kubernetes-validations", []):
        if _cel(rule["rule"], value):
            continue
        message = rule["message"]
        if "messageExpression" in rule:
            message = str(_cel(rule["messageExpression"], value))
        failures.append(f"{path}{rule.get('fieldPath', '')}: {message}")
    return failures + _cel_children(schema, value, path)


def _cel_children(schema: dict[str, Any], value: Any, path: str) -> list[str]:
    failures: list[str] = []
    if isinstance(value, dict):
        for key, sub in value.items():
            child = schema.get("properties", {}).get(key) or schema.get("additionalProperties")
            if isinstance(child, dict):
                failures += _cel_failures(child, sub, f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        failures += _list_type_failures(schema, value, path)
        for i, item in enumerate(value):
            failures += _cel_failures(schema["items"], item, f"{path}[{i}]")
    return failures


def _list_type_failures(schema: dict[str, Any], value: list[Any], path: str) -> list[str]:
    keys = schema.get("x-kubernetes-list-map-keys")
    kind = schema.get("x-kubernetes-list-type")
    seen: list[Any] = []
    failures = []
    for i, item in enumerate(value):
        ident = tuple(item.get(k) for k in keys) if kind == "map" and keys else item
        if kind in ("map", "set") and ident in seen:
            failures.append(f"{path}[{i}]: Duplicate value: {ident!r}")
        seen.append(ident)
    return failures


def api_server_errors(info: crd.KindInfo, spec: Spec) -> list[str]:
    schema = _spec_schema(info)
    openapi = [
        "spec" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path)
        + f": {e.message}"
        for e in OAS30Validator(schema).iter_errors(spec)
    ]
    return openapi + _cel_failures(schema, spec, "spec")


def python_errors(model: type[Any], spec: Spec) -> list[str]:
    try:
        parse(model, spec)
    except SpecError as exc:
        return exc.problems
    return []


# --- the cases ----------------------------------------------------------------------------


def _job(**changes: Any) -> Spec:
    spec = examples.computejob_spec()
    for key, value in changes.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    return spec


def _with_input(index: int, item: dict[str, Any]) -> Spec:
    spec = _job()
    spec["inputs"][index] = item
    return spec


def _with(path: list[str], value: Any, base: Callable[[], Spec] = examples.computejob_spec) -> Spec:
    spec = base()
    node = spec
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    return spec


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


# (id, kind, spec, field path that must be named, text in the message)
CASES: list[tuple[str, crd.KindInfo, type[Any], Spec, str, str]] = [
    ("python-and-command", COMPUTEJOB, ComputeJobSpec, _job(command=["true"]), "spec",
     "spec.python and spec.command are both set: keep exactly one"),
    ("neither-python-nor-command", COMPUTEJOB, ComputeJobSpec, _job(python=None), "spec",
     "spec.python or spec.command is required: set exactly one"),
    ("duplicate-input-names", COMPUTEJOB, ComputeJobSpec, _with_input(1, {"name": "rows", "value": 1}),
     "spec.inputs", ""),
    ("input-with-two-sources", COMPUTEJOB, ComputeJobSpec,
     _with_input(2, {"name": "raw", "value": 1, "fromJob": {"name": "download"}}),
     "spec.inputs[2]", f"input 'raw' has 2 sources: {SOURCES}"),
    ("input-with-no-source", COMPUTEJOB, ComputeJobSpec, _with_input(3, {"name": "noise"}),
     "spec.inputs[3]", f"input 'noise' has 0 sources: {SOURCES}"),
    ("negative-timeout", COMPUTEJOB, ComputeJobSpec, _with(["resources", "timeoutSeconds"], -5),
     "spec.resources.timeoutSeconds", ""),
    ("bad-memory-quantity", COMPUTEJOB, ComputeJobSpec, _with(["resources", "memory"], "12XB"),
     "spec.resources.memory", ""),
    ("negative-cpu-quantity", COMPUTEJOB, ComputeJobSpec, _with(["resources", "cpu"], "-1"),
     "spec.resources.cpu", ""),
    ("bad-output-quantity", COMPUTEJOB, ComputeJobSpec, _with(["resources", "maxOutputBytes"], "1 GB"),
     "spec.resources.maxOutputBytes", ""),
    ("map-over-unknown-input", COMPUTEJOB, ComputeJobSpec, _with(["map", "over"], "nope"),
     "spec.map.over", "spec.map.over: 'nope' is not the name of an input: use one of the names in spec.inputs"),
    ("map-over-chunks-unknown-input", COMPUTEJOB, ComputeJobSpec,
     _with(["map"], {"overChunks": "nope"}, lambda: _with(["python", "combine"], "combine")), "spec.map.overChunks",
     "spec.map.overChunks: 'nope' is not the name of an input: use one of the names in spec.inputs"),
    ("map-neither-over-nor-chunks", COMPUTEJOB, ComputeJobSpec, _with(["map"], {}), "spec.map",
     f"spec.map: {MAP_ONE_OF_MESSAGE}"),
    ("map-over-chunks-without-combine", COMPUTEJOB, ComputeJobSpec, _with(["map"], {"overChunks": "rows"}),
     "spec.python.combine", f"spec.python.combine: {COMBINE_NEEDED_MESSAGE}"),
    ("combine-without-over-chunks", COMPUTEJOB, ComputeJobSpec, _with(["python", "combine"], "combine"),
     "spec.python.combine", f"spec.python.combine: {COMBINE_UNUSED_MESSAGE}"),
    ("verify-zero-replicas", COMPUTEJOB, ComputeJobSpec, _with(["verify", "replicas"], 0), "spec.verify.replicas",
     ""),
    ("verify-six-replicas", COMPUTEJOB, ComputeJobSpec, _with(["verify", "replicas"], 6), "spec.verify.replicas",
     ""),
    ("verify-with-map", COMPUTEJOB, ComputeJobSpec,
     _with(["verify", "replicas"], 2, lambda: _with(["map", "over"], "rows")), "spec.verify",
     "spec.verify: replicas > 1 with spec.map is not supported yet: verify a job without map"),
    ("bad-policy", COMPUTEJOB, ComputeJobSpec, _with(["cache", "policy"], "Sometimes"), "spec.cache.policy", ""),
    ("input-name-not-identifier", COMPUTEJOB, ComputeJobSpec,
     _with_input(0, {"name": "my-rows", "value": [1]}), "spec.inputs[0].name", ""),
    ("negative-backoff", COMPUTEJOB, ComputeJobSpec, _job(backoffLimit=-1), "spec.backoffLimit", ""),
    ("empty-command", COMPUTEJOB, ComputeJobSpec, _job(python=None, command=[]), "spec.command", ""),
    ("seed-count-zero", COMPUTEJOB, ComputeJobSpec,
     _with_input(3, {"name": "noise", "fromSeed": {"name": "field", "count": 0}}),
     "spec.inputs[3].fromSeed.count", ""),
    ("sharing-names-and-selector", RESULTCACHE, ResultCacheSpec,
     _with(["sharing", "readers"], {"namespaces": ["ml"], "namespaceSelector": {"matchLabels": {"t": "a"}}},
           examples.resultcache_spec),
     "spec.sharing.readers", f"spec.sharing.readers: {NAMESPACE_SET_MESSAGE}"),
    ("sharing-writers-empty", RESULTCACHE, ResultCacheSpec,
     _with(["sharing", "writers"], {}, examples.resultcache_spec),
     "spec.sharing.writers", f"spec.sharing.writers: {NAMESPACE_SET_MESSAGE}"),
    ("quota-empty", RESULTCACHE, ResultCacheSpec,
     _with(["quota"], {}, examples.resultcache_spec), "spec.quota", f"spec.quota: {QUOTA_EMPTY_MESSAGE}"),
    ("quota-max-entries-zero", RESULTCACHE, ResultCacheSpec,
     _with(["quota", "maxEntries"], 0, examples.resultcache_spec), "spec.quota.maxEntries", ""),
    ("two-tiers-not-supported", RESULTCACHE, ResultCacheSpec,
     _with(["tiers"], [{"after": "720h", "store": {"bucket": "cold"}}, {"after": "8760h", "store": {"bucket": "ice"}}],
           examples.resultcache_spec), "spec.tiers", f"spec.tiers: {TIERS_MESSAGE}"),
    ("tier-read-only", RESULTCACHE, ResultCacheSpec,
     _with(["tiers"], [{"after": "720h", "store": {"bucket": "cold", "readOnly": True}}], examples.resultcache_spec),
     "spec.tiers[0].store", f"spec.tiers[0].store: {TIER_READ_ONLY_MESSAGE}"),
    ("tier-after-not-a-duration", RESULTCACHE, ResultCacheSpec,
     _with(["tiers"], [{"after": "30d", "store": {"bucket": "cold"}}], examples.resultcache_spec),
     "spec.tiers[0].after", ""),
    ("tier-without-store", RESULTCACHE, ResultCacheSpec,
     _with(["tiers"], [{"after": "720h"}], examples.resultcache_spec), "spec.tiers[0]", ""),
    ("signing-replaced-by-trust", RESULTCACHE, ResultCacheSpec,
     _with(["signing"], {"secretRef": {"name": "k"}}, examples.resultcache_spec),
     "spec.signing", f"spec.signing: {SIGNING_MESSAGE}"),
    ("reexecute-fraction-zero", RESULTCACHE, ResultCacheSpec,
     _with(["trust", "reexecute"], {"fraction": 0}, examples.resultcache_spec), "spec.trust.reexecute.fraction", ""),
    ("reexecute-fraction-above-one", RESULTCACHE, ResultCacheSpec,
     _with(["trust", "reexecute"], {"fraction": 1.5}, examples.resultcache_spec), "spec.trust.reexecute.fraction",
     ""),
    ("reexecute-without-fraction", RESULTCACHE, ResultCacheSpec,
     _with(["trust", "reexecute"], {"adaptive": False}, examples.resultcache_spec), "spec.trust.reexecute", ""),
    ("trusted-key-two-sources", RESULTCACHE, ResultCacheSpec,
     _with(["trust", "keys"], [{"secretRef": {"name": "a"}, "configMapRef": {"name": "b"}}],
           examples.resultcache_spec),
     "spec.trust.keys[0]", f"spec.trust.keys[0]: {KEY_SOURCE_MESSAGE}"),
    ("trusted-key-no-source", RESULTCACHE, ResultCacheSpec,
     _with(["trust", "keys"], [{}], examples.resultcache_spec),
     "spec.trust.keys[0]", f"spec.trust.keys[0]: {KEY_SOURCE_MESSAGE}"),
    ("trusts-no-key", RESULTCACHE, ResultCacheSpec,
     _with(["trust"], {"clusterAgents": False}, examples.resultcache_spec),
     "spec.trust", f"spec.trust: {NO_KEYS_MESSAGE}"),
    ("bad-key-id", RESULTCACHE, ResultCacheSpec,
     _with(["trust", "revoked"], ["Node_A"], examples.resultcache_spec), "spec.trust.revoked[0]", ""),
    ("key-id-without-epoch", RESULTCACHE, ResultCacheSpec,
     _with(["trust", "keys"], [{"publicKey": {"keyId": "ci", "key": "x"}}], examples.resultcache_spec),
     "spec.trust.keys[0].publicKey.keyId", ""),
    ("min-signatures-zero", RESULTCACHE, ResultCacheSpec,
     _with(["trust", "minSignatures"], 0, examples.resultcache_spec), "spec.trust.minSignatures", ""),
    ("retention-age-not-a-duration", RESULTCACHE, ResultCacheSpec,
     _with(["retention"], {"maxAge": "30 days"}, examples.resultcache_spec), "spec.retention.maxAge", ""),
    ("retention-bytes-not-a-quantity", RESULTCACHE, ResultCacheSpec,
     _with(["retention"], {"maxBytes": "lots"}, examples.resultcache_spec), "spec.retention.maxBytes", ""),
    ("env-name-with-equals", COMPUTEJOB, ComputeJobSpec, _job(env={"MODE": "fast", "A=B": "1"}), "spec.env",
     f"spec.env: 'A=B' is not a valid variable name: {ENV_NAME_FIX}"),
    ("env-name-empty", COMPUTEJOB, ComputeJobSpec, _job(env={"": "1"}), "spec.env",
     f"spec.env: '' is not a valid variable name: {ENV_NAME_FIX}"),
    ("env-name-digit-first", COMPUTEJOB, ComputeJobSpec, _job(env={"9LIVES": "1"}), "spec.env",
     f"spec.env: '9LIVES' is not a valid variable name: {ENV_NAME_FIX}"),
    ("env-name-with-nul", COMPUTEJOB, ComputeJobSpec, _job(env={"A\u0000B": "1"}), "spec.env",
     f"spec.env: 'A\u0000B' is not a valid variable name: {ENV_NAME_FIX}"),
    ("env-name-reserved", COMPUTEJOB, ComputeJobSpec, _job(env={"MEMOPLANE_OUT": "/etc"}), "spec.env",
     f"spec.env: 'MEMOPLANE_OUT' is not a valid variable name: {ENV_NAME_FIX}"),
    ("env-value-with-nul", COMPUTEJOB, ComputeJobSpec, _job(env={"MODE": "a\u0000b"}), "spec.env", ""),
    ("as-on-a-value", COMPUTEJOB, ComputeJobSpec, _with_input(0, {"name": "rows", "value": [1], "as": "path"}),
     "spec.inputs[0]", f"spec.inputs[0]: {AS_NEEDS_FILE}"),
    ("as-on-a-seed", COMPUTEJOB, ComputeJobSpec,
     _with_input(3, {"name": "noise", "fromSeed": {"name": "field", "count": 10}, "as": "bytes"}),
     "spec.inputs[3]", f"spec.inputs[3]: {AS_NEEDS_FILE}"),
    ("as-unknown", COMPUTEJOB, ComputeJobSpec,
     _with_input(4, {"name": "table", "fromObject": {"bucket": "data", "key": "t"}, "as": "copy"}),
     "spec.inputs[4].as", ""),
    ("from-blob-bad-digest", COMPUTEJOB, ComputeJobSpec,
     _with_input(4, {"name": "table", "fromBlob": {"digest": "sha256:" + "ab" * 32}}), "spec.inputs[4].fromBlob.digest",
     ""),
    ("as-with-command", COMPUTEJOB, ComputeJobSpec,
     _job(python=None, map=None, command=["wc", "-c"], inputs=[{"name": "t", "fromConfigMap": {"name": "c", "key": "k"},
                                                       "as": "path"}]),
     "spec.inputs", f"spec.inputs: {AS_WITH_COMMAND}"),
    ("bad-dtype", GMEMSEED, GMemSeedSpec, _with(["dtype"], "int8", examples.gmemseed_spec), "spec.dtype", ""),
    ("negative-seed", GMEMSEED, GMemSeedSpec, _with(["seed"], -1, examples.gmemseed_spec), "spec.seed", ""),
]
IDS = [c[0] for c in CASES]


def _names(errors: list[str], path: str) -> bool:
    """An error is about `path` (or an element of it: spec.inputs[1] is about spec.inputs)."""
    return any(e.startswith((path + ":", path + "[", path + ".")) for e in errors)


@pytest.mark.parametrize(("case", "info", "model", "spec", "path", "text"), CASES, ids=IDS)
def test_python_rejects_with_field_named(
    case: str, info: crd.KindInfo, model: type[Any], spec: Spec, path: str, text: str
) -> None:
    errors = python_errors(model, spec)
    assert _names(errors, path), errors
    assert all(text in e for e in errors if e.startswith(path)) or not text
    assert any(text in e for e in errors), errors


@pytest.mark.parametrize(("case", "info", "model", "spec", "path", "text"), CASES, ids=IDS)
def test_crd_schema_rejects_with_field_named(
    case: str, info: crd.KindInfo, model: type[Any], spec: Spec, path: str, text: str
) -> None:
    errors = api_server_errors(info, spec)
    assert _names(errors, path), errors
    if case in CEL_IDS:
        assert any(text in e for e in errors), errors


# The cross-field rules the CRD states in CEL (the input-source rule is a oneOf: CEL cannot
# see the untyped `value`), whose messages must equal the Python ones.
CEL_IDS = {"python-and-command", "neither-python-nor-command", "map-over-unknown-input", "verify-with-map",
           "map-over-chunks-not-on-a-cluster", "map-neither-over-nor-chunks", "combine-without-over-chunks",
           "sharing-names-and-selector", "sharing-writers-empty", "signing-replaced-by-trust",
           "quota-empty", "two-tiers-not-supported", "tier-read-only",
           "trusted-key-two-sources", "trusted-key-no-source", "trusts-no-key", "env-name-with-equals", "env-name-empty", "env-name-digit-first",
           "env-name-with-nul", "env-name-reserved", "as-on-a-value", "as-on-a-seed", "as-with-command"}
CEL_CASES = [c for c in CASES if c[0] in CEL_IDS]


@pytest.mark.parametrize(("case", "info", "model", "spec", "path", "text"), CEL_CASES,
                         ids=[c[0] for c in CEL_CASES])
def test_python_and_cel_give_the_same_message(
    case: str, info: crd.KindInfo, model: type[Any], spec: Spec, path: str, text: str
) -> None:
    cel = _cel_failures(_spec_schema(info), spec, "spec")
    assert cel == python_errors(model, spec)
    assert len(cel) == 1 and cel[0].startswith(path + ": ") and text in cel[0]


@pytest.mark.parametrize(
    ("info", "model", "spec"),
    [
        (COMPUTEJOB, ComputeJobSpec, examples.computejob_spec()),
        (RESULTCACHE, ResultCacheSpec, examples.resultcache_spec()),
        (GMEMSEED, GMemSeedSpec, examples.gmemseed_spec()),
        (COMPUTEJOB, ComputeJobSpec, {"command": ["sh", "-c", "true"]}),
        (COMPUTEJOB, ComputeJobSpec, {"python": {"source": "def main(x): return x"},
                                      "inputs": [{"name": "x", "value": None}]}),
        (COMPUTEJOB, ComputeJobSpec, _with(["resources"], {"cpu": 2, "memory": "1.5Gi", "maxOutputBytes": "1e6"})),
        (COMPUTEJOB, ComputeJobSpec, _job(env={"MODE": "a=b c", "_x": "", "a.b-C_9": "ü", ".dot": "-"})),
        (COMPUTEJOB, ComputeJobSpec, _with_input(0, {"name": "rows", "value": _nested(100)})),
        (COMPUTEJOB, ComputeJobSpec, _job(map=None, inputs=[
            {"name": "raw", "fromJob": {"name": "download"}, "as": "file"},
            {"name": "table", "fromObject": {"bucket": "data", "key": "t.parquet"}, "as": "path"},
            {"name": "settings", "fromConfigMap": {"name": "featurize", "key": "s.json"}, "as": "bytes"}])),
        (RESULTCACHE, ResultCacheSpec, {"store": {"bucket": "memoplane"}}),
        (RESULTCACHE, ResultCacheSpec, {"store": {"bucket": "memoplane"},
                                        "trust": {"clusterAgents": False,
                                                  "keys": [{"configMapRef": {"name": "team-keys"}}]}}),
        (RESULTCACHE, ResultCacheSpec, {"store": {"bucket": "memoplane"},
                                        "trust": {"reexecute": {"fraction": 0.05}}}),
        (RESULTCACHE, ResultCacheSpec, {"store": {"bucket": "memoplane"},
                                        "trust": {"reexecute": {"fraction": 1, "adaptive": False}}}),
        (RESULTCACHE, ResultCacheSpec, {"store": {"bucket": "shared", "prefix": "team-a/", "readOnly": True},
                                        "sharing": {"readers": {"namespaceSelector": {"matchExpressions": [
                                            {"key": "team", "operator": "In", "values": ["b", "c"]}]}},
                                            "writers": {"namespaces": ["team-b"]}}}),
        (RESULTCACHE, ResultCacheSpec, {"store": {"bucket": "memoplane"}, "quota": {"maxEntries": 1000}}),
        (RESULTCACHE, ResultCacheSpec, {"store": {"bucket": "memoplane"},
                                        "quota": {"maxBytes": "50Gi", "maxEntries": 1}}),
        (RESULTCACHE, ResultCacheSpec, {"store": {"bucket": "memoplane", "prefix": "ml/hot"},
                                        "tiers": [{"after": "720h", "store": {"bucket": "memoplane",
                                                                              "prefix": "ml/cold/"}}]}),
    ],
    ids=["computejob-design", "resultcache-design", "gmemseed-design", "command", "null-value",
         "quantities", "env-names", "deep-100", "file-deliveries", "no-trust", "own-keys-only", "reexecute",
         "reexecute-all",
         "sharing-and-read-only", "quota-entries", "quota-both", "tier"],
)
def test_valid_specs_pass_both(info: crd.KindInfo, model: type[Any], spec: Spec) -> None:
    assert python_errors(model, spec) == []
    assert api_server_errors(info, spec) == []


def test_the_offline_validator_can_fail() -> None:
    # Guards the stand-in itself: a CEL rule that is false must surface.
    schema = {"type": "object", "x-kubernetes-validations": [{"rule": "self.a == 1", "message": "a must be 1"}]}
    assert _cel_failures(schema, {"a": 2}, "spec") == ["spec: a must be 1"]


def test_a_too_deep_input_value_is_refused_by_the_model() -> None:
    # The CRD cannot say it (CEL cannot see an untyped value): the operator's parse of the
    # spec refuses it when it resolves the job, with this message in status.
    errors = python_errors(ComputeJobSpec, _with_input(0, {"name": "rows", "value": _nested(101)}))
    assert errors == ["spec.inputs[0].value: the value nests lists/objects more than 100 levels deep:"
                      " flatten it to at most 100 levels"]


def test_fields_the_system_does_not_enforce_say_so() -> None:
    # A field the API accepts is a field the system enforces: the others are refused, saying why.
    assert "trust" in SIGNING_MESSAGE


@pytest.mark.parametrize(("store", "tier"), [
    ({"bucket": "memoplane", "prefix": "ml/"}, {"bucket": "memoplane", "prefix": "ml/cold"}),
    ({"bucket": "memoplane", "prefix": "ml/cold/"}, {"bucket": "memoplane", "prefix": "/ml//"}),
    ({"bucket": "memoplane", "prefix": "ml"}, {"bucket": "memoplane", "prefix": "ml/"}),
    ({"bucket": "memoplane"}, {"bucket": "memoplane", "prefix": "x/"}),
])
def test_a_tier_overlapping_the_store_is_refused(store: Spec, tier: Spec) -> None:
    """Python only (a CRD rule cannot normalise prefixes): the operator refuses it too (cluster.tiering)."""
    errors = python_errors(ResultCacheSpec, {"store": store, "tiers": [{"after": "720h", "store": tier}]})
    assert errors == [f"spec.tiers: {TIER_OVERLAP_MESSAGE}"]


def test_a_tier_beside_the_store_is_accepted() -> None:
    spec = {"store": {"bucket": "memoplane", "prefix": "ml/a"}, "tiers": [{"after": "1h", "store": {"bucket":
                                                                                                "memoplane",
                                                                                                "prefix": "ml/ab"}}]}
    assert python_errors(ResultCacheSpec, spec) == []
