"""The operator's index: unfinished bodies, echoes of its own writes, who waits for what."""

from __future__ import annotations

from typing import Any

from memoplane.cluster import protocol as p
from memoplane.cluster.index import JobIndex, job_topic, key_topic

KEY = "b3:" + "ab" * 32


def body(name: str, rv: str, phase: str | None = None, generation: int = 1, observed: int | None = 1,
         key: str | None = None, namespace: str = "ns") -> dict[str, Any]:
    status: dict[str, Any] = {}
    if phase:
        status = {"phase": phase, "observedGeneration": observed}
    if key:
        status["cacheKey"] = key
    return {"metadata": {"namespace": namespace, "name": name, "resourceVersion": rv, "generation": generation},
            "status": status}


def test_unfinished_bodies_are_kept_and_settled_ones_dropped() -> None:
    index = JobIndex()
    assert index.observe(body("a", "1")) == "open"
    assert index.open[("ns", "a")]["metadata"]["resourceVersion"] == "1"
    assert index.observe(body("a", "2", p.SUCCEEDED)) == "settled"
    assert ("ns", "a") not in index.open
    # Succeeded for an older generation is not settled: the new spec must be resolved.
    assert index.observe(body("a", "3", p.SUCCEEDED, generation=2, observed=1)) == "open"


def test_echo_of_a_superseded_write_of_ours_is_skipped_and_the_latest_is_not() -> None:
    index = JobIndex()
    index.observe(body("a", "1"))
    index.wrote(body("a", "2", p.PENDING))
    index.wrote(body("a", "3", p.SUCCEEDED))
    assert ("ns", "a") not in index.open
    assert index.stale(body("a", "2", p.PENDING)) and index.observe(body("a", "2", p.PENDING)) == "skip"
    assert ("ns", "a") not in index.open  # the skipped echo did not bring the job back
    assert not index.stale(body("a", "3", p.SUCCEEDED))
    assert index.observe(body("a", "3", p.SUCCEEDED)) == "settled"
    # Someone else's write is never skipped.
    assert index.observe(body("a", "9", p.PENDING, generation=2)) == "open"


def test_waiters_are_woken_once_by_name_or_key() -> None:
    index = JobIndex()
    index.wait_for(("ns", "down"), job_topic("ns", "up"))
    index.wait_for(("ns", "follower"), key_topic("ns", KEY))
    index.wait_for(("other", "follower"), key_topic("other", KEY))
    assert index.waiting() == 3
    woken = index.wake(body("up", "5", p.SUCCEEDED, key=KEY))
    assert woken == [("ns", "down"), ("ns", "follower")]
    assert index.wake(body("up", "6", p.SUCCEEDED, key=KEY)) == []
    assert index.waiting() == 1  # another namespace's flight is not this key's


def test_a_full_list_replaces_the_unfinished_set() -> None:
    index = JobIndex()
    index.observe(body("gone", "1"))
    index.replace_open([body("a", "2"), body("b", "3", p.FAILED)])
    assert list(index.open) == [("ns", "a")]
    index.forget(("ns", "a"))
    assert index.open == {}
