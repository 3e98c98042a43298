"""Status conditions, following the Kubernetes API conventions and kstatus.

Conditions are plain dicts (what kopf hands the operator and patches back), and
every helper returns a new list, so handlers and tests can compare before/after.

kstatus semantics (read by Flux, Argo CD, `kubectl wait --for=condition=Ready`):
- Reconciling=True: the controller is working towards the spec (InProgress).
- Stalled=True: it cannot make progress without a change by someone (Failed).
- Ready=True: done; Reconciling and Stalled are removed rather than set False
  ("abnormal-true" conditions are present only while they hold).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"
STATUSES = ("True", "False", "Unknown")
MAX_MESSAGE = 32768
_REASON = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")

ConditionDict = dict[str, Any]
KStatus = Literal["InProgress", "Current", "Failed"]


def rfc3339(moment: datetime) -> str:
    """A condition timestamp: UTC, second precision, `Z` suffix (metav1.Time)."""
    if moment.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def get_condition(conditions: Sequence[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions or () if c.get("type") == type_), None)


def is_true(conditions: Sequence[Mapping[str, Any]] | None, type_: str) -> bool:
    found = get_condition(conditions, type_)
    return found is not None and found.get("status") == "True"


def set_condition(
    conditions: Sequence[Mapping[str, Any]] | None,
    type_: str,
    status: str,
    reason: str,
    message: str,
    observed_generation: int | None,
    now: datetime,
) -> list[ConditionDict]:
    """`conditions` with `type_` set; lastTransitionTime moves only when status changes.

    An existing condition keeps its place in the list; a new one is appended.
    """
    if status not in STATUSES:
        raise ValueError(f"condition status {status!r} is not one of {STATUSES}")
    if not _REASON.match(reason):
        raise ValueError(f"condition reason {reason!r} must be CamelCase, e.g. CacheHit")
    old = get_condition(conditions, type_)
    keep_time = old is not None and old.get("status") == status and old.get("lastTransitionTime")
    new: ConditionDict = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message[:MAX_MESSAGE],
        "lastTransitionTime": old["lastTransitionTime"] if keep_time and old else rfc3339(now),
    }
    if observed_generation is not None:
        new["observedGeneration"] = observed_generation
    if old is None:
        return [dict(c) for c in conditions or ()] + [new]
    return [new if c.get("type") == type_ else dict(c) for c in conditions or ()]


def remove_condition(conditions: Sequence[Mapping[str, Any]] | None, type_: str) -> list[ConditionDict]:
    return [dict(c) for c in conditions or () if c.get("type") != type_]


def mark_reconciling(
    conditions: Sequence[Mapping[str, Any]] | None, reason: str, message: str,
    generation: int | None, now: datetime,
) -> list[ConditionDict]:
    """Working on it: Reconciling=True, Ready=Unknown, no Stalled."""
    result = set_condition(conditions, RECONCILING, "True", reason, message, generation, now)
    result = set_condition(result, READY, "Unknown", reason, message, generation, now)
    return remove_condition(result, STALLED)


def mark_ready(
    conditions: Sequence[Mapping[str, Any]] | None, reason: str, message: str,
    generation: int | None, now: datetime,
) -> list[ConditionDict]:
    """Done: Ready=True, no Reconciling, no Stalled."""
    result = set_condition(conditions, READY, "True", reason, message, generation, now)
    return remove_condition(remove_condition(result, RECONCILING), STALLED)


def mark_stalled(
    conditions: Sequence[Mapping[str, Any]] | None, reason: str, message: str,
    generation: int | None, now: datetime,
) -> list[ConditionDict]:
    """Cannot progress without a change: Stalled=True, Ready=False, no Reconciling."""
    result = set_condition(conditions, STALLED, "True", reason, message, generation, now)
    result = set_condition(result, READY, "False", reason, message, generation, now)
    return remove_condition(result, RECONCILING)


def kstatus(
    generation: int | None,
    observed_generation: int | None,
    conditions: Sequence[Mapping[str, Any]] | None,
) -> KStatus:
    """The kstatus verdict for an object, as GitOps tools compute it for custom resources."""
    if generation is not None and observed_generation != generation:
        return "InProgress"  # the controller has not seen the latest spec yet
    if is_true(conditions, RECONCILING):
        return "InProgress"
    if is_true(conditions, STALLED):
        return "Failed"
    ready = get_condition(conditions, READY)
    if ready is not None and ready.get("status") != "True":
        return "InProgress"
    return "Current"
