"""Condition helpers follow the API conventions and kstatus."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from memoplane.api.common import Condition
from memoplane.api.conditions import (
    READY,
    RECONCILING,
    STALLED,
    get_condition,
    kstatus,
    mark_ready,
    mark_reconciling,
    mark_stalled,
    remove_condition,
    rfc3339,
    set_condition,
)

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)


def test_new_condition_is_appended_with_now() -> None:
    result = set_condition([], READY, "False", "Pending", "waiting", 3, T0)
    assert result == [{
        "type": "Ready", "status": "False", "reason": "Pending", "message": "waiting",
        "lastTransitionTime": "2026-01-02T03:04:05Z", "observedGeneration": 3,
    }]


def test_transition_time_kept_when_status_unchanged() -> None:
    first = set_condition([], READY, "False", "Pending", "waiting", 1, T0)
    second = set_condition(first, READY, "False", "Scheduled", "on node a", 2, T1)
    (cond,) = second
    assert cond["lastTransitionTime"] == rfc3339(T0)
    assert (cond["reason"], cond["message"], cond["observedGeneration"]) == ("Scheduled", "on node a", 2)


def test_transition_time_moves_when_status_changes() -> None:
    first = set_condition([], READY, "False", "Pending", "", 1, T0)
    (cond,) = set_condition(first, READY, "True", "Succeeded", "", 1, T1)
    assert cond["lastTransitionTime"] == rfc3339(T1)


def test_set_condition_is_pure_and_keeps_order() -> None:
    original = [{"type": "A", "status": "True", "reason": "X", "message": "", "lastTransitionTime": "t"},
                {"type": "B", "status": "True", "reason": "X", "message": "", "lastTransitionTime": "t"}]
    snapshot = [dict(c) for c in original]
    result = set_condition(original, "A", "False", "Y", "", None, T0)
    assert original == snapshot
    assert [c["type"] for c in result] == ["A", "B"]
    assert "observedGeneration" not in result[0]


@pytest.mark.parametrize(("status", "reason"), [("Maybe", "Ok"), ("True", "not camel"), ("True", "")])
def test_set_condition_rejects_bad_status_or_reason(status: str, reason: str) -> None:
    with pytest.raises(ValueError):
        set_condition([], READY, status, reason, "", None, T0)


def test_rfc3339_is_utc_and_refuses_naive_times() -> None:
    assert rfc3339(datetime(2026, 1, 1, 1, 0, tzinfo=timezone(timedelta(hours=1)))) == "2026-01-01T00:00:00Z"
    with pytest.raises(ValueError):
        rfc3339(datetime(2026, 1, 1))


def test_reconciling_then_ready() -> None:
    working = mark_reconciling([], "Running", "on node a", 4, T0)
    assert {c["type"]: c["status"] for c in working} == {RECONCILING: "True", READY: "Unknown"}
    assert kstatus(4, 4, working) == "InProgress"
    done = mark_ready(working, "Succeeded", "computed in 12ms", 4, T1)
    assert {c["type"]: c["status"] for c in done} == {READY: "True"}
    assert kstatus(4, 4, done) == "Current"


def test_stalled_is_failed_and_clears_reconciling() -> None:
    failed = mark_stalled(mark_reconciling([], "Running", "", 1, T0), "Failed", "exit 1", 1, T1)
    assert {c["type"]: c["status"] for c in failed} == {READY: "False", STALLED: "True"}
    assert kstatus(1, 1, failed) == "Failed"
    recovered = mark_ready(failed, "Succeeded", "", 2, T1)
    assert get_condition(recovered, STALLED) is None


def test_kstatus_waits_for_the_latest_generation() -> None:
    done = mark_ready([], "Succeeded", "", 1, T0)
    assert kstatus(2, 1, done) == "InProgress"
    assert kstatus(2, None, done) == "InProgress"
    assert kstatus(None, None, []) == "Current"


def test_remove_condition() -> None:
    both = mark_reconciling([], "Running", "", 1, T0)
    assert [c["type"] for c in remove_condition(both, RECONCILING)] == [READY]


def test_helpers_produce_valid_condition_models() -> None:
    for cond in mark_stalled([], "Failed", "x" * 40000, 1, T0):
        parsed = Condition.model_validate(cond)
        assert len(parsed.message) <= 32768
