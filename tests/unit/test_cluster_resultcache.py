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
