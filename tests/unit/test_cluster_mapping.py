"""spec.map decisions: element keys from the parent resolved once, batches of missed
elements, their plan, progress, the parent's key."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

import pytest

from memoplane.cluster import mapping as mp
from memoplane.cluster import protocol as p
from memoplane.cluster import resolve
from memoplane.jobs import JsonInput

RUNTIME = "b3:" + "7" * 64


def parent(values: Any, source: str = "def main(x, k):\n    return x\n", name: str = "sq") -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": name, "uid": "u-1", "generation": 1},
            "spec": {"python": {"source": source, "entrypoint": "main"}, "map": {"over": "x"},
                     "inputs": [{"name": "x", "value": values}, {"name": "k", "value": 3}],
                     "cache": {"version": "s"}}}


def resolved(obj: dict[str, Any]) -> resolve.Resolved:
    # Value inputs read nothing: no lookups are needed.
    got = resolve.resolve(obj, RUNTIME, cast(resolve.Lookups, None), datetime.now(UTC))
    assert isinstance(got, resolve.Resolved), got
    return got


def keyer(obj: dict[str, Any]) -> mp.ElementKeys:
    return mp.ElementKeys(resolved(mp.template_object(obj)).job, "x")


def test_an_element_key_is_the_key_of_the_plain_job_with_that_input() -> None:
    par = parent([1, 2])
    keys = keyer(par)
    for element in (2, "2", [1, {"a": None}], None):
        plain = {"metadata": {"namespace": "ns", "name": "solo"}, "spec": mp.child_spec(par, element)}
        assert plain["spec"]["inputs"] == [{"name": "x", "value": element}, {"name": "k", "value": 3}]
        assert "map" not in plain["spec"] and plain["spec"]["cache"] == {"version": "s"}
        assert keys.key(element) == resolved(plain).job.key
    assert keys.key(2) != keys.key("2")
    assert keyer(parent([2], source="def main(x, k):\n    return -x\n")).key(2) != keys.key(2)


def test_a_batch_holds_its_elements_and_runs_each_under_its_own_key() -> None:
    par = parent([5, 6, 7])
    keys = keyer(par)
    ks = [keys.key(e) for e in (5, 7)]
    m = mp.batch_manifest(par, [5, 7], ks)
    assert m["spec"]["inputs"] == [{"name": "x", "value": [5, 7]}, {"name": "k", "value": 3}]
    assert m["metadata"]["labels"] == {mp.PARENT_LABEL: "u-1"}
    assert m["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert mp.is_batch(m) and not mp.is_map(m) and mp.batch_keys(m) == ks
    # The batch's name follows its keys (never rewritten) and fits a Kubernetes name.
    assert m["metadata"]["name"] == mp.batch_name("sq", ks) != mp.batch_name("sq", ks[::-1])
    assert len(mp.batch_name("a" * 300, ks)) <= mp.NAME_MAX
    jobs = mp.batch_jobs(resolved(m).job, "x")
    assert [j.inputs["x"] for j in jobs] == [JsonInput(5), JsonInput(7)]
    assert [j.key for j in jobs] == ks
    assert mp.batch_key("x", ks) not in ks and mp.batch_key("x", ks) != mp.batch_key("x", ks[:1])
    with pytest.raises(ValueError, match="JSON list"):
        mp.batch_jobs(jobs[0], "x")


def settled(manifest: dict[str, Any], phase: str = p.SUCCEEDED, results: list[str] | None = None,
            key: str | None = None, failed_element: int | None = None) -> dict[str, Any]:
    ks = mp.batch_keys(manifest)
    status: dict[str, Any] = {"phase": phase, "observedGeneration": 1, "cacheKey": key or mp.batch_key("x", ks),
                              "map": {"results": results if results is not None else [d(k) for k in ks]}}
    if failed_element is not None:
        status["map"]["failedElement"] = failed_element
    return {**manifest, "metadata": {**manifest["metadata"], "generation": 1}, "status": status}


def d(key: str) -> str:
    return "b3:" + key[3:][::-1]   # a result digest made up for a key


def test_plan_batches_only_the_unknown_keys_and_deletes_batches_no_key_needs() -> None:
    wanted = {f"k{i}": i for i in range(10)}
    known = {"k0": mp.Known("b3:r0", "s3://b/p", cached=True), "k3": mp.Known("b3:r3", "s3://b/p", cached=True)}
    running = mp.Batch("sq-run", ("k1", "k2"), None)
    gone = mp.Batch("sq-old", ("z1", "z2"), p.SUCCEEDED, ("b3:a", "b3:b"))
    todo = mp.plan(wanted, known, [running, gone], 3)
    assert todo.create == [([4, 5, 6], ["k4", "k5", "k6"]), ([7, 8, 9], ["k7", "k8", "k9"])]
    assert todo.delete == ["sq-old"] and todo.running == {"k1": "sq-run", "k2": "sq-run"} and not todo.failed
    # A few misses are spread over the agents' slots (a batch runs its elements in turn); many fill batches.
    hundred = {f"m{i}": i for i in range(100)}
    assert [len(ks) for _, ks in mp.plan(hundred, {}, [], 64, slots=4).create] == [25, 25, 25, 25]
    assert [len(ks) for _, ks in mp.plan(hundred, {}, [], 64, slots=1).create] == [64, 36]
    assert [len(ks) for _, ks in mp.plan(hundred, {}, [], 10, slots=4).create] == [10] * 10
    # Large elements: a batch's spec stays small (an element larger than the bound goes alone).
    big = {f"b{i}": "x" * (100 << 10) for i in range(5)} | {"huge": "y" * (300 << 10)}
    assert [len(ks) for _, ks in mp.plan(big, {}, [], 64).create] == [2, 2, 1, 1]
    # Everything known or under way: nothing to make.
    assert mp.plan({"k0": 0, "k1": 1}, known, [running], 3).create == []
    # A batch that failed on an element no longer in the list goes; its other elements are batched again.
    failed = mp.Batch("sq-bad", ("k1", "k2"), p.FAILED, ("b3:r1",), failed_key="k2")
    assert mp.plan({"k1": 1, "k2": 2}, {}, [failed], 3).failed == {"k1": "sq-bad", "k2": "sq-bad"}
    again = mp.plan({"k1": 1, "k5": 5}, {}, [failed], 3)
    assert again.delete == ["sq-bad"] and again.create == [([1, 5], ["k1", "k5"])] and not again.failed


def test_batch_view_reads_results_and_refuses_a_batch_that_ran_other_keys() -> None:
    par = parent([1, 2, 3])
    ks = ["b3:" + c * 64 for c in "abc"]
    m = mp.batch_manifest(par, [1, 2, 3], ks)
    assert mp.batch_view(m, "x") == mp.Batch(m["metadata"]["name"], tuple(ks), None)
    ok = mp.batch_view(settled(m), "x")
    assert ok.phase == p.SUCCEEDED and mp.batch_results(ok, "s3://b/p") == {
        k: mp.Known(d(k), "s3://b/p", cached=False) for k in ks}
    assert mp.batch_view(settled(m, key="b3:" + "0" * 64), "x").phase == p.FAILED
    assert mp.batch_view(settled(m, results=[d(ks[0])]), "x").phase == p.FAILED
    failed = mp.batch_view(settled(m, p.FAILED, results=[d(ks[0])], failed_element=1), "x")
    assert failed.failed_key == ks[1] and mp.batch_results(failed, "u") == {ks[0]: mp.Known(d(ks[0]), "u", False)}


def test_progress_counts_elements_and_names_the_element_that_failed() -> None:
    # Elements in order: k5 k6 k5 k7 k8 (equal elements count once each).
    keys = ["k5", "k6", "k5", "k7", "k8"]
    known = {"k5": mp.Known("b3:r5", "u", cached=True)}
    failing = mp.Batch("sq-b", ("k6", "k7"), p.FAILED, (), failed_key="k7")
    todo = mp.plan(dict.fromkeys(keys), known, [failing], 64)
    prog = mp.progress(keys, known, todo, 2)
    assert prog.counts() == {"total": 5, "distinct": 4, "succeeded": 2, "cached": 2, "computed": 0,
                             "running": 1, "failed": 2, "batches": 2}
    assert prog.first_failure == (3, "sq-b") and not prog.done
    known |= {k: mp.Known("b3:r", "u", cached=False) for k in ("k6", "k7", "k8")}
    done = mp.progress(keys, known, mp.plan(dict.fromkeys(keys), known, [], 64), 1)
    assert done.done and done.counts()["computed"] == 3 and done.first_failure is None


def test_elements_must_be_a_list_and_the_key_follows_the_elements_in_order() -> None:
    assert mp.elements_problem([1], "x") is None
    assert "not a list" in str(mp.elements_problem({"a": 1}, "x"))
    a, b = "b3:" + "1" * 64, "b3:" + "2" * 64
    assert mp.map_key("x", [a, b]) != mp.map_key("x", [b, a])
    assert mp.map_key("x", [a, b]) == mp.map_key("x", [a, b]).lower()
    assert mp.is_map(parent([1])) and not mp.is_map({"spec": {}})
