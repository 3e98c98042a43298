"""Quotas on the cluster: a ResultCache at its spec.quota still serves hits, and its jobs still
compute and succeed, but their results are not cached (no ref in the store); the cache's
QuotaExceeded condition and a Warning Event on the job say why. Real API server, MinIO,
operator and agents; the stack counts the caches' entries every second (conftest)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from memoplane.api.conditions import get_condition
from memoplane.api.specs import computejob_manifest
from memoplane.cluster import protocol as p
from memoplane.cluster.decide import default_cache

pytestmark = pytest.mark.integration
Stack = Any  # conftest.Stack (fixture `stack`)

ADD = 'def main(a):\n    return {"twice": 2 * a}\n'


def job(name: str, a: int) -> dict[str, Any]:
    return computejob_manifest(name, None, {"python": {"source": ADD, "entrypoint": "main"},
                                            "inputs": [{"name": "a", "value": a}]})


def wait_cache(stack: Stack, ns: str, until: Callable[[dict[str, Any]], bool], timeout: float = 90.0
               ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = (stack.kube.get(p.RESULTCACHES, ns, p.DEFAULT_RESULT_CACHE) or {}).get("status") or {}
        if until(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"ResultCache {ns}/default: {status}\n{stack.logs()}")
        time.sleep(0.25)


def run(stack: Stack, ns: str, name: str, a: int) -> dict[str, Any]:
    stack.apply(ns, job(name, a))
    status: dict[str, Any] = stack.wait(ns, name)["status"]
    assert status["phase"] == p.SUCCEEDED, status
    return status


def quota_events(stack: Stack, ns: str, name: str) -> list[Any]:
    return [e for e in stack.kube.core.list_namespaced_event(ns).items
            if e.reason == p.REASON_QUOTA_EXCEEDED and e.involved_object.name == name]


def quota_exceeded(status: dict[str, Any]) -> bool:
    cond = get_condition(status.get("conditions"), p.CONDITION_QUOTA_EXCEEDED)
    return cond is not None and cond.get("status") == "True"


def test_at_its_quota_a_cache_serves_hits_and_caches_no_new_result(stack: Stack, ns: str) -> None:
    body = default_cache(ns)
    body["spec"]["quota"] = {"maxEntries": 1}
    assert stack.kube.create(p.RESULTCACHES, ns, body) is not None
    first = run(stack, ns, "first", 1)
    assert first["cached"] is False and first["result"]["value"] == {"twice": 2}  # computed and cached
    store = stack.store(ns)
    assert store.read_ref(first["cacheKey"]) is not None

    status = wait_cache(stack, ns, lambda s: s.get("entries") == 1 and quota_exceeded(s))
    cond = get_condition(status["conditions"], p.CONDITION_QUOTA_EXCEEDED)
    assert cond is not None and cond["message"].startswith("quota reached: 1 of 1 entries (spec.quota.maxEntries)")
    assert get_condition(status["conditions"], "Ready")["status"] == "True"  # type: ignore[index]

    second = run(stack, ns, "second", 2)
    assert second["cached"] is False and second["result"]["value"] == {"twice": 4}
    assert second["cacheKey"] != first["cacheKey"]
    assert store.read_ref(second["cacheKey"]) is None, "at the quota a new result is not cached"
    events = quota_events(stack, ns, "second")
    assert events and events[0].type == "Warning" and "quota reached: 1 of 1 entries" in events[0].message
    assert not quota_events(stack, ns, "first")

    third = run(stack, ns, "third", 1)
    assert third["cached"] is True and third["cacheKey"] == first["cacheKey"], "hits are still served"
