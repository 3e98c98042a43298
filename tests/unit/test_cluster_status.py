"""Status patches: phases, kstatus conditions, observedGeneration, cleared fields."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from memoplane.api.conditions import get_condition, kstatus
from memoplane.cas import BlobRef, Provenance, ResultManifest, StoredValue
from memoplane.cluster import status as st

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
KEY = "b3:" + "aa" * 32
DIGEST = "b3:" + "bb" * 32
STORE = "s3://memoplane/team-a"
EMPTY = BlobRef("b3:" + "cc" * 32, 0)


def result(value: object = {"total": 60}, blob: BlobRef | None = None) -> ResultManifest:
    sv = StoredValue("json", inline=None if blob else value, blob=blob)
    return ResultManifest(sv, EMPTY, EMPTY, Provenance(KEY, {}, "b3:" + "dd" * 32, "node-a", 1.0, 3.5, 2.5))


def apply(status: dict, patch: dict) -> dict:
    out = dict(status)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def test_lifecycle_to_succeeded_is_current() -> None:
    s = apply({}, st.resolved({}, 1, KEY, {"rows": DIGEST}, T0))
    assert s["phase"] == "Pending" and s["shortKey"] == "aa" * 6 and s["attempts"] == 0
    assert kstatus(1, s["observedGeneration"], s["conditions"]) == "InProgress"
    s = apply(s, st.scheduled(s, 1, "node-a", 1, T0))
    assert (s["phase"], s["attempts"]) == ("Scheduled", 1)
    s = apply(s, st.running(s, 1, "node-a", T0))
    assert s["node"] == "node-a" and s["startTime"] == "2026-01-02T03:04:05Z"
    s = apply(s, st.succeeded(s, 1, "node-a", DIGEST, result(), STORE, 2500, T0 + timedelta(seconds=3)))
    assert s["phase"] == "Succeeded" and s["cached"] is False
    assert s["result"] == {"digest": DIGEST, "size": len(b'{"total":60}'), "store": STORE, "value": {"total": 60}}
    assert s["duration"] == "2.5s"
    assert kstatus(1, 1, s["conditions"]) == "Current"
    assert get_condition(s["conditions"], "Reconciling") is None


def test_cache_hit_reports_seconds_saved_and_no_inline_for_blobs() -> None:
    s = apply({}, st.cache_hit({}, 3, DIGEST, result(), STORE, 4, T0))
    assert s["cached"] is True and s["computeSecondsSaved"] == 2.5 and s["observedGeneration"] == 3
    assert get_condition(s["conditions"], "Ready")["reason"] == "CacheHit"
    big = apply({}, st.cache_hit({}, 1, DIGEST, result(blob=BlobRef("b3:" + "ee" * 32, 99999)), STORE, 4, T0))
    assert big["result"] == {"digest": DIGEST, "size": 99999, "store": STORE}


def test_failed_is_stalled_with_stderr_tail() -> None:
    s = apply({}, st.failed({}, 2, "exception", "ValueError: bad", T0, stderr_tail="x" * 10000, attempts=3))
    assert s["phase"] == "Failed" and s["failure"]["reason"] == "exception"
    assert len(s["failure"]["stderrTail"]) == st.STDERR_TAIL_CHARS and s["failure"]["stderrTail"].endswith("x")
    assert kstatus(2, 2, s["conditions"]) == "Failed"


def test_a_new_generation_clears_the_old_outcome() -> None:
    s = apply({}, st.succeeded({}, 1, "node-a", DIGEST, result(), STORE, 10, T0))
    s = apply(s, st.resolved(s, 2, KEY, {}, T0))
    for gone in ("result", "cached", "node", "completionTime", "durationMs"):
        assert gone not in s
    assert kstatus(2, s["observedGeneration"], s["conditions"]) == "InProgress"


def test_waiting() -> None:
    s = st.waiting({}, 1, "SameKeyInFlight", "waiting for job a", T0)
    assert s["phase"] == "Waiting" and get_condition(s["conditions"], "Reconciling")["reason"] == "SameKeyInFlight"


def test_sandbox_reasons_become_condition_reasons() -> None:
    assert st.camel("output-too-large") == "OutputTooLarge"
    assert st.camel("exception") == "Exception"
    s = st.failed({}, 1, "no-entrypoint", "main is missing", T0)
    assert s["reason"] == "NoEntrypoint" and s["failure"]["reason"] == "no-entrypoint"


def test_resolved_hit_is_one_write_that_clears_the_old_generation() -> None:
    old = apply({}, st.succeeded({}, 1, "node-a", DIGEST, result(), STORE, 2500, T0))
    s = apply(old, st.resolved_hit(old, 2, KEY, {"rows": DIGEST}, DIGEST, result({"total": 7}), STORE, 3, T0))
    assert (s["phase"], s["cached"], s["cacheKey"], s["attempts"]) == ("Succeeded", True, KEY, 0)
    assert s["result"]["value"] == {"total": 7} and s["inputDigests"] == {"rows": DIGEST}
    assert "node" not in s and "startTime" not in s and s["observedGeneration"] == 2
    assert kstatus(2, 2, s["conditions"]) == "Current"
    assert get_condition(s["conditions"], "Ready")["reason"] == "CacheHit"


def test_already_waiting_only_for_the_same_reason_message_and_generation() -> None:
    s = apply({}, st.waiting({}, 2, "InFlight", "waiting for ComputeJob 'a'", T0))
    assert st.already_waiting(s, 2, "InFlight", "waiting for ComputeJob 'a'")
    assert not st.already_waiting(s, 3, "InFlight", "waiting for ComputeJob 'a'")
    assert not st.already_waiting(s, 2, "InFlight", "waiting for ComputeJob 'b'")
    assert not st.already_waiting(s, 2, "NoNode", "waiting for ComputeJob 'a'")
    assert not st.already_waiting({}, 2, "InFlight", "waiting for ComputeJob 'a'")
