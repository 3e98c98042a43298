"""A ResultCache's status: the operator's hit/miss counters, conditions (the size figures are
counted from the store's usage index by the retention worker: memoplane.cluster.retention).

The operator counts hits, misses and compute seconds saved per cache between refreshes
(`Counters`) and folds them into the status totals every MEMOPLANE_STATS_SECONDS.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from memoplane.api.common import parse_quantity
from memoplane.api.conditions import mark_ready, mark_stalled, remove_condition, set_condition

from . import protocol as p
from .views import CacheView

Counters = dict[str, float]   # "hits", "misses", "saved" (seconds) since the last refresh


def no_counts() -> Counters:
    return {"hits": 0, "misses": 0, "saved": 0.0}


def counter_fields(status: Mapping[str, Any], counters: Counters) -> dict[str, Any]:
    return {
        "hits": int(status.get("hits") or 0) + int(counters["hits"]),
        "misses": int(status.get("misses") or 0) + int(counters["misses"]),
        "computeSecondsSaved": round(float(status.get("computeSecondsSaved") or 0.0) + float(counters["saved"]), 3),
    }


def ready(status: Mapping[str, Any], generation: int, bucket: str, prefix: str, now: datetime) -> list[dict[str, Any]]:
    return mark_ready(status.get("conditions"), "StoreReady", f"store {p.store_url(bucket, prefix)}", generation, now)


def stalled(status: Mapping[str, Any], generation: int, message: str, now: datetime,
            reason: str = p.REASON_STORE) -> list[dict[str, Any]]:
    return mark_stalled(status.get("conditions"), reason, message, generation, now)


def quota_reached(view: CacheView) -> str | None:
    """Why the cache takes no new results (None: under spec.quota), by the status's figures (the
    retention worker's count of the store's usage index; a cache with no figures yet is under quota)."""
    quota, status = view.quota, view.status
    max_entries, max_bytes = quota.get("maxEntries"), quota.get("maxBytes")
    entries, size = status.get("entries"), status.get("logicalBytes")
    if max_entries is not None and entries is not None and int(entries) >= int(max_entries):
        return _reached(f"{entries} of {max_entries} entries", "maxEntries")
    limit = int(parse_quantity(str(max_bytes))) if max_bytes is not None else None
    if limit is not None and size is not None and int(size) >= limit:
        return _reached(f"{size} of {limit} logical bytes", "maxBytes")
    return None


def _reached(figures: str, field: str) -> str:
    return (f"quota reached: {figures} (spec.quota.{field}): new results are computed but not cached; "
            "raise spec.quota, or set spec.retention to evict")


def with_quota(conditions: list[dict[str, Any]], view: CacheView, generation: int,
               now: datetime) -> list[dict[str, Any]]:
    """`conditions` with QuotaExceeded: True (and why) at the quota, False under it, none without one.
    Ready is left as it is: a cache at its quota still serves hits."""
    if not view.quota:
        return remove_condition(conditions, p.CONDITION_QUOTA_EXCEEDED)
    why = quota_reached(view)
    if why is None:
        return set_condition(conditions, p.CONDITION_QUOTA_EXCEEDED, "False", p.REASON_UNDER_QUOTA,
                             "under spec.quota", generation, now)
    return set_condition(conditions, p.CONDITION_QUOTA_EXCEEDED, "True", p.REASON_QUOTA_EXCEEDED, why, generation, now)


def newly_revoked(view: CacheView) -> list[str]:
    """Revocations in the cache's spec not yet recorded in its store's audit log (a key id
    removed from the list and revoked again is recorded again)."""
    return sorted(set(view.revoked) - set(view.revocations_recorded))


def unchanged(status: Mapping[str, Any], patch: Mapping[str, Any]) -> bool:
    """The patch would change no field and no condition's type, status or message."""
    def key(conds: Any) -> list[tuple[Any, ...]]:
        return [(c.get("type"), c.get("status"), c.get("message")) for c in conds or ()]
    return all(status.get(k) == v for k, v in patch.items() if k != "conditions") and \
        key(status.get("conditions")) == key(patch.get("conditions"))
