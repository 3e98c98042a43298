"""A ResultCache's status: the hits and misses counted since the last refresh, conditions."""

from __future__ import annotations

from datetime import UTC, datetime

from memoplane.api.conditions import get_condition
from memoplane.cluster import resultcache as rs
from memoplane.cluster.views import CacheView, cache

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_counters_add_to_the_status_totals() -> None:
    status = {"hits": 4, "misses": 1, "computeSecondsSaved": 1.5}
    fields = rs.counter_fields(status, {"hits": 2, "misses": 3, "saved": 0.25})
    assert fields == {"hits": 6, "misses": 4, "computeSecondsSaved": 1.75}
    assert rs.counter_fields({}, rs.no_counts())["hits"] == 0


def test_ready_and_stalled_conditions() -> None:
    ready = rs.ready({}, 1, "memoplane", "ns/ml", T0)
    cond = get_condition(ready, "Ready")
    assert cond is not None and cond["status"] == "True" and "memoplane" in cond["message"]
    stalled = rs.stalled({"conditions": ready}, 1, "store unreachable", T0)
    assert get_condition(stalled, "Stalled")["status"] == "True"  # type: ignore[index]


def test_unchanged_ignores_condition_timestamps() -> None:
    status = {"observedGeneration": 1, "entries": 3, "conditions": rs.ready({}, 1, "b", "p", T0)}
    later = {"observedGeneration": 1, "entries": 3,
             "conditions": rs.ready({}, 1, "b", "p", T0.replace(hour=9))}
    assert rs.unchanged(status, later)
    assert not rs.unchanged(status, {**later, "entries": 4})
    assert not rs.unchanged(status, {**later, "conditions": rs.stalled(status, 1, "down", T0)})


def test_newly_revoked_is_what_the_spec_revokes_and_the_status_has_not_recorded() -> None:
    def view(revoked: list[str] | None, recorded: list[str] | None) -> CacheView:
        return cache({"spec": {"trust": {"revoked": revoked}} if revoked is not None else {},
                      "status": {"revocationsRecorded": recorded} if recorded is not None else {}})
    for revoked, recorded, new in [
        (None, None, []),
        (["a-1"], None, ["a-1"]),
        (["b-1", "a-1"], ["a-1"], ["b-1"]),
        (["a-1"], ["a-1", "c-1"], []),   # c-1 was un-revoked: nothing to record
    ]:
        assert rs.newly_revoked(view(revoked, recorded)) == new


def _at(quota: dict[str, object] | None, entries: int | None = None, logical: int | None = None) -> CacheView:
    status = {k: v for k, v in (("entries", entries), ("logicalBytes", logical)) if v is not None}
    return cache({"spec": {"store": {"bucket": "memoplane"}, **({"quota": quota} if quota else {})},
                  "status": status})


def test_quota_reached_by_the_status_figures() -> None:
    assert rs.quota_reached(_at({"maxEntries": 1000}, entries=999)) is None
    assert rs.quota_reached(_at({"maxEntries": 1000}, entries=1000)) == (
        "quota reached: 1000 of 1000 entries (spec.quota.maxEntries): new results are computed but not cached; "
        "raise spec.quota, or set spec.retention to evict")
    assert rs.quota_reached(_at({"maxBytes": "1Ki"}, entries=5, logical=1023)) is None
    why = rs.quota_reached(_at({"maxBytes": "1Ki", "maxEntries": 10}, entries=5, logical=1024))
    assert why is not None and why.startswith("quota reached: 1024 of 1024 logical bytes (spec.quota.maxBytes)")
    assert rs.quota_reached(_at({"maxEntries": 1})) is None, "no figures yet: under quota"
    assert rs.quota_reached(_at(None, entries=10**9, logical=10**15)) is None, "no quota"


def test_the_quota_condition_leaves_the_cache_ready() -> None:
    ready = rs.ready({}, 1, "memoplane", "ml/", T0)
    at_limit = rs.with_quota(ready, _at({"maxEntries": 1}, entries=1), 1, T0)
    cond = get_condition(at_limit, "QuotaExceeded")
    assert cond is not None and cond["status"] == "True" and cond["message"].startswith("quota reached: 1 of 1")
    assert get_condition(at_limit, "Ready")["status"] == "True"  # type: ignore[index]
    under = rs.with_quota(at_limit, _at({"maxEntries": 2}, entries=1), 1, T0)
    assert get_condition(under, "QuotaExceeded")["status"] == "False"  # type: ignore[index]
    assert get_condition(rs.with_quota(under, _at(None), 1, T0), "QuotaExceeded") is None
