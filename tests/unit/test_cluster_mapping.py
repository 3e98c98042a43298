"""spec.map decisions: children per distinct element, their specs, the plan, progress, the key."""

from __future__ import annotations

from typing import Any

from memoplane.cluster import mapping as mp
from memoplane.cluster import protocol as p


def parent(values: Any, source: str = "def main(x, k):\n    return x\n", name: str = "sq") -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": name, "uid": "u-1", "generation": 1},
            "spec": {"python": {"source": source, "entrypoint": "main"}, "map": {"over": "x"},
                     "inputs": [{"name": "x", "value": values}, {"name": "k", "value": 3}],
                     "cache": {"version": "s"}}}


def settled_child(manifest: dict[str, Any], phase: str = p.SUCCEEDED, cached: bool = False) -> dict[str, Any]:
    return {**manifest, "metadata": {**manifest["metadata"], "generation": 1},
            "status": {"phase": phase, "observedGeneration": 1, "cached": cached}}


def test_a_child_is_the_parent_with_the_element_as_the_input() -> None:
    m = mp.child_manifest(parent([1, 2]), 2)
    assert m["spec"]["inputs"] == [{"name": "x", "value": 2}, {"name": "k", "value": 3}]
    assert "map" not in m["spec"] and m["spec"]["cache"] == {"version": "s"}
    assert m["metadata"]["labels"] == {mp.PARENT_LABEL: "u-1"}
    assert m["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    # The name follows the element, not its position, and fits a Kubernetes name.
    assert m["metadata"]["name"] == mp.child_name("sq", 2) == mp.child_manifest(parent([2, 7]), 2)["metadata"]["name"]
    assert mp.child_name("sq", 2) != mp.child_name("sq", "2")
    assert len(mp.child_name("a" * 300, 1)) <= mp.NAME_MAX


def test_plan_creates_new_elements_only_rewrites_changed_specs_and_deletes_removed_ones() -> None:
    old = parent([1, 2, 3])
    have = {c["metadata"]["name"]: settled_child(c) for c in (mp.child_manifest(old, e) for e in (1, 2, 3))}
    plan = mp.plan(parent([1, 2, 3, 4, 4]), [1, 2, 3, 4, 4], have)
    assert [m["metadata"]["name"] for m in plan.create] == [mp.child_name("sq", 4)]
    assert plan.update == [] and plan.delete == [] and plan.taken == []
    changed = parent([1, 3], source="def main(x, k):\n    return -x\n")
    plan = mp.plan(changed, [1, 3], have)
    assert sorted(m["metadata"]["name"] for m in plan.update) == sorted([mp.child_name("sq", 1), mp.child_name("sq", 3)])
    assert plan.delete == [mp.child_name("sq", 2)]
    other = {"metadata": {"name": mp.child_name("sq", 9), "labels": {}}}
    assert mp.plan(parent([9]), [9], {}, {other["metadata"]["name"]: other}).taken == [mp.child_name("sq", 9)]


def test_progress_counts_elements_and_names_the_first_failure() -> None:
    par = parent([5, 6, 5, 7])
    kids = {mp.child_name("sq", 5): settled_child(mp.child_manifest(par, 5), cached=True),
            mp.child_name("sq", 6): settled_child(mp.child_manifest(par, 6), phase=p.FAILED)}
    prog = mp.progress(par, [5, 6, 5, 7], kids)
    assert prog.counts() == {"total": 4, "succeeded": 2, "cached": 2, "failed": 1}
    assert prog.first_failure == (1, mp.child_name("sq", 6)) and prog.waiting_on == [mp.child_name("sq", 7)]
    assert not prog.done
    # A child whose spec the parent has not rewritten yet does not count.
    stale = {mp.child_name("sq", 5): settled_child(mp.child_manifest(parent([5], source="x"), 5))}
    assert mp.progress(par, [5], stale).succeeded == 0


def test_elements_must_be_a_list_and_the_key_follows_the_children_in_order() -> None:
    assert mp.elements_problem([1], "x") is None
    assert "not a list" in str(mp.elements_problem({"a": 1}, "x"))
    a, b = "b3:" + "1" * 64, "b3:" + "2" * 64
    assert mp.map_key("x", [a, b]) != mp.map_key("x", [b, a])
    assert mp.map_key("x", [a, b]) == mp.map_key("x", [a, b]).lower()
    assert mp.is_map(parent([1])) and not mp.is_map({"spec": {}})
