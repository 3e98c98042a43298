"""Protocol helpers: namespace patterns (kopf's semantics), store URLs, labels."""

from __future__ import annotations

import pytest

from memoplane.cluster import protocol as p


@pytest.mark.parametrize(("pattern", "namespace", "expected"), [
    ("ml", "ml", True), ("ml", "ml2", False), ("mpt-*", "mpt-1", True),
    ("!mpt-*", "default", True), ("!mpt-*", "mpt-1", False),
    ("*,!mpt-*", "mpt-1", False), ("*,!mpt-*", "ml", True),
    ("myapp-*,!*-pr-*,*-pr-123", "myapp-live", True), ("myapp-*,!*-pr-*,*-pr-123", "myapp-pr-456", False),
    ("myapp-*,!*-pr-*,*-pr-123", "myapp-pr-123", True), ("myapp-*,!*-pr-*,*-pr-123", "otherapp-pr-123", False),
])
def test_pattern_matches_like_kopf(pattern: str, namespace: str, expected: bool) -> None:
    assert p.pattern_matches(pattern, namespace) is expected


def test_namespace_matches_any_pattern_and_empty_is_all() -> None:
    assert p.namespace_matches([], "anything")
    assert p.namespace_matches(["a", "b-*"], "b-1")
    assert not p.namespace_matches(["a"], "b")
    assert p.parse_patterns("a b-*;c") == ["a", "b-*", "c"]
    assert p.parse_patterns(None) == []


def test_store_urls_and_labels() -> None:
    assert p.store_url("memoplane", "ml/") == "s3://memoplane/ml"
    assert p.parse_store_url("s3://memoplane/ml") == ("memoplane", "ml")
    assert p.parse_store_url("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError):
        p.parse_store_url("/tmp/x")
    assert p.key_label("b3:" + "ab" * 32) == "ab" * 20
