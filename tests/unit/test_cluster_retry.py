"""backoffLimit and exponential backoff."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from memoplane.cluster import status as st
from memoplane.cluster.retry import after_failure, backoff_seconds, retry_at

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_seconds(n, 1.0, 10.0) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert backoff_seconds(0) == 1.0


def test_retries_while_attempts_within_limit() -> None:
    assert after_failure(1, 2).retry and after_failure(2, 2).retry
    assert not after_failure(3, 2).retry
    assert not after_failure(1, 0).retry
    assert after_failure(2, 5, base=0.5).delay_s == 1.0


def test_permanent_failures_are_not_retried() -> None:
    assert not after_failure(1, 5, "syntax").retry
    assert after_failure(1, 5, "exception").retry


def test_retry_at_from_the_backoff_condition() -> None:
    status: dict = {"conditions": [], "attempts": 2}
    assert retry_at(status) is None
    patch = st.retrying({"conditions": [{"type": "Reconciling", "status": "True", "reason": "Running",
                                         "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
                        1, 2, "exception", "boom", 2.0, T0)
    assert retry_at(patch, base=1.0) == T0 + timedelta(seconds=2)
    # Scheduling again replaces the BackOff reason: no more backoff.
    later = st.scheduled(patch, 1, "node-b", 3, T0 + timedelta(seconds=3))
    assert retry_at(later) is None
