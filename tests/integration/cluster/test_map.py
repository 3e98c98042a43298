"""spec.map end to end: one cached sub-task (a child ComputeJob) per element, incremental
when the list grows, results in element order. Outcomes are asserted, never timings."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from memoplane.api.specs import computejob_manifest
from memoplane.cluster import mapping as mp
from memoplane.cluster import protocol as p

pytestmark = pytest.mark.integration
Stack = Any  # conftest.Stack (fixture `stack`)

TIMES = "def main(x, scale):\n    return x * scale\n"


def status(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("status") or {}


def map_job(name: str, source: str, over: Any, salt: str, **inputs: Any) -> dict[str, Any]:
    over_input = {"name": "x", **(over if isinstance(over, dict) and "fromJob" in over else {"value": over})}
    return computejob_manifest(name, None, {
        "python": {"source": source, "entrypoint": "main"},
        "inputs": [over_input, *({"name": k, "value": v} for k, v in inputs.items())],
        "map": {"over": "x"}, "cache": {"version": salt}})


def children(stack: Stack, ns: str, parent: dict[str, Any]) -> list[dict[str, Any]]:
    items, _ = stack.kube.list(p.COMPUTEJOBS, ns, f"{mp.PARENT_LABEL}={parent['metadata']['uid']}")
    return items


def test_map_runs_one_subtask_per_element_and_only_the_new_one_after_an_append(stack: Stack, ns: str) -> None:
    salt = uuid.uuid4().hex[:12]
    runs = stack.total_runs()
    stack.apply(ns, map_job("times", TIMES, [1, 2, 3], salt, scale=10))
    one = stack.wait(ns, "times")
    s = status(one)
    assert s["phase"] == "Succeeded", s
    assert s["result"]["value"] == [10, 20, 30]
    assert s["map"] == {"total": 3, "succeeded": 3, "cached": 0, "failed": 0}
    assert stack.total_runs() - runs == 3
    kids = children(stack, ns, one)
    assert len(kids) == 3 and all(k["metadata"]["ownerReferences"][0]["uid"] == one["metadata"]["uid"] for k in kids)
    assert sorted(status(k)["result"]["value"] for k in kids) == [10, 20, 30]
    # A sub-task's key is derived as if the input were that element: a plain job with x=2 is a hit.
    runs = stack.total_runs()
    stack.apply(ns, computejob_manifest("solo", None, {
        "python": {"source": TIMES, "entrypoint": "main"}, "cache": {"version": salt},
        "inputs": [{"name": "x", "value": 2}, {"name": "scale", "value": 10}]}))
    solo = status(stack.wait(ns, "solo"))
    assert solo["cached"] is True and solo["result"]["value"] == 20
    assert solo["cacheKey"] in {status(k)["cacheKey"] for k in kids}
    # Append one element: exactly one new sub-task runs; the result has 4 values in order.
    stack.kube.custom.patch_namespaced_custom_object(p.GROUP, p.VERSION, ns, p.COMPUTEJOBS, "times", {
        "spec": {"inputs": [{"name": "x", "value": [1, 2, 3, 4]}, {"name": "scale", "value": 10}]}})
    two = stack.wait(ns, "times", lambda o: o["metadata"]["generation"] == 2 and status(o).get("phase") in p.TERMINAL
                     and status(o).get("observedGeneration") == 2)
    s2 = status(two)
    assert s2["phase"] == "Succeeded", s2
    assert s2["result"]["value"] == [10, 20, 30, 40]
    assert s2["map"] == {"total": 4, "succeeded": 4, "cached": 0, "failed": 0}
    assert stack.total_runs() - runs == 1
    assert len(children(stack, ns, two)) == 4
    assert s2["cacheKey"] != s["cacheKey"]
    # The parent's result is stored under its key, like any result.
    store = stack.store(ns)
    assert store.read_ref(s2["cacheKey"]) == s2["result"]["digest"]
    assert store.load_value(store.get_result(s2["result"]["digest"]).value) == [10, 20, 30, 40]


def test_map_over_an_upstream_result_large_result_and_equal_elements(stack: Stack, ns: str) -> None:
    salt = uuid.uuid4().hex[:12]
    stack.apply(ns, computejob_manifest("numbers", None, {
        "python": {"source": "def main(n):\n    return [i % 30 for i in range(n)]\n"},
        "inputs": [{"name": "n", "value": 60}], "cache": {"version": salt}}))
    runs = stack.total_runs()
    stack.apply(ns, map_job("pad", "def main(x):\n    return str(x).rjust(100, '.')\n",
                            {"fromJob": {"name": "numbers"}}, salt))
    obj = stack.wait(ns, "pad", timeout=300)
    s = status(obj)
    assert s["phase"] == "Succeeded", s
    assert s["map"] == {"total": 60, "succeeded": 60, "cached": 0, "failed": 0}
    assert len(children(stack, ns, obj)) == 30           # equal elements share a sub-task
    assert stack.total_runs() - runs == 1 + 30           # the upstream, then each distinct element once
    assert "value" not in s["result"]                    # 60 x 102 bytes: stored as a JSON blob
    store = stack.store(ns)
    assert store.load_value(store.get_result(s["result"]["digest"]).value) == \
        [str(i % 30).rjust(100, ".") for i in range(60)]


def test_map_fails_clearly(stack: Stack, ns: str) -> None:
    salt = uuid.uuid4().hex[:12]
    stack.apply(ns, map_job("inverse", "def main(x):\n    return 1 / x\n", [1, 0, 2], salt))
    s = status(stack.wait(ns, "inverse"))
    assert s["phase"] == "Failed" and s["reason"] == mp.REASON_SUBTASK_FAILED, s
    assert "element 1" in s["message"] and "ZeroDivisionError" in s["message"], s["message"]
    stack.apply(ns, map_job("scalar", TIMES, 5, salt, scale=1))
    s = status(stack.wait(ns, "scalar"))
    assert s["phase"] == "Failed" and s["reason"] == p.REASON_INVALID and "not a list" in s["message"], s
