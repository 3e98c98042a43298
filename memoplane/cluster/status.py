"""Status patches for ComputeJob transitions: phase, reason, conditions, observedGeneration.

Each builder returns the body of a JSON merge patch for the status subresource: the fields
to set, and None for fields of an earlier attempt or generation to clear. Conditions follow
kstatus (memoplane.api.conditions): Reconciling while work is under way, Ready=True when
Succeeded, Stalled + Ready=False when Failed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from ..api.computejob import format_duration, short_key
from ..api.conditions import (
    READY,
    RECONCILING,
    mark_ready,
    mark_reconciling,
    mark_stalled,
    remove_condition,
    rfc3339,
    set_condition,
)
from ..cas import ResultManifest
from . import protocol as p

Patch = dict[str, Any]
STDERR_TAIL_CHARS = 4000
MESSAGE_CHARS = 2000

# Fields that describe one attempt or one generation's outcome; cleared when a new one starts.
_OUTCOME = ("result", "cached", "durationMs", "duration", "computeSecondsSaved", "completionTime",
            "failure", "startTime", "node", "runId")


def _conds(status: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [dict(c) for c in status.get("conditions") or ()]


def _clip(text: str, limit: int = MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def camel(reason: str) -> str:
    """A condition reason from a sandbox failure reason: output-too-large -> OutputTooLarge."""
    parts = [x for x in reason.replace("_", "-").split("-") if x]
    out = "".join(x[:1].upper() + x[1:] for x in parts)
    return out if out[:1].isalpha() else "Failed" + out


def tail(text: str, limit: int = STDERR_TAIL_CHARS) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


def result_ref(digest: str, result: ResultManifest, store: str) -> dict[str, Any]:
    """status.result: the result manifest's digest, its logical size (value, output files,
    stdout and stderr), the store that holds it (s3://bucket/prefix) and the value itself
    when it is small JSON (inline in the manifest)."""
    ref: dict[str, Any] = {"digest": digest, "size": result.logical_size, "store": store}
    if result.value.kind == "json" and result.value.blob is None:
        ref["value"] = result.value.inline
    return ref


def resolved(status: Mapping[str, Any], generation: int, key: str, input_digests: Mapping[str, str],
             now: datetime, upstreams: Sequence[Mapping[str, Any]] = (), cold_tier: p.ColdTier | None = None) -> Patch:
    """A generation resolved to `key`: everything of an earlier generation is cleared.
    `upstreams`: the fromJob inputs' exact upstream results and runs (status.upstreams).
    `cold_tier`: the job's store's (status.coldTier, read by the agent: status is the controllers')."""
    message = f"cache key {short_key(key)}"
    return {
        "phase": p.PENDING, "reason": p.REASON_RESOLVED, "message": message,
        "cacheKey": key, "shortKey": short_key(key), "inputDigests": dict(input_digests),
        "upstreams": [dict(u) for u in upstreams] or None,
        "coldTier": cold_tier.text() if cold_tier is not None else None,
        "attempts": 0, **{f: None for f in _OUTCOME},
        "conditions": mark_reconciling(_conds(status), p.REASON_RESOLVED, message, generation, now),
        "observedGeneration": generation,
    }


def waiting(status: Mapping[str, Any], generation: int, reason: str, message: str, now: datetime) -> Patch:
    message = _clip(message)
    return {
        "phase": p.WAITING, "reason": reason, "message": message,
        "conditions": mark_reconciling(_conds(status), reason, message, generation, now),
        "observedGeneration": generation,
    }


def already_waiting(status: Mapping[str, Any], generation: int, reason: str, message: str) -> bool:
    """The status already says this: writing `waiting` again would change nothing."""
    return (status.get("phase"), status.get("reason"), status.get("message"), status.get("observedGeneration")) \
        == (p.WAITING, reason, message, generation)


def upstream_changed(status: Mapping[str, Any], generation: int, reason: str, message: str, now: datetime) -> Patch:
    """A settled result held back while an upstream it used is recomputed (memoplane.cluster.propagate):
    Waiting, Ready=False and Reconciling=True; the result stays in status, never under Ready=True."""
    message = _clip(message)
    conds = mark_reconciling(_conds(status), reason, message, generation, now)
    return {
        "phase": p.WAITING, "reason": reason, "message": message,
        "conditions": set_condition(conds, READY, "False", reason, message, generation, now),
        "observedGeneration": generation,
    }


def early_cutoff(status: Mapping[str, Any], generation: int, message: str, now: datetime,
                 reason: str = p.REASON_EARLY_CUTOFF) -> Patch:
    """A held job's upstreams came back with the same results: Ready again with the result it had."""
    message = _clip(message)
    return {
        "phase": p.SUCCEEDED, "reason": reason, "message": message,
        "conditions": mark_ready(_conds(status), reason, message, generation, now),
        "observedGeneration": generation,
    }


def pending(status: Mapping[str, Any], generation: int, reason: str, message: str, now: datetime) -> Patch:
    message = _clip(message)
    return {
        "phase": p.PENDING, "reason": reason, "message": message,
        "conditions": mark_reconciling(_conds(status), reason, message, generation, now),
        "observedGeneration": generation,
    }


def failed(status: Mapping[str, Any], generation: int, reason: str, message: str, now: datetime,
           stderr_tail: str | None = None, attempts: int | None = None, run_id: str | None = None) -> Patch:
    message = _clip(message)
    failure: dict[str, Any] = {"reason": reason, "message": message}
    if stderr_tail:
        failure["stderrTail"] = tail(stderr_tail)
    patch: Patch = {
        "phase": p.FAILED, "reason": camel(reason), "message": message, "failure": failure,
        "completionTime": rfc3339(now), "runId": run_id,
        "conditions": mark_stalled(_conds(status), camel(reason), message, generation, now),
        "observedGeneration": generation,
    }
    if attempts is not None:
        patch["attempts"] = attempts
    return patch


def cache_hit(status: Mapping[str, Any], generation: int, digest: str, result: ResultManifest, store: str,
              duration_ms: int, now: datetime, node: str | None = None, run_id: str | None = None) -> Patch:
    saved = float(result.provenance.duration_s)
    message = f"served from the cache (computed on {result.provenance.node}, saved {saved:.2f}s)"
    return {
        "phase": p.SUCCEEDED, "reason": p.REASON_CACHE_HIT, "message": message,
        "cached": True, "result": result_ref(digest, result, store), "node": node,
        "durationMs": duration_ms, "duration": format_duration(duration_ms),
        "computeSecondsSaved": saved, "completionTime": rfc3339(now), "failure": None, "runId": run_id,
        "conditions": mark_ready(_conds(status), p.REASON_CACHE_HIT, message, generation, now),
        "observedGeneration": generation,
    }


def resolved_hit(status: Mapping[str, Any], generation: int, key: str, input_digests: Mapping[str, str],
                 digest: str, result: ResultManifest, store: str, duration_ms: int, now: datetime,
                 upstreams: Sequence[Mapping[str, Any]] = (), run_id: str | None = None) -> Patch:
    """A generation resolved to a key already in the cache: resolved and served in one write."""
    first = resolved(status, generation, key, input_digests, now, upstreams)
    return {**first, **cache_hit({"conditions": first["conditions"]}, generation, digest, result, store, duration_ms,
                                 now, run_id=run_id)}


def scheduled(status: Mapping[str, Any], generation: int, node: str, attempts: int, now: datetime,
              reason: str = p.REASON_SCHEDULED, message: str | None = None) -> Patch:
    message = message or f"assigned to node {node} (attempt {attempts})"
    return {
        "phase": p.SCHEDULED, "reason": reason, "message": _clip(message), "node": None,
        "attempts": attempts, "startTime": None,
        "conditions": mark_reconciling(_conds(status), reason, _clip(message), generation, now),
        "observedGeneration": generation,
    }


def running(status: Mapping[str, Any], generation: int, node: str, now: datetime) -> Patch:
    message = f"running on node {node}"
    return {
        "phase": p.RUNNING, "reason": p.REASON_RUNNING, "message": message, "node": node,
        "startTime": rfc3339(now),
        "conditions": mark_reconciling(_conds(status), p.REASON_RUNNING, message, generation, now),
        "observedGeneration": generation,
    }


def succeeded(status: Mapping[str, Any], generation: int, node: str, digest: str, result: ResultManifest,
              store: str, duration_ms: int, now: datetime, run_id: str | None = None) -> Patch:
    message = f"computed on node {node} in {format_duration(duration_ms)}"
    return {
        "phase": p.SUCCEEDED, "reason": p.REASON_COMPUTED, "message": message,
        "cached": False, "node": node, "result": result_ref(digest, result, store),
        "durationMs": duration_ms, "duration": format_duration(duration_ms),
        "computeSecondsSaved": 0.0, "completionTime": rfc3339(now), "failure": None, "runId": run_id,
        "conditions": mark_ready(_conds(status), p.REASON_COMPUTED, message, generation, now),
        "observedGeneration": generation,
    }


def retrying(status: Mapping[str, Any], generation: int, attempts: int, reason: str, message: str,
             delay_s: float, now: datetime, stderr_tail: str | None = None) -> Patch:
    """A failed attempt that will be retried: back to Pending, the backoff starting now."""
    text = _clip(f"attempt {attempts} failed ({reason}): {message}; retrying in {delay_s:g}s")
    failure: dict[str, Any] = {"reason": reason, "message": _clip(message)}
    if stderr_tail:
        failure["stderrTail"] = tail(stderr_tail)
    # The backoff clock is the Reconciling condition's lastTransitionTime: drop it first so
    # set_condition stamps `now` even though Reconciling was already True.
    conds = [c for c in _conds(status) if c.get("type") != RECONCILING]
    conds = set_condition(conds, RECONCILING, "True", p.REASON_BACKOFF, text, generation, now)
    conds = mark_reconciling(conds, p.REASON_BACKOFF, text, generation, now)
    return {
        "phase": p.PENDING, "reason": p.REASON_BACKOFF, "message": text, "failure": failure,
        "attempts": attempts, "node": None,
        "conditions": conds, "observedGeneration": generation,
    }


# -- spec.map parents (memoplane.cluster.mapping) ---------------------------------------------


def map_progress(status: Mapping[str, Any], generation: int, counts: Mapping[str, int], now: datetime,
                 reason: str = "Mapping") -> Patch:
    """Sub-tasks under way: Running while any is, with the counts in status.map."""
    done = counts.get("succeeded", 0)
    message = f"{done}/{counts.get('total', 0)} sub-tasks succeeded ({counts.get('cached', 0)} from the cache)"
    return {
        "phase": p.RUNNING, "reason": reason, "message": message, "map": dict(counts),
        **{f: None for f in _OUTCOME if f not in ("startTime",)}, "cacheKey": None, "shortKey": None,
        "conditions": mark_reconciling(_conds(status), reason, message, generation, now),
        "observedGeneration": generation,
    }


def map_succeeded(status: Mapping[str, Any], generation: int, key: str, digest: str, result: ResultManifest,
                  store: str, counts: Mapping[str, int], seconds_saved: float, now: datetime,
                  run_id: str | None = None) -> Patch:
    """Every sub-task succeeded: the result is their values in element order."""
    total, cached = counts.get("total", 0), counts.get("cached", 0)
    message = f"{total} sub-tasks succeeded ({cached} from the cache)"
    return {
        "phase": p.SUCCEEDED, "reason": p.REASON_COMPUTED, "message": message, "map": dict(counts),
        "cacheKey": key, "shortKey": short_key(key), "cached": total > 0 and cached == total,
        "result": result_ref(digest, result, store), "node": None, "durationMs": None, "duration": None,
        "computeSecondsSaved": round(seconds_saved, 3), "completionTime": rfc3339(now), "failure": None,
        "runId": run_id,
        "conditions": mark_ready(_conds(status), p.REASON_COMPUTED, message, generation, now),
        "observedGeneration": generation,
    }


def batch_succeeded(status: Mapping[str, Any], generation: int, node: str, results: list[str],
                    duration_ms: int, now: datetime, sizes: list[int] | None = None) -> Patch:
    """A map's batch ran every element: their result digests, in order, in status.map.results
    (each element's result is its own, under its own key: the batch has none)."""
    n = len(results)
    message = f"{n} elements computed on node {node} in {format_duration(duration_ms)}"
    return {
        "phase": p.SUCCEEDED, "reason": p.REASON_COMPUTED, "message": message,
        "cached": False, "node": node, "result": None,
        "map": {"total": n, "succeeded": n, "cached": 0, "failed": 0, "results": results, "failedElement": None,
                "sizes": sizes},
        "durationMs": duration_ms, "duration": format_duration(duration_ms),
        "computeSecondsSaved": 0.0, "completionTime": rfc3339(now), "failure": None,
        "conditions": mark_ready(_conds(status), p.REASON_COMPUTED, message, generation, now),
        "observedGeneration": generation,
    }


def batch_failure(total: int, results: list[str], index: int, sizes: list[int] | None = None) -> Patch:
    """What a failed attempt of a map's batch adds to its status: the results before the
    element that failed, and that element's index."""
    return {"map": {"total": total, "succeeded": len(results), "cached": 0, "failed": 1, "results": results,
                    "failedElement": index, "sizes": sizes}}


# -- spec.verify parents (memoplane.cluster.replicas) ------------------------------------------


def replicating(status: Mapping[str, Any], generation: int, key: str | None, done: int, total: int,
                nodes: list[str], now: datetime, reason: str, dispute: str) -> Patch:
    """Replicas under way: Running, with how many are done and where."""
    message = f"{done}/{total} replicas done" + (f" (on {', '.join(nodes)})" if nodes else "")
    return {
        "phase": p.RUNNING, "reason": reason, "message": message,
        **{f: None for f in _OUTCOME if f != "startTime"}, "verify": None,
        **({"cacheKey": key, "shortKey": short_key(key)} if key else {}),
        "conditions": mark_reconciling(remove_condition(_conds(status), dispute), reason, message, generation, now),
        "observedGeneration": generation,
    }


def replicas_agreed(status: Mapping[str, Any], generation: int, key: str, digest: str, result: ResultManifest,
                    store: str, replicas: list[dict[str, Any]], now: datetime, reason: str, dispute: str,
                    run_id: str | None = None) -> Patch:
    """Every replica returned `digest` and attested it: Ready, with the result."""
    nodes = [str(r.get("node")) for r in replicas]
    message = f"computed on {len(nodes)} nodes ({', '.join(nodes)}); their results agree"
    return {
        "phase": p.SUCCEEDED, "reason": reason, "message": message, "cached": False,
        "cacheKey": key, "shortKey": short_key(key), "node": None, "result": result_ref(digest, result, store),
        "verify": {"replicas": replicas, "agreed": True, "difference": None},
        "durationMs": None, "duration": None, "computeSecondsSaved": 0.0, "completionTime": rfc3339(now),
        "failure": None, "runId": run_id,
        "conditions": mark_ready(remove_condition(_conds(status), dispute), reason, message, generation, now),
        "observedGeneration": generation,
    }


def disputed(status: Mapping[str, Any], generation: int, key: str | None, replicas: list[dict[str, Any]],
             difference: str, message: str, now: datetime, reason: str) -> Patch:
    """The replicas disagree: a condition of type `reason` (Disputed) True, Ready False
    (Stalled: nothing to do until the spec changes), no result."""
    message = _clip(message)
    conds = mark_stalled(_conds(status), reason, message, generation, now)
    return {
        "phase": p.FAILED, "reason": reason, "message": message, "result": None, "cached": None,
        **({"cacheKey": key, "shortKey": short_key(key)} if key else {}),
        "failure": {"reason": reason, "message": message},
        "verify": {"replicas": replicas, "agreed": False, "difference": _clip(difference, 4096)},
        "completionTime": rfc3339(now),
        "conditions": set_condition(conds, reason, "True", reason, message, generation, now),
        "observedGeneration": generation,
    }
