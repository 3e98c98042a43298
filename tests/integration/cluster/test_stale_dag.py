"""A DAG that never goes stale (issue 13, item 3): when an upstream ComputeJob is recomputed,
every job that used its result stops being Ready at once, and re-resolves when it settles;
an upstream that comes back with the same result runs nothing below it (early cutoff).
Real API server, MinIO, operator and agents, with examples/dag.yaml as a user applies it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from memoplane.api.conditions import get_condition, kstatus
from memoplane.cluster import protocol as p

pytestmark = pytest.mark.integration
Stack = Any  # conftest.Stack (fixture `stack`)

DAG = Path(__file__).resolve().parents[3] / "examples" / "dag.yaml"
NAMES = ["download", "normalize", "report"]


def dag() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(DAG.read_text()) if d]


def status(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("status") or {}


def ready(obj: dict[str, Any]) -> bool:
    """Ready=True for its current spec."""
    cond = get_condition(status(obj).get("conditions"), "Ready")
    return cond is not None and cond.get("status") == "True" and \
        status(obj).get("observedGeneration") == obj["metadata"]["generation"]


def reconciling(obj: dict[str, Any]) -> bool:
    cond = get_condition(status(obj).get("conditions"), "Reconciling")
    return cond is not None and cond.get("status") == "True"


def n_of(obj: dict[str, Any]) -> Any:
    return ((status(obj).get("result") or {}).get("value") or {}).get("n")


def ks(obj: dict[str, Any]) -> str:
    return kstatus(obj["metadata"].get("generation"), status(obj).get("observedGeneration"),
                   status(obj).get("conditions"))


def ready_with(pred: Callable[[dict[str, Any]], bool]) -> Callable[[dict[str, Any]], bool]:
    return lambda obj: ready(obj) and pred(obj)


@contextmanager
def recorded(stack: Stack, ns: str) -> Iterator[list[dict[str, Any]]]:
    """Every version of the namespace's ComputeJobs, in the order the API server wrote them
    (one watch stream), from now until the block ends."""
    seen: list[dict[str, Any]] = []
    _, version = stack.kube.list(p.COMPUTEJOBS, ns)
    stop = threading.Event()

    def run() -> None:
        rv = version
        while not stop.is_set():
            try:
                for _, obj in stack.kube.watch(p.COMPUTEJOBS, rv, timeout_s=2):
                    rv = obj["metadata"]["resourceVersion"]
                    if obj["metadata"]["namespace"] == ns:
                        seen.append(obj)
            except ApiException:
                continue

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(timeout=10)


def set_download(stack: Stack, ns: str, path: str, value: Any, name: str = "download") -> None:
    stack.kube.json_patch(p.COMPUTEJOBS, ns, name, [{"op": "replace", "path": path, "value": value}])


def applied(stack: Stack, ns: str) -> dict[str, dict[str, Any]]:
    stack.apply(ns, *dag())
    done = stack.wait_all(ns, NAMES)
    assert all(ready(o) for o in done.values()), {n: status(o) for n, o in done.items()}
    assert n_of(done["report"]) == 1000
    return done


def test_a_changed_upstream_never_leaves_a_stale_result_ready(stack: Stack, ns: str) -> None:
    applied(stack, ns)
    with recorded(stack, ns) as seen:
        set_download(stack, ns, "/spec/inputs/0/value", 10)
        final = stack.wait(ns, "report", ready_with(lambda o: n_of(o) == 10), timeout=120)
    assert final["metadata"]["generation"] == 1 and status(final)["phase"] == p.SUCCEEDED

    def of(name: str) -> list[tuple[int, dict[str, Any]]]:
        return [(i, o) for i, o in enumerate(seen) if o["metadata"]["name"] == name]

    # The patch itself is the first version of download at generation 2 in the stream. No
    # version of report written after it is Ready with the old rows. (The objects as they
    # stood at the instant of the patch still say Ready until the operator's first write;
    # no controller can close that instant. Here it is: report has no version in between.)
    patched = next(i for i, o in of("download") if o["metadata"]["generation"] == 2)
    stale = [status(o) for i, o in of("report") if i > patched and ready(o) and n_of(o) == 1000]
    assert stale == [], stale
    # kstatus: held (not Ready, Reconciling) before download's new result, the old result kept.
    recomputed = next(i for i, o in of("download") if o["metadata"]["generation"] == 2 and ready(o))
    for name in ("normalize", "report"):
        held = [(i, o) for i, o in of(name) if status(o).get("reason") == p.REASON_UPSTREAM_CHANGED]
        assert held, f"{name} was never held: {[status(o).get('reason') for _, o in of(name)]}"
        first, obj = held[0]
        assert first < recomputed and not ready(obj) and reconciling(obj) and ks(obj) == "InProgress"
        assert get_condition(status(obj)["conditions"], "Ready")["status"] == "False"   # type: ignore[index]
        assert status(obj).get("result"), "the previous result stays visible while held"
        # From the hold until its new result, every version of it is InProgress.
        settled = next(i for i, o in of(name) if i > first and ready(o))
        assert all(ks(o) == "InProgress" for i, o in of(name) if first <= i < settled)
    assert "upstream ComputeJob 'download' is being recomputed (generation 2)" in \
        next(status(o)["message"] for _, o in of("normalize") if status(o).get("reason") == p.REASON_UPSTREAM_CHANGED)
    # Which upstream changed: an Event on the recomputed job.
    said = stack.eventually_events(ns, "report", p.REASON_UPSTREAM_CHANGED)
    assert any("input 'rows' (upstream 'download') changed" in m for m in said), said
    assert n_of(stack.get(ns, "report")) == 10


def memoplane_cli(stack: Stack, tmp_path: Path, *args: str) -> Any:
    env = {**os.environ, **stack.cfg.env, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "memoplane.cli", *args, "--json"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_history_and_lineage_name_the_exact_versions_after_a_change(stack: Stack, ns: str, tmp_path: Path) -> None:
    before = applied(stack, ns)
    set_download(stack, ns, "/spec/inputs/0/value", 10)
    stack.wait(ns, "report", ready_with(lambda o: n_of(o) == 10), timeout=120)
    after = {name: stack.get(ns, name) for name in NAMES}
    runs = {name: (status(before[name])["runId"], status(after[name])["runId"]) for name in NAMES}
    assert all(old != new for old, new in runs.values()), runs
    # history lists both versions of download, newest first, with why the second changed.
    log = memoplane_cli(stack, tmp_path, "history", "download", "-n", ns, "--cluster")
    assert [e["run_id"] for e in log["entries"]] == [runs["download"][1], runs["download"][0]]
    assert log["entries"][0]["why"][0].startswith("inputs.count changed"), log["entries"][0]
    # lineage down from download's first result: the first normalize and report runs, never the new ones.
    first = status(before["download"])["result"]["digest"]
    down = memoplane_cli(stack, tmp_path, "lineage", "down", first, "-n", ns, "--cluster")
    reached = {node["run"]["run_id"] for node in down["nodes"]}
    assert {runs["normalize"][0], runs["report"][0]} <= reached, down
    assert not {runs["normalize"][1], runs["report"][1]} & reached, down
    # lineage up from report's new run: download's and normalize's new runs, exactly.
    up = memoplane_cli(stack, tmp_path, "lineage", "up", runs["report"][1], "-n", ns, "--cluster")
    assert {node["run"]["run_id"] for node in up["nodes"]} == \
        {runs["report"][1], runs["normalize"][1], runs["download"][1]}, up


def test_a_same_result_upstream_runs_nothing_below_it(stack: Stack, ns: str) -> None:
    before = applied(stack, ns)
    runs = stack.total_runs()
    source = before["download"]["spec"]["python"]["source"]
    set_download(stack, ns, "/spec/python/source", "# a comment only: same rows\n" + source)
    download = stack.wait(ns, "download", ready_with(lambda o: o["metadata"]["generation"] == 2))
    assert status(download)["cached"] is False
    assert status(download)["cacheKey"] != status(before["download"])["cacheKey"]
    # The same rows (status.result.digest names the result manifest, whose provenance differs).
    assert status(download)["result"]["value"] == status(before["download"])["result"]["value"]
    for name in ("normalize", "report"):
        obj = stack.wait(ns, name, ready_with(lambda o: status(o).get("reason") == p.REASON_EARLY_CUTOFF))
        assert status(obj)["cacheKey"] == status(before[name])["cacheKey"]
        assert status(obj)["result"] == status(before[name])["result"]
        rows = status(obj)["inputDigests"]["rows"]
        assert f"input 'rows': upstream 'download' recomputed to the same value {rows[:15]}" in status(obj)["message"]
        assert "nothing re-ran" in status(obj)["message"]
        assert stack.eventually_events(ns, name, p.REASON_EARLY_CUTOFF)
        # The cut-off is a run of its own (served, not computed), standing on download's new run.
        assert status(obj)["runId"] != status(before[name])["runId"]
        rows_from = {u["input"]: u for u in status(obj)["upstreams"]}["rows"]
        assert rows_from["runId"] == status(download)["runId"]
    assert stack.total_runs() == runs + 1, "only download ran in a sandbox"


def test_a_restarted_operator_holds_and_releases_from_what_the_api_server_says(stack: Stack, ns: str) -> None:
    applied(stack, ns)
    stack.kill_operator()
    try:
        set_download(stack, ns, "/spec/inputs/0/value", 10)
    finally:
        stack.start_operator()
    with recorded(stack, ns) as seen:
        final = stack.wait(ns, "report", ready_with(lambda o: n_of(o) == 10), timeout=120)
    assert status(final)["phase"] == p.SUCCEEDED
    assert not [o for o in seen if o["metadata"]["name"] == "report" and ready(o) and n_of(o) == 1000]


def test_an_upstream_recomputed_while_its_downstream_ran_is_caught_when_it_settles(stack: Stack, ns: str) -> None:
    # `slow` resolves with the 1000 rows and is still running when `rows` is patched and
    # recomputed: it settles with a result of the old rows, is held at once, and recomputes.
    rows = {"apiVersion": p.API_VERSION, "kind": "ComputeJob", "metadata": {"name": "rows"},
            "spec": {"python": {"source": "def main(count):\n    return list(range(count))\n"},
                     "inputs": [{"name": "count", "value": 1000}]}}
    slow = {"apiVersion": p.API_VERSION, "kind": "ComputeJob", "metadata": {"name": "slow"},
            "spec": {"python": {"source": "import time\n\ndef main(rows):\n    time.sleep(8)\n    return len(rows)\n"},
                     "inputs": [{"name": "rows", "fromJob": {"name": "rows"}}]}}
    stack.apply(ns, rows, slow)
    stack.wait(ns, "slow", lambda o: status(o).get("phase") == p.RUNNING)
    set_download(stack, ns, "/spec/inputs/0/value", 10, name="rows")
    stack.wait(ns, "rows", ready_with(lambda o: o["metadata"]["generation"] == 2))
    assert not ready(stack.get(ns, "slow")), "the scenario needs slow still running when rows is recomputed"
    final = stack.wait(ns, "slow", ready_with(lambda o: status(o)["result"]["value"] == 10), timeout=120)
    assert status(final)["cached"] is False
    said = stack.eventually_events(ns, "slow", p.REASON_UPSTREAM_CHANGED)
    assert any("since it was resolved" in m for m in said), said



def test_a_map_over_a_recomputed_upstream_is_held_and_so_is_what_uses_it(stack: Stack, ns: str) -> None:
    def cjob(name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": p.API_VERSION, "kind": "ComputeJob", "metadata": {"name": name}, "spec": spec}

    numbers = cjob("numbers", {"python": {"source": "def main(n):\n    return list(range(n))\n"},
                               "inputs": [{"name": "n", "value": 3}]})
    times = cjob("times", {"python": {"source": "def main(x):\n    return x * 10\n"}, "map": {"over": "x"},
                           "inputs": [{"name": "x", "fromJob": {"name": "numbers"}}]})
    total = cjob("total", {"python": {"source": "def main(xs):\n    return sum(xs)\n"},
                           "inputs": [{"name": "xs", "fromJob": {"name": "times"}}]})
    stack.apply(ns, numbers, times, total)
    assert status(stack.wait_all(ns, ["numbers", "times", "total"])["total"])["result"]["value"] == 30
    runs = stack.total_runs()
    with recorded(stack, ns) as seen:
        set_download(stack, ns, "/spec/inputs/0/value", 4, name="numbers")
        final = stack.wait(ns, "total", ready_with(lambda o: status(o)["result"]["value"] == 60), timeout=120)
    assert status(stack.get(ns, "times"))["result"]["value"] == [0, 10, 20, 30]
    assert status(final)["cached"] is False
    patched = next(i for i, o in enumerate(seen) if o["metadata"]["name"] == "numbers"
                   and o["metadata"]["generation"] == 2)
    for name, old in (("times", [0, 10, 20]), ("total", 30)):
        after = [o for o in seen[patched:] if o["metadata"]["name"] == name]
        assert not [o for o in after if ready(o) and status(o)["result"]["value"] == old], name
        assert any(status(o).get("reason") == p.REASON_UPSTREAM_CHANGED and ks(o) == "InProgress" for o in after)
    assert stack.total_runs() - runs == 3   # numbers, the one new element, total


def test_a_downstream_in_another_namespace_is_held_and_recomputed(stack: Stack, ns: str) -> None:
    reader = f"{ns}-b"   # starts with the session's prefix: the operator watches it too
    stack.kube.ensure_namespace(reader)
    try:
        cache = {"apiVersion": p.API_VERSION, "kind": "ResultCache",
                 "metadata": {"name": p.DEFAULT_RESULT_CACHE, "namespace": ns},
                 "spec": {"store": {"bucket": p.DEFAULT_BUCKET, "prefix": p.default_store_prefix(ns)},
                          "sharing": {"readers": {"namespaces": [reader]}}}}
        assert stack.kube.create(p.RESULTCACHES, ns, cache) is not None
        download = dag()[0]
        report = {"apiVersion": p.API_VERSION, "kind": "ComputeJob", "metadata": {"name": "count"},
                  "spec": {"python": {"source": "def main(rows):\n    return {'n': len(rows)}\n"},
                           "inputs": [{"name": "rows", "fromJob": {"name": "download", "namespace": ns}}]}}
        stack.apply(ns, download)
        stack.apply(reader, report)
        assert n_of(stack.wait(reader, "count", ready_with(lambda o: True))) == 1000
        with recorded(stack, reader) as seen:
            set_download(stack, ns, "/spec/inputs/0/value", 10)
            stack.wait(reader, "count", ready_with(lambda o: n_of(o) == 10), timeout=120)
        held = [o for o in seen if status(o).get("reason") == p.REASON_UPSTREAM_CHANGED]
        assert held and f"upstream ComputeJob '{ns}/download' is being recomputed" in status(held[0])["message"]
        assert not [o for o in seen if ready(o) and n_of(o) == 1000]
    finally:
        stack.kube.core.delete_namespace(reader)


def test_an_upstream_deleted_while_recomputed_leaves_its_downstream_as_it_was(stack: Stack, ns: str) -> None:
    before = applied(stack, ns)
    source = before["download"]["spec"]["python"]["source"]
    runs = stack.total_runs()
    set_download(stack, ns, "/spec/python/source", "import time\ntime.sleep(10)\n" + source)
    stack.wait(ns, "report", lambda o: status(o).get("reason") == p.REASON_UPSTREAM_CHANGED)
    stack.wait(ns, "download", lambda o: status(o).get("phase") == p.RUNNING)
    assert stack.kube.delete(p.COMPUTEJOBS, ns, "download")
    # Results outlive jobs: once the missing upstream's grace (60s after creation) is over,
    # each held job is Ready again with the result it had.
    for name in ("normalize", "report"):
        obj = stack.wait(ns, name, ready_with(lambda o: status(o).get("reason") == p.REASON_UPSTREAM_GONE),
                         timeout=150)
        assert status(obj)["result"] == status(before[name])["result"]
        assert "ComputeJob 'download' does not exist" in status(obj)["message"]
    # The deleted job's sandbox ran to its end: no run of ours is left to move another test's counters.
    deadline = time.monotonic() + 60
    while stack.total_runs() < runs + 1:
        assert time.monotonic() < deadline, "download's last run never ended"
        time.sleep(0.5)
