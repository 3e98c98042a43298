"""Single flight: of the jobs that share a cache key, one computes and the others wait.

Stateless, so an operator restart loses nothing: the leader is a function of what the
API server holds. Among the non-terminal jobs resolved to the same key (same namespace,
same ResultCache, the key label selects them), jobs that were already started (Scheduled,
Running, or retrying after a failed attempt) come first, then the oldest by
creationTimestamp, then by name. A started job keeps leading even when an older one
resolves to its key later, so there is never a second computation in flight.

Bypass jobs neither read nor write the cache: they are not part of any flight.
The operator makes these decisions one at a time (one worker), and each decision reads
a fresh list that includes its own earlier writes, which is what makes "started first"
sound.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from . import protocol as p


def _status(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("status") or {}


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def policy_of(obj: Mapping[str, Any]) -> str:
    return str((((obj.get("spec") or {}).get("cache")) or {}).get("policy") or "Use")


def cache_of(obj: Mapping[str, Any]) -> str:
    return str((((obj.get("spec") or {}).get("cache")) or {}).get("resultCache") or p.DEFAULT_RESULT_CACHE)


def resolved_for_current_generation(obj: Mapping[str, Any]) -> bool:
    meta = _meta(obj)
    return (meta.get("annotations") or {}).get(p.JOB_GENERATION_ANNOTATION) == str(meta.get("generation"))


def needs_resolution(obj: Mapping[str, Any]) -> bool:
    """The current generation has no cache key yet (or its status is of another generation),
    or the key was derived for a runtime the agents no longer run: resolve it (again)."""
    meta, status = _meta(obj), _status(obj)
    resolved_now = resolved_for_current_generation(obj) and bool(status.get("cacheKey")) \
        and status.get("observedGeneration") == meta.get("generation")
    return not resolved_now or (status.get("phase") == p.PENDING and status.get("reason") == p.REASON_RUNTIME_MISMATCH)


def started(obj: Mapping[str, Any]) -> bool:
    status = _status(obj)
    return status.get("phase") in (p.SCHEDULED, p.RUNNING) or int(status.get("attempts") or 0) > 0


def is_member(obj: Mapping[str, Any], key: str, cache: str) -> bool:
    status = _status(obj)
    return (status.get("cacheKey") == key
            and status.get("phase") not in p.TERMINAL
            and resolved_for_current_generation(obj)
            and policy_of(obj) != "Bypass"
            and cache_of(obj) == cache)


def order(obj: Mapping[str, Any]) -> tuple[bool, str, str]:
    meta = _meta(obj)
    return (not started(obj), str(meta.get("creationTimestamp") or ""), str(meta.get("name") or ""))


def leader(me: Mapping[str, Any], others: Iterable[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The job that should compute `me`'s key: `me` itself, or the one `me` waits for.

    `others`: the jobs listed with `me`'s key label (may include a stale copy of `me`,
    which is replaced by `me`)."""
    key = _status(me).get("cacheKey")
    if policy_of(me) == "Bypass" or not key:
        return me
    cache = cache_of(me)
    uid = _meta(me).get("uid")
    name = _meta(me).get("name")
    group = [o for o in others
             if (_meta(o).get("uid") or _meta(o).get("name")) != (uid or name) and is_member(o, key, cache)]
    return min([me, *group], key=order)
