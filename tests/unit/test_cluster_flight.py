"""Single flight: one leader per key among non-terminal jobs, decided from API state alone."""

from __future__ import annotations

from typing import Any

from memoplane.cluster import protocol as p
from memoplane.cluster.flight import leader

KEY = "b3:" + "aa" * 32


def cj(name: str, created: str = "2026-01-02T03:04:05Z", phase: str | None = "Pending", key: str = KEY,
       attempts: int = 0, policy: str = "Use", generation: int = 1, resolved_gen: int | None = 1,
       cache: str = "default") -> dict[str, Any]:
    ann = {} if resolved_gen is None else {p.JOB_GENERATION_ANNOTATION: str(resolved_gen)}
    return {"metadata": {"name": name, "uid": "u-" + name, "creationTimestamp": created,
                         "generation": generation, "annotations": ann},
            "spec": {"cache": {"policy": policy, "resultCache": cache}},
            "status": {"phase": phase, "cacheKey": key, "attempts": attempts}}


def name(obj: Any) -> str:
    return str(obj["metadata"]["name"])


def test_oldest_leads_then_name() -> None:
    a, b = cj("a", "2026-01-02T03:04:06Z"), cj("b", "2026-01-02T03:04:05Z")
    assert name(leader(a, [a, b])) == "b"
    assert name(leader(b, [a, b])) == "b"
    c, d = cj("c"), cj("d")
    assert name(leader(d, [c])) == "c" and name(leader(c, [d])) == "c"


def test_a_started_job_keeps_leading() -> None:
    old = cj("old", "2026-01-01T00:00:00Z")
    running = cj("young", "2026-01-03T00:00:00Z", phase="Running", attempts=1)
    assert name(leader(old, [old, running])) == "young"
    backing_off = cj("young", "2026-01-03T00:00:00Z", phase="Pending", attempts=1)
    assert name(leader(old, [backing_off])) == "young"


def test_terminal_bypass_stale_and_other_keys_are_not_members() -> None:
    me = cj("me", "2026-01-05T00:00:00Z")
    others = [cj("done", "2026-01-01T00:00:00Z", phase="Succeeded"),
              cj("failed", "2026-01-01T00:00:00Z", phase="Failed"),
              cj("bypass", "2026-01-01T00:00:00Z", policy="Bypass"),
              cj("stale", "2026-01-01T00:00:00Z", generation=2, resolved_gen=1),
              cj("other", "2026-01-01T00:00:00Z", key="b3:" + "bb" * 32),
              cj("othercache", "2026-01-01T00:00:00Z", cache="other")]
    assert name(leader(me, others)) == "me"


def test_bypass_job_always_leads_itself() -> None:
    me = cj("me", "2026-01-05T00:00:00Z", policy="Bypass")
    assert name(leader(me, [cj("old", "2026-01-01T00:00:00Z", phase="Running")])) == "me"


def test_a_stale_copy_of_me_in_the_list_is_replaced() -> None:
    me = cj("me", "2026-01-02T00:00:00Z", phase="Pending")
    stale_me = cj("me", "2026-01-02T00:00:00Z", phase="Running", attempts=1)
    other = cj("x", "2026-01-01T00:00:00Z")
    assert name(leader(me, [stale_me, other])) == "x"


def test_exactly_one_leader_for_any_order() -> None:
    jobs = [cj(f"j{i:02d}", f"2026-01-02T03:04:{i % 3:02d}Z") for i in range(20)]
    leaders = {name(leader(j, jobs)) for j in jobs}
    assert leaders == {"j00"}


def test_needs_resolution_until_the_current_generation_has_a_key() -> None:
    from memoplane.cluster.flight import needs_resolution

    resolved = cj("a")
    resolved["status"]["observedGeneration"] = 1
    assert not needs_resolution(resolved)
    assert needs_resolution(cj("a", resolved_gen=None))       # never resolved
    assert needs_resolution(cj("a", generation=2))            # the spec changed since
    stale_status = cj("a")
    stale_status["status"]["observedGeneration"] = 0          # status of an older generation
    assert needs_resolution(stale_status)
    no_key = cj("a", key="")
    no_key["status"]["observedGeneration"] = 1
    assert needs_resolution(no_key)
    mismatch = cj("a")
    mismatch["status"].update(observedGeneration=1, reason=p.REASON_RUNTIME_MISMATCH)
    assert needs_resolution(mismatch)                         # agents run another runtime now
    mismatch["status"]["phase"] = p.WAITING
    assert not needs_resolution(mismatch)
