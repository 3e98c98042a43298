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
from .propagate import held
from .views import job


def policy_of(obj: Mapping[str, Any]) -> str:
    return job(obj).spec.policy


def cache_of(obj: Mapping[str, Any]) -> str:
    return job(obj).spec.result_cache


def resolved_for_current_generation(obj: Mapping[str, Any]) -> bool:
    return job(obj).resolved_for_current_generation


def needs_resolution(obj: Mapping[str, Any]) -> bool:
    """The current generation has no cache key yet (or its status is of another generation),
    or the key was derived for a runtime the agents no longer run, or for a store its namespace may
    no longer write (or now may), or an upstream it used was recomputed (held): resolve it (again)."""
    view = job(obj)
    status = view.status
    resolved_now = view.resolved_for_current_generation and status.cache_key is not None \
        and status.raw.get("observedGeneration") == view.meta.raw.get("generation")
    return not resolved_now or held(obj) or (status.phase == p.PENDING
                                             and status.reason in (p.REASON_RUNTIME_MISMATCH, p.REASON_STORE_CHANGED))


def started(obj: Mapping[str, Any]) -> bool:
    status = job(obj).status
    return status.phase in (p.SCHEDULED, p.RUNNING) or status.attempts > 0


def is_member(obj: Mapping[str, Any], key: str, cache: str) -> bool:
    view = job(obj)
    return (view.status.cache_key == key
            and view.status.phase not in p.TERMINAL
            and view.resolved_for_current_generation
            and view.spec.policy != "Bypass"
            and view.spec.result_cache == cache)


def order(obj: Mapping[str, Any]) -> tuple[bool, str, str]:
    meta = job(obj).meta
    return (not started(obj), meta.creation_timestamp, meta.name)


def leader(me: Mapping[str, Any], others: Iterable[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The job that should compute `me`'s key: `me` itself, or the one `me` waits for.

    `others`: the jobs listed with `me`'s key label (may include a stale copy of `me`,
    which is replaced by `me`)."""
    view = job(me)
    key = view.status.cache_key
    if view.spec.policy == "Bypass" or not key:
        return me
    cache = view.spec.result_cache
    mine = view.meta.uid or view.meta.name
    group = [o for o in others
             if (job(o).meta.uid or job(o).meta.name) != mine and is_member(o, key, cache)]
    return min([me, *group], key=order)
