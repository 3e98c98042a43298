"""backoffLimit and exponential backoff.

`status.attempts` counts assignments of the job to a node (the operator increments it
when it schedules or reassigns). After a failed attempt the job is retried while
attempts <= backoffLimit, so a job runs at most backoffLimit + 1 times; the wait before
attempt n+1 is BASE * 2^(n-1) seconds, capped. The wait starts when the attempt failed:
the moment the Reconciling condition took the reason BackOff (status.py writes it fresh).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ..api.conditions import RECONCILING, get_condition
from . import protocol as p
from .resolve import parse_time

BACKOFF_BASE_SECONDS = 1.0
BACKOFF_CAP_SECONDS = 60.0

# Failures that no retry can fix: the code or its inputs are wrong.
PERMANENT = frozenset({"syntax", "no-entrypoint", "bad-input"})


@dataclass(frozen=True)
class RetryDecision:
    retry: bool
    delay_s: float = 0.0


def backoff_seconds(attempts: int, base: float = BACKOFF_BASE_SECONDS, cap: float = BACKOFF_CAP_SECONDS) -> float:
    return float(min(cap, base * (2 ** max(0, attempts - 1))))


def after_failure(attempts: int, backoff_limit: int, reason: str = "", base: float = BACKOFF_BASE_SECONDS,
                  cap: float = BACKOFF_CAP_SECONDS) -> RetryDecision:
    """Attempt number `attempts` failed for `reason` (a sandbox failure reason)."""
    if reason in PERMANENT or attempts > backoff_limit:
        return RetryDecision(False)
    return RetryDecision(True, backoff_seconds(attempts, base, cap))


def backoff_started(status: Mapping[str, Any]) -> datetime | None:
    """When the current backoff began, if the job is waiting out one."""
    cond = get_condition(status.get("conditions"), RECONCILING)
    if cond is None or cond.get("reason") != p.REASON_BACKOFF:
        return None
    return parse_time(cond.get("lastTransitionTime"))


def retry_at(status: Mapping[str, Any], base: float = BACKOFF_BASE_SECONDS,
             cap: float = BACKOFF_CAP_SECONDS) -> datetime | None:
    """The earliest time a job backing off may be scheduled again (None: no backoff)."""
    began = backoff_started(status)
    if began is None:
        return None
    return began + timedelta(seconds=backoff_seconds(int(status.get("attempts") or 0), base, cap))
