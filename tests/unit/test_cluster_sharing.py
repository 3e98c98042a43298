"""Ownership of store locations and sharing by policy (memoplane.cluster.sharing, pure)."""

from __future__ import annotations

from typing import Any

import pytest

from memoplane.cluster import protocol as p
from memoplane.cluster.sharing import Access, Location, decide_access, normalised, selects

HOME = p.DEFAULT_BUCKET


def _rc(namespace: str, name: str, bucket: str, prefix: str, created: str = "2026-01-01T00:00:00Z",
        sharing: dict[str, Any] | None = None, read_only: bool = False) -> dict[str, Any]:
    store: dict[str, Any] = {"bucket": bucket, "prefix": prefix}
    if read_only:
        store["readOnly"] = True
    spec: dict[str, Any] = {"store": store}
    if sharing is not None:
        spec["sharing"] = sharing
    return {"metadata": {"namespace": namespace, "name": name, "creationTimestamp": created}, "spec": spec}


def _decide(*caches: dict[str, Any], labels: dict[str, dict[str, str]] | None = None) -> dict[tuple[str, str], Access]:
    return decide_access(caches, labels or {})


def test_prefixes_are_normalised_whatever_the_slashes() -> None:
    assert [normalised(x) for x in ("", "/", "a", "a/", "/a//b/", "a/b")] == ["", "", "a/", "a/", "a/b/", "a/b/"]


def test_locations_overlap_when_one_prefix_holds_the_other() -> None:
    parent, child, sibling = Location("b", "x/"), Location("b", "x/y/"), Location("b", "xy/")
    assert parent.overlaps(child) and child.overlaps(parent) and parent.contains(child)
    assert not child.contains(parent)
    assert not parent.overlaps(sibling)  # "x/" is not a prefix of "xy/" once normalised
    assert not parent.overlaps(Location("other", "x/"))


def test_a_namespace_owns_its_home_in_the_default_bucket() -> None:
    decided = _decide(_rc("team-a", "default", HOME, "team-a/"), _rc("team-a", "deep", HOME, "team-a/x/y"))
    assert decided[("team-a", "default")] == Access(True, True, "team-a")
    assert decided[("team-a", "deep")] == Access(True, True, "team-a")


def test_the_reproduction_a_foreign_home_is_neither_read_nor_written() -> None:
    decided = _decide(_rc("team-a", "default", HOME, "team-a/"),
                      _rc("team-b", "steal", HOME, "team-a/", created="2025-01-01T00:00:00Z"))
    access = decided[("team-b", "steal")]
    assert (access.read, access.write, access.owner, access.usable) == (False, False, "team-a", False)
    assert "ResultCache team-a/default" in access.why
    assert "list team-b in ResultCache team-a/default spec.sharing.readers and writers" in access.why
    assert f"bucket {HOME} prefix team-b/" in access.why


def test_no_squatting_on_a_home_that_has_no_cache_yet() -> None:
    access = _decide(_rc("team-b", "early", HOME, "team-c/data"))[("team-b", "early")]
    assert not access.read and not access.write and access.owner == "team-c"
    assert "a ResultCache in namespace team-c" in access.why


def test_the_default_bucket_root_is_no_ones() -> None:
    access = _decide(_rc("team-a", "all", HOME, "/"))[("team-a", "all")]
    assert not access.usable and access.owner == ""
    assert "use a prefix under team-a/" in access.why


@pytest.mark.parametrize("prefix", ["team-b/../team-a", "./x", "team-a/./x"])
def test_dot_segments_are_refused(prefix: str) -> None:
    access = _decide(_rc("team-b", "c", "shared", prefix))[("team-b", "c")]
    assert not access.usable and "'..'" in access.why


def test_readers_grant_reading_only() -> None:
    decided = _decide(_rc("team-a", "default", HOME, "team-a/", sharing={"readers": {"namespaces": ["team-b"]}}),
                      _rc("team-b", "a", HOME, "team-a/"), _rc("team-c", "a", HOME, "team-a/"))
    b = decided[("team-b", "a")]
    assert (b.read, b.write, b.usable) == (True, False, True)
    assert "may not write there" in b.why and "spec.sharing.writers" in b.why
    assert not decided[("team-c", "a")].usable


def test_a_grant_covers_locations_below_the_granting_cache_only() -> None:
    decided = _decide(_rc("team-a", "x", HOME, "team-a/x/", sharing={"readers": {"namespaces": ["team-b"]}}),
                      _rc("team-b", "below", HOME, "team-a/x/y/"), _rc("team-b", "above", HOME, "team-a/"))
    assert decided[("team-b", "below")].read
    assert not decided[("team-b", "above")].read


def test_writers_and_read_only() -> None:
    both = {"readers": {"namespaces": ["team-b"]}, "writers": {"namespaces": ["team-b"]}}
    decided = _decide(_rc("team-a", "default", HOME, "team-a/", sharing=both),
                      _rc("team-b", "rw", HOME, "team-a/"), _rc("team-b", "ro", HOME, "team-a/", read_only=True),
                      _rc("team-b", "own-ro", HOME, "team-b/", read_only=True))
    assert (decided[("team-b", "rw")].read, decided[("team-b", "rw")].write) == (True, True)
    assert (decided[("team-b", "ro")].read, decided[("team-b", "ro")].write) == (True, False)
    assert decided[("team-b", "rw")].why == decided[("team-b", "ro")].why == ""   # nothing denied
    assert decided[("team-b", "own-ro")] == Access(True, False, "team-b")


