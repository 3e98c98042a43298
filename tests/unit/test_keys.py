"""Cache keys: canonical encoding vectors, key vectors, runtime identity, explain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memoplane.canonical import canonical_json
from memoplane.errors import InputError
from memoplane.keys import (
    KeyParts,
    code_digest,
    digest_value,
    explain_change,
    runtime_identity,
)

VECTORS = json.loads((Path(__file__).parent / "vectors" / "canonical.json").read_text())


@pytest.mark.parametrize("case", VECTORS["canonical"], ids=lambda c: c["name"])
def test_canonical_vectors(case: dict) -> None:
    assert canonical_json(json.loads(case["input"])).decode("utf-8") == case["canonical"]


@pytest.mark.parametrize("case", VECTORS["rejected"], ids=lambda c: c["name"])
def test_canonical_rejects_non_json(case: dict) -> None:
    with pytest.raises(InputError):
        canonical_json(eval(case["python"]))  # noqa: S307 - vectors are ours


# Expected keys were computed from the hand-written canonical text of the
# components (blake3 of the UTF-8 bytes), not through keys.py.
KEY_VECTORS = [
    (
        KeyParts(
            code="b3:aa", entrypoint="main", runtime="b3:dd",
            inputs={"scale": "b3:cc", "rows": "b3:bb"}, env={"MODE": "fast"}, salt="1",
        ),
        "b3:215fb91a1d8f3cf76fc1b8208fb74e6e1b30724619c8e6e8536897e6c8f30d3f",
    ),
    (
        KeyParts(code="b3:ee", entrypoint=None, runtime="b3:dd"),
        "b3:a2b5749342dcd34bfde552692ee0e5013ba1cf0c269f1bd5c1ce959ca3cac0bc",
    ),
]


@pytest.mark.parametrize(("parts", "expected"), KEY_VECTORS)
def test_key_vectors(parts: KeyParts, expected: str) -> None:
    assert parts.key == expected


def test_value_digest_vector() -> None:
    assert digest_value([1, 2, 3]) == "b3:67a489b7ff9c2940ffedd272934e715d955246bce3ebb3365e818ecf1efe1efc"


def test_dict_order_does_not_change_digest() -> None:
    assert digest_value({"a": 1, "b": [1, {"y": 2, "x": 3}]}) == digest_value({"b": [1, {"x": 3, "y": 2}], "a": 1})


def test_int_and_float_are_different_values() -> None:
    assert digest_value(1) != digest_value(1.0)
    assert digest_value(0.0) != digest_value(-0.0)


def test_every_component_changes_the_key() -> None:
    base = KeyParts(code="b3:1", entrypoint="main", runtime="b3:r", inputs={"x": "b3:i"}, env={"A": "1"}, salt="")
    variants = [
        KeyParts(code="b3:2", entrypoint="main", runtime="b3:r", inputs={"x": "b3:i"}, env={"A": "1"}),
        KeyParts(code="b3:1", entrypoint="other", runtime="b3:r", inputs={"x": "b3:i"}, env={"A": "1"}),
        KeyParts(code="b3:1", entrypoint="main", runtime="b3:s", inputs={"x": "b3:i"}, env={"A": "1"}),
        KeyParts(code="b3:1", entrypoint="main", runtime="b3:r", inputs={"x": "b3:j"}, env={"A": "1"}),
        KeyParts(code="b3:1", entrypoint="main", runtime="b3:r", inputs={"y": "b3:i"}, env={"A": "1"}),
        KeyParts(code="b3:1", entrypoint="main", runtime="b3:r", inputs={"x": "b3:i"}, env={"A": "2"}),
        KeyParts(code="b3:1", entrypoint="main", runtime="b3:r", inputs={"x": "b3:i"}, env={"A": "1"}, salt="2"),
    ]
    keys = {v.key for v in variants}
    assert base.key not in keys
    assert len(keys) == len(variants)


def test_code_digest_sees_comments() -> None:
    assert code_digest("def main():\n    return 1\n") != code_digest("def main():\n    return 1  # one\n")


def test_runtime_identity_lists_this_interpreter() -> None:
    ident = runtime_identity()
    names = dict(ident.distributions)
    assert "memoplane" in names
    assert ident.digest.startswith("b3:") and len(ident.digest) == 67
    assert ident.python.count(".") == 2


def test_explain_names_the_changed_input() -> None:
    before = KeyParts(code="b3:1", entrypoint="main", runtime="b3:r", inputs={"rows": "b3:a", "k": "b3:k"}).components()
    after = KeyParts(code="b3:1", entrypoint="main", runtime="b3:r", inputs={"rows": "b3:b", "n": "b3:n"}).components()
    lines = explain_change(before, after)
    assert any(line.startswith("inputs.rows changed") for line in lines)
    assert "inputs.k removed" in lines and "inputs.n added" in lines
    assert not any(line.startswith("code") for line in lines)


def test_explain_without_history() -> None:
    assert explain_change(None, KeyParts(code="b3:1", entrypoint=None, runtime="b3:r").components()) == [
        "no earlier run of this job is recorded"
    ]


def test_key_template_equals_key_parts() -> None:
    from memoplane.keys import KeyTemplate

    rng = __import__("random").Random(7)
    for salt in ("", "2", 'quote"and\\slash', "é"):
        for entrypoint in ("mod.f", None):
            template = KeyTemplate("b3:" + "a" * 64, entrypoint, "b3:" + "b" * 64, salt=salt)
            for _ in range(20):
                names = rng.sample(["rows", "scale", "é", "_x", "B", "a1"], rng.randint(0, 6))
                inputs = {n: f"py:b3:{rng.getrandbits(256):064x}" for n in names}
                expected = KeyParts(code="b3:" + "a" * 64, entrypoint=entrypoint, runtime="b3:" + "b" * 64,
                                    inputs=inputs, salt=salt)
                assert template.key(inputs) == expected.key
                assert template.parts(inputs) == expected
