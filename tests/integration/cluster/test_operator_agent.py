"""ComputeJobs end to end on the local control plane: operator and two agents as processes,
results in MinIO. Outcomes are asserted, never timings."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from memoplane.api.conditions import get_condition, kstatus
from memoplane.api.specs import computejob_manifest
from memoplane.cas.digests import object_name
from memoplane.cluster import protocol as p

pytestmark = pytest.mark.integration
Stack = Any  # conftest.Stack (fixture `stack`)
NODES = ("node-a", "node-b")

FEATURIZE = 'def main(rows, scale):\n    return {"total": sum(rows) * scale}\n'


def job(name: str, source: str, inputs: dict[str, Any] | None = None, *, salt: str | None = None,
        **spec: Any) -> dict[str, Any]:
    """A ComputeJob manifest (validated as the CLI does). `salt` goes to cache.version, so a
    test's keys are its own even though the store outlives the namespace's jobs."""
    body: dict[str, Any] = {"python": {"source": source, "entrypoint": "main"},
                            "inputs": [{"name": k, "value": v} for k, v in (inputs or {}).items()], **spec}
    body.setdefault("cache", {})["version"] = salt if salt is not None else uuid.uuid4().hex[:12]
    return computejob_manifest(name, None, body)


def status(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("status") or {}


def test_job_succeeds_with_the_right_value(stack: Stack, ns: str) -> None:
    stack.apply(ns, job("featurize", FEATURIZE, {"rows": [1, 2, 3], "scale": 10}))
    obj = stack.wait(ns, "featurize")
    s = status(obj)
    assert s["phase"] == "Succeeded", s
    assert s["result"]["value"] == {"total": 60}
    assert s["cached"] is False and s["node"] in NODES and s["attempts"] == 1
    assert s["cacheKey"].startswith("b3:") and obj["metadata"]["labels"][p.KEY_LABEL] == p.key_label(s["cacheKey"])
    assert kstatus(obj["metadata"]["generation"], s["observedGeneration"], s["conditions"]) == "Current"
    # The result is in the namespace's store, verified, with provenance naming the node.
    result = stack.store(ns).get_result(s["result"]["digest"])
    assert result.provenance.node == s["node"] and result.key == s["cacheKey"]
    # The default ResultCache was created on first use and reports the entry.
    rc = stack.kube.get(p.RESULTCACHES, ns, "default")
    assert rc is not None and rc["spec"]["store"] == {"bucket": "memoplane", "prefix": f"{ns}/"}
    rc_status: dict[str, Any] = {}
    for _ in range(80):
        rc_status = status(stack.kube.get(p.RESULTCACHES, ns, "default") or {})
        if (rc_status.get("entries") or 0) >= 1 and (rc_status.get("misses") or 0) >= 1:
            break
        time.sleep(0.25)
    assert rc_status.get("entries", 0) >= 1 and rc_status.get("misses", 0) >= 1, rc_status
    assert get_condition(rc_status.get("conditions"), "Ready")["status"] == "True"


def test_identical_job_under_another_name_is_a_cache_hit_with_no_agent_run(stack: Stack, ns: str) -> None:
    salt = uuid.uuid4().hex[:12]
    stack.apply(ns, job("first", FEATURIZE, {"rows": [4, 5], "scale": 2}, salt=salt))
    first = status(stack.wait(ns, "first"))
    assert first["phase"] == "Succeeded" and first["cached"] is False
    runs = stack.total_runs()
    stack.apply(ns, job("second", FEATURIZE, {"rows": [4, 5], "scale": 2}, salt=salt))
    second = status(stack.wait(ns, "second"))
    assert second["phase"] == "Succeeded" and second["cached"] is True
    assert second["result"] == first["result"] and second["result"]["value"] == {"total": 18}
    assert second["cacheKey"] == first["cacheKey"] and "node" not in second
    assert second["computeSecondsSaved"] >= 0
    assert get_condition(second["conditions"], "Ready")["reason"] == "CacheHit"
    assert stack.total_runs() == runs


def test_three_job_dag(stack: Stack, ns: str) -> None:
    salt = uuid.uuid4().hex[:12]
    download = job("download", "def main(n):\n    return list(range(n))\n", {"n": 5}, salt=salt)
    square = computejob_manifest("square", None, {
        "python": {"source": "def main(raw):\n    return [x * x for x in raw]\n"},
        "inputs": [{"name": "raw", "fromJob": {"name": "download"}}], "cache": {"version": salt}})
    total = computejob_manifest("total", None, {
        "python": {"source": "def main(squares, raw):\n    return {'sum': sum(squares), 'n': len(raw)}\n"},
        "inputs": [{"name": "squares", "fromJob": {"name": "square"}}, {"name": "raw", "fromJob": {"name": "download"}}],
        "cache": {"version": salt}})
    stack.apply(ns, total, square, download)  # downstream first: they wait for their inputs
    done = stack.wait_all(ns, ["download", "square", "total"])
    assert [status(done[n])["phase"] for n in ("download", "square", "total")] == ["Succeeded"] * 3
    assert status(done["square"])["result"]["value"] == [0, 1, 4, 9, 16]
    assert status(done["total"])["result"]["value"] == {"sum": 30, "n": 5}
    # An input is the upstream's content, not its name.
    assert status(done["square"])["inputDigests"]["raw"] == status(done["total"])["inputDigests"]["raw"]


def test_twenty_identical_jobs_applied_at_once_compute_exactly_once(stack: Stack, ns: str) -> None:
    salt = uuid.uuid4().hex[:12]
    source = "import time\n\ndef main(x):\n    time.sleep(1)\n    return {'x': x, 'r': x * 7}\n"
    names = [f"same-{i:02d}" for i in range(20)]
    runs = stack.total_runs()
    stack.apply(ns, *[job(n, source, {"x": 6}, salt=salt) for n in names])
    done = stack.wait_all(ns, names)
    statuses = [status(o) for o in done.values()]
    assert all(s["phase"] == "Succeeded" for s in statuses), [s.get("phase") for s in statuses]
    assert len({s["cacheKey"] for s in statuses}) == 1
    assert len({s["result"]["digest"] for s in statuses}) == 1
    assert sorted(s["cached"] for s in statuses) == [False] + [True] * 19
    result = stack.store(ns).get_result(statuses[0]["result"]["digest"])
    computed = next(s for s in statuses if not s["cached"])
    assert result.provenance.node == computed["node"]
    assert stack.total_runs() - runs == 1


def test_agent_killed_mid_job_completes_on_the_other_node(stack: Stack, ns: str) -> None:
    source = "import time\n\ndef main(x):\n    time.sleep(4)\n    return x + 1\n"
    stack.apply(ns, job("slow", source, {"x": 41}, backoffLimit=2))
    running = stack.wait(ns, "slow", lambda o: status(o).get("phase") == "Running", timeout=60)
    first_node = status(running)["node"]
    stack.kill_agent(first_node)
    obj = stack.wait(ns, "slow", timeout=120)
    s = status(obj)
    assert s["phase"] == "Succeeded", s
    assert s["result"]["value"] == 42
    assert s["node"] != first_node and s["node"] in NODES
    assert s["attempts"] == 2
    assert stack.store(ns).get_result(s["result"]["digest"]).provenance.node == s["node"]


def test_agent_restarted_mid_job_reruns_it(stack: Stack, ns: str) -> None:
    source = "import time\n\ndef main(x):\n    time.sleep(3)\n    return x * 2\n"
    stack.apply(ns, job("rerun", source, {"x": 21}))
    running = stack.wait(ns, "rerun", lambda o: status(o).get("phase") == "Running", timeout=60)
    node = status(running)["node"]
    stack.kill_agent(node)
    stack.ensure()  # back before its lease expires: it re-runs its own job
    s = status(stack.wait(ns, "rerun", timeout=120))
    assert s["phase"] == "Succeeded" and s["result"]["value"] == 42
    assert s["node"] == node and s["attempts"] == 1


def test_operator_restarted_with_50_jobs_in_flight_all_complete_none_twice(stack: Stack, ns: str) -> None:
    salt = uuid.uuid4().hex[:12]
    source = "import time\n\ndef main(i):\n    time.sleep(0.3)\n    return i * i\n"
    names = [f"batch-{i:02d}" for i in range(50)]
    runs = stack.total_runs()
    stack.apply(ns, *[job(n, source, {"i": i}, salt=salt) for i, n in enumerate(names)])

    def some_running(_: dict[str, Any]) -> bool:
        items, _rv = stack.kube.list(p.COMPUTEJOBS, ns)
        return sum(status(o).get("phase") in ("Running", "Succeeded") for o in items) >= 3
    stack.wait(ns, names[0], some_running, timeout=60)
    stack.kill_operator()
    time.sleep(1)
    stack.start_operator()
    done = stack.wait_all(ns, names, timeout=300)
    values = {n: status(o).get("result", {}).get("value") for n, o in done.items()}
    assert values == {n: i * i for i, n in enumerate(names)}
    assert all(status(o)["cached"] is False for o in done.values())
    assert stack.total_runs() - runs == 50


def test_corrupted_chunk_is_detected_recomputed_and_never_served(stack: Stack, ns: str) -> None:
    salt = uuid.uuid4().hex[:12]
    source = "def main(n):\n    return [i * 3 for i in range(n)]\n"   # ~200 KB: chunks in a pack, not inline
    stack.apply(ns, job("big", source, {"n": 30000}, salt=salt))
    first = status(stack.wait(ns, "big"))
    assert first["phase"] == "Succeeded" and "value" not in first["result"]
    store = stack.store(ns)
    value = store.get_result(first["result"]["digest"]).value
    assert value.blob is not None
    chunk = store.blob_manifest(value.blob.digest).chunks[0][0]
    store.chunks.refresh()
    loc = store.chunks.index.locations(chunk)[0]
    pack = bytearray(store.backend.get(object_name("packs", loc.pack)))
    garbage = b"\x28\xb5\x2f\xfd garbage"  # a zstd frame's magic, then nonsense
    pack[loc.offset:loc.offset + len(garbage)] = garbage
    store.backend.put(object_name("packs", loc.pack), bytes(pack))
    runs = stack.total_runs()
    stack.apply(ns, job("big-again", source, {"n": 30000}, salt=salt))
    again = status(stack.wait(ns, "big-again"))
    assert again["phase"] == "Succeeded", again
    assert again["cached"] is False  # the damaged entry was not served
    assert stack.total_runs() - runs == 1
    assert any(o.name.startswith("quarantine/") for o in store.backend.list("quarantine/"))
    fresh = stack.stores.get(p.DEFAULT_BUCKET, f"{ns}/")
    result = fresh.get_result(again["result"]["digest"])
    assert fresh.load_value(result.value) == [i * 3 for i in range(30000)]


def test_code_that_raises_fails_with_the_exception_in_status(stack: Stack, ns: str) -> None:
    source = "def main(x):\n    return x / 0\n"
    stack.apply(ns, job("broken", source, {"x": 1}, backoffLimit=1))
    obj = stack.wait(ns, "broken")
    s = status(obj)
    assert s["phase"] == "Failed" and s["attempts"] == 2
    assert s["failure"]["reason"] == "exception"
    assert "ZeroDivisionError" in s["failure"]["message"] + s["failure"].get("stderrTail", "")
    assert kstatus(obj["metadata"]["generation"], s["observedGeneration"], s["conditions"]) == "Failed"
    assert get_condition(s["conditions"], "Stalled")["status"] == "True"
    # A job that takes its result fails clearly too.
    stack.apply(ns, computejob_manifest("downstream", None, {
        "python": {"source": "def main(x):\n    return x\n"}, "inputs": [{"name": "x", "fromJob": {"name": "broken"}}]}))
    down = status(stack.wait(ns, "downstream"))
    assert down["phase"] == "Failed" and down["reason"] == p.REASON_UPSTREAM_FAILED
    assert "ComputeJob 'broken' failed" in down["message"]


def test_spec_change_refresh_and_bypass(stack: Stack, ns: str) -> None:
    salt = uuid.uuid4().hex[:12]
    stack.apply(ns, job("j", FEATURIZE, {"rows": [1], "scale": 3}, salt=salt))
    one = stack.wait(ns, "j")
    assert status(one)["result"]["value"] == {"total": 3}
    # A spec change: a new generation, a new key, a new result.
    patched = job("j", FEATURIZE, {"rows": [1, 1], "scale": 3}, salt=salt)
    stack.kube.custom.patch_namespaced_custom_object(p.GROUP, p.VERSION, ns, p.COMPUTEJOBS, "j",
                                                     {"spec": {"inputs": patched["spec"]["inputs"]}})
    two = stack.wait(ns, "j", lambda o: o["metadata"]["generation"] == 2 and status(o).get("phase") in p.TERMINAL
                     and status(o).get("observedGeneration") == 2)
    assert status(two)["result"]["value"] == {"total": 6}
    assert status(two)["cacheKey"] != status(one)["cacheKey"]
    key = status(two)["cacheKey"]
    store = stack.store(ns)
    before = store.read_ref(key)
    # Refresh recomputes and replaces the ref.
    stack.apply(ns, job("refresh", FEATURIZE, {"rows": [1, 1], "scale": 3}, salt=salt,
                        cache={"policy": "Refresh", "version": salt}))
    refreshed = status(stack.wait(ns, "refresh"))
    assert refreshed["cached"] is False and refreshed["cacheKey"] == key
    assert store.read_ref(key) == refreshed["result"]["digest"] != before
    # Bypass computes without reading or writing the cache.
    stack.apply(ns, job("bypass", FEATURIZE, {"rows": [1, 1], "scale": 3}, salt=salt,
                        cache={"policy": "Bypass", "version": salt}))
    bypassed = status(stack.wait(ns, "bypass"))
    assert bypassed["cached"] is False and bypassed["result"]["value"] == {"total": 6}
    assert store.read_ref(key) == refreshed["result"]["digest"]
    # Deleting jobs never deletes results others use.
    stack.kube.custom.delete_namespaced_custom_object(p.GROUP, p.VERSION, ns, p.COMPUTEJOBS, "refresh")
    stack.apply(ns, job("after-delete", FEATURIZE, {"rows": [1, 1], "scale": 3}, salt=salt))
    assert status(stack.wait(ns, "after-delete"))["result"]["digest"] == refreshed["result"]["digest"]


EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


@pytest.mark.parametrize(("example", "final", "check"), [
    ("job.yaml", "featurize", lambda s: s["result"]["value"] == {"total": 60}),
    ("dag.yaml", "report", lambda s: s["result"]["value"]["n"] == 1000),
    ("command-job.yaml", "word-count", lambda s: s["result"]["size"] > 0),
])
def test_examples_apply_and_succeed(stack: Stack, ns: str, kubectl: Any, example: str, final: str,
                                    check: Any) -> None:
    kubectl("apply", "-n", ns, "-f", str(EXAMPLES / example))
    kubectl("wait", "-n", ns, "--for=condition=Ready", f"cjob/{final}", "--timeout=120s")
    s = status(stack.get(ns, final))
    assert s["phase"] == "Succeeded" and check(s), s
    if example == "command-job.yaml":  # the command's output file is in the result's tree
        store = stack.store(ns)
        result = store.get_result(s["result"]["digest"])
        assert result.output_tree is not None
        entry = store.get_tree(result.output_tree.digest).entries["count"]
        assert store.get_bytes(str(entry.digest)).strip() == b"5"
        assert store.get_bytes(result.stdout.digest).strip() == b"5"