def test_a_selector_grants_by_namespace_labels() -> None:
    sharing = {"readers": {"namespaceSelector": {"matchLabels": {"org": "acme"}}}}
    caches = (_rc("team-a", "default", HOME, "team-a/", sharing=sharing), _rc("team-b", "a", HOME, "team-a/"))
    assert _decide(*caches, labels={"team-b": {"org": "acme"}})[("team-b", "a")].read
    assert not _decide(*caches, labels={"team-b": {"org": "other"}})[("team-b", "a")].read
    assert not _decide(*caches)[("team-b", "a")].read   # labels unknown: no grant


@pytest.mark.parametrize(("expression", "labels", "selected"), [
    ({"key": "t", "operator": "In", "values": ["a", "b"]}, {"t": "b"}, True),
    ({"key": "t", "operator": "In", "values": ["a"]}, {}, False),
    ({"key": "t", "operator": "NotIn", "values": ["a"]}, {"t": "b"}, True),
    ({"key": "t", "operator": "NotIn", "values": ["a"]}, {"t": "a"}, False),
    ({"key": "t", "operator": "Exists"}, {"t": ""}, True),
    ({"key": "t", "operator": "DoesNotExist"}, {"t": ""}, False),
])
def test_selector_expressions(expression: dict[str, Any], labels: dict[str, str], selected: bool) -> None:
    assert selects({"matchExpressions": [expression]}, labels) is selected


def test_in_other_buckets_the_oldest_cache_owns() -> None:
    decided = _decide(_rc("team-b", "late", "shared", "data/x", created="2026-02-01T00:00:00Z"),
                      _rc("team-a", "first", "shared", "data/", created="2026-01-01T00:00:00Z"),
                      _rc("team-c", "apart", "shared", "other/", created="2026-03-01T00:00:00Z"))
    assert decided[("team-a", "first")] == Access(True, True, "team-a")
    late = decided[("team-b", "late")]
    assert not late.usable and late.owner == "team-a" and "ResultCache team-a/first" in late.why
    assert decided[("team-c", "apart")] == Access(True, True, "team-c")


def test_same_age_is_decided_by_namespace_then_name() -> None:
    decided = _decide(_rc("team-b", "c", "shared", "d/"), _rc("team-a", "c", "shared", "d/"))
    assert decided[("team-a", "c")].owner == decided[("team-b", "c")].owner == "team-a"


def test_a_parent_prefix_over_another_namespace_is_refused() -> None:
    decided = _decide(_rc("team-a", "inner", "shared", "data/a/", created="2026-01-01T00:00:00Z"),
                      _rc("team-b", "parent", "shared", "data/", created="2026-02-01T00:00:00Z"),
                      _rc("team-c", "beside", "shared", "data/c/", created="2026-03-01T00:00:00Z"))
    parent = decided[("team-b", "parent")]
    assert not parent.usable and "contains ResultCache team-a/inner" in parent.why
    # the refused parent owns nothing: a later cache beside the inner one is its namespace's
    assert decided[("team-c", "beside")] == Access(True, True, "team-c")


def test_caches_of_one_namespace_overlap_freely() -> None:
    decided = _decide(_rc("team-a", "inner", "shared", "data/a/", created="2026-01-01T00:00:00Z"),
                      _rc("team-a", "parent", "shared", "data/", created="2026-02-01T00:00:00Z"))
    assert decided[("team-a", "parent")] == Access(True, True, "team-a")


def test_owners_are_found_by_prefix_not_by_spelling() -> None:
    decided = _decide(_rc("team-a", "deep", "shared", "d/x/y/", created="2026-01-01T00:00:00Z"),
                      _rc("team-b", "dash", "shared", "d/x-y/", created="2026-01-02T00:00:00Z"),
                      _rc("team-c", "deeper", "shared", "d/x/y/z", created="2026-01-03T00:00:00Z"),
                      _rc("team-d", "parent", "shared", "d/x", created="2026-01-04T00:00:00Z"),
                      _rc("team-e", "slashes", "shared", "/d//x/y/", created="2026-01-05T00:00:00Z"))
    assert decided[("team-b", "dash")] == Access(True, True, "team-b")   # "d/x-y/" is not below "d/x/"
    assert decided[("team-c", "deeper")].owner == "team-a" and not decided[("team-c", "deeper")].usable
    parent = decided[("team-d", "parent")]
    assert not parent.usable and "contains ResultCache team-a/deep" in parent.why
    assert decided[("team-e", "slashes")].owner == "team-a"


def test_with_a_home_prefix_homes_are_below_it_and_the_rest_of_the_bucket_is_like_another_bucket(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two clusters sharing one bucket: this one's homes are under c2/ (MEMOPLANE_HOME), c1/ is
    the other cluster's part, which this cluster's namespaces may read like any other bucket."""
    monkeypatch.setattr(p, "HOME_PREFIX", "c2")
    assert p.default_store_prefix("ml") == "c2/ml/"
    assert (p.home_namespace(HOME, "c2/ml/x/"), p.home_namespace(HOME, "c1/ml/"), p.home_namespace("o", "c2/ml/")) \
        == ("ml", None, None)
    assert [p.holds_every_home(HOME, prefix) for prefix in ("", "c2/", "c2/ml/", "c1/")] == [True, True, False, False]
    decided = _decide(_rc("ml", "default", HOME, "c2/ml/"), _rc("ml", "from-c1", HOME, "c1/ml/", read_only=True),
                      _rc("ops", "steal", HOME, "c2/ml/"), _rc("ops", "all", HOME, "c2/"))
    assert decided[("ml", "default")] == Access(True, True, "ml")
    assert decided[("ml", "from-c1")] == Access(True, False, "ml")
    assert decided[("ops", "steal")].owner == "ml" and not decided[("ops", "steal")].read
    assert not decided[("ops", "all")].read and "holds every namespace's results" in decided[("ops", "all")].why
