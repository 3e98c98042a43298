"""spec.map end to end: one cached sub-task per element, hits served with no object, misses
run in batches (a few child ComputeJobs), incremental when the list grows, results in
element order. Outcomes are asserted, never timings."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from memoplane.api.specs import computejob_manifest
from memoplane.cluster import mapping as mp
from memoplane.cluster import protocol as p
from memoplane.cluster.decide import default_cache

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


def counts(total: int, cached: int, computed: int, distinct: int | None = None) -> dict[str, int]:
    return {"total": total, "distinct": total if distinct is None else distinct, "succeeded": cached + computed,
            "cached": cached, "computed": computed, "running": 0, "failed": 0}


def without_batches(s: dict[str, Any]) -> dict[str, int]:
    """status.map less the number of batches (it follows the agents' free slots)."""
    return {k: v for k, v in s["map"].items() if k != "batches"}


def batch_results(kids: list[dict[str, Any]]) -> dict[str, str]:
    """Element key -> result digest, as the batches report them."""
    return {k: d for kid in kids for k, d in zip(mp.batch_keys(kid), status(kid)["map"]["results"], strict=True)}


def test_map_runs_one_subtask_per_element_in_a_batch_and_only_the_new_one_after_an_append(stack: Stack,
                                                                                          ns: str) -> None:
    salt = uuid.uuid4().hex[:12]
    runs = stack.total_runs()
    stack.apply(ns, map_job("times", TIMES, [1, 2, 3], salt, scale=10))
    one = stack.wait(ns, "times")
    s = status(one)
    assert s["phase"] == "Succeeded", s
    assert s["result"]["value"] == [10, 20, 30]
    assert without_batches(s) == counts(3, cached=0, computed=3)
    assert stack.total_runs() - runs == 3                 # one sandbox run per element
    kids = children(stack, ns, one)
    assert len(kids) == s["map"]["batches"] and all(
        k["metadata"]["ownerReferences"][0]["uid"] == one["metadata"]["uid"] for k in kids)
    assert all(status(k)["phase"] == "Succeeded" for k in kids)
    results = batch_results(kids)
    # Each element's result is its own, under its own key, as a plain job would store it.
    store = stack.store(ns)
    assert len(results) == 3 and all(store.read_ref(k) == d for k, d in results.items())
    assert sorted(store.load_value(store.get_result(d).value) for d in results.values()) == [10, 20, 30]
    # The parent's key is the digest of its elements' keys in element order.
    inputs = store.get_result(s["result"]["digest"]).provenance.inputs
    keys = [inputs[f"x[{i}]"] for i in range(3)]
    assert set(keys) == set(results) and s["cacheKey"] == mp.map_key("x", keys)
    # A sub-task's key is derived as if the input were that element: a plain job with x=2 is a hit.
    runs = stack.total_runs()
    stack.apply(ns, computejob_manifest("solo", None, {
        "python": {"source": TIMES, "entrypoint": "main"}, "cache": {"version": salt},
        "inputs": [{"name": "x", "value": 2}, {"name": "scale", "value": 10}]}))
    solo = status(stack.wait(ns, "solo"))
    assert solo["cached"] is True and solo["result"]["value"] == 20
    assert solo["cacheKey"] in keys
    # Another map over known and new elements: the known ones are served with no object.
    stack.apply(ns, map_job("again", TIMES, [3, 5, 2], salt, scale=10))
    again = stack.wait(ns, "again")
    assert status(again)["result"]["value"] == [30, 50, 20]
    assert status(again)["map"] == {**counts(3, cached=2, computed=1), "batches": 1}
    new_batch = children(stack, ns, again)
    assert len(new_batch) == 1 and len(mp.batch_keys(new_batch[0])) == 1 and mp.batch_keys(new_batch[0])[0] not in keys
    assert stack.total_runs() - runs == 1
    # Append one element: exactly one new sub-task runs; the result has 4 values in order.
    runs = stack.total_runs()
    stack.kube.custom.patch_namespaced_custom_object(p.GROUP, p.VERSION, ns, p.COMPUTEJOBS, "times", {
        "spec": {"inputs": [{"name": "x", "value": [1, 2, 3, 4]}, {"name": "scale", "value": 10}]}})
    two = stack.wait(ns, "times", lambda o: o["metadata"]["generation"] == 2 and status(o).get("phase") in p.TERMINAL
                     and status(o).get("observedGeneration") == 2)
    s2 = status(two)
    assert s2["phase"] == "Succeeded", s2
    assert s2["result"]["value"] == [10, 20, 30, 40]
    assert s2["map"] == {**counts(4, cached=0, computed=4), "batches": len(kids) + 1}
    assert stack.total_runs() - runs == 1
    assert len(children(stack, ns, two)) == len(kids) + 1     # the earlier batches stay: their elements still are
    assert s2["cacheKey"] != s["cacheKey"]
    # The parent's result is stored under its key, like any result.
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
    assert without_batches(s) == counts(60, cached=0, computed=60, distinct=30)
    kids = children(stack, ns, obj)                      # equal elements share a sub-task
    assert len(kids) == s["map"]["batches"] and len(batch_results(kids)) == 30
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


def test_a_restarted_operator_continues_a_map_from_its_batches(stack: Stack, ns: str) -> None:
    """The operator's memory of a map is a shortcut: killed while batches run, a new operator
    finds them by label, makes no second batch and runs no element twice."""
    salt = uuid.uuid4().hex[:12]
    slow = "import time\n\ndef main(x):\n    time.sleep(1.5)\n    return -x\n"
    runs = stack.total_runs()
    stack.apply(ns, map_job("slow", slow, list(range(8)), salt))

    def batches_made(obj: dict[str, Any]) -> bool:
        return bool(status(obj).get("map", {}).get("batches"))
    parent = stack.wait(ns, "slow", batches_made, timeout=60)
    stack.kill_operator()
    made = children(stack, ns, parent)
    assert made and status(stack.get(ns, "slow"))["phase"] == "Running", "killed before the map finished"
    stack.start_operator()
    s = status(stack.wait(ns, "slow", timeout=180))
    assert s["phase"] == "Succeeded" and s["result"]["value"] == [-x for x in range(8)], s
    assert sorted(k["metadata"]["name"] for k in children(stack, ns, parent)) == \
        sorted(k["metadata"]["name"] for k in made), "no batch was made again"
    assert without_batches(s) == counts(8, cached=0, computed=8)
    assert stack.total_runs() - runs == 8


def cache_status(stack: Stack, ns: str, until: Any, timeout: float = 90.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = status(stack.kube.get(p.RESULTCACHES, ns, p.DEFAULT_RESULT_CACHE) or {})
        if until(found):
            return found
        assert time.monotonic() < deadline, f"ResultCache {ns}/default: {found}\n{stack.logs()}"
        time.sleep(0.25)


def test_the_caches_stats_count_a_maps_elements_as_soon_as_it_finishes_and_element_hits_are_uses(
        stack: Stack, ns: str) -> None:
    assert stack.kube.create(p.RESULTCACHES, ns, default_cache(ns)) is not None
    cache_status(stack, ns, lambda s: s.get("entries") == 0)   # indexed from its (no) refs: the next reindex is far
    salt = uuid.uuid4().hex[:12]
    stack.apply(ns, map_job("sized", TIMES, [1, 2, 3], salt, scale=10))
    one = stack.wait(ns, "sized")
    assert status(one)["phase"] == "Succeeded", status(one)
    store = stack.store(ns)
    results = batch_results(children(stack, ns, one))
    sizes = {k: store.get_result(d).logical_size for k, d in results.items()}
    listed = status(one)["result"]["size"]
    # The three elements the batches wrote and the parent's list, by the operator's own records.
    stats = cache_status(stack, ns, lambda s: s.get("entries") == 4)
    assert stats["logicalBytes"] == sum(sizes.values()) + listed, (stats, sizes, listed)
    written = {k: store.usage().entries[k].last_used for k in sizes}
    stack.apply(ns, map_job("again", TIMES, [3, 2, 1], salt, scale=10))   # every element a hit
    again = status(stack.wait(ns, "again"))
    assert again["phase"] == "Succeeded" and again["map"]["cached"] == 3, again
    deadline = time.monotonic() + 60
    while not all(store.usage().entries[k].last_used > at for k, at in written.items()):   # the hits are uses
        assert time.monotonic() < deadline, {k: store.usage().entries[k] for k in written}
        time.sleep(0.25)
