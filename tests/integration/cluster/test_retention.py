"""Retention on the cluster: a ResultCache's spec.retention evicts by last use (an entry written
long ago but hit recently stays, an unused one goes), by size (least recently used first), and
never a root (a live job's result, a GMemSeed's overlay); its status and an Event show what went.
Real API server, MinIO, operator and agents; the stack runs retention passes every second with
a 2 s grace period (conftest)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from memoplane.api.specs import computejob_manifest
from memoplane.cas.digests import object_name
from memoplane.cluster import protocol as p
from memoplane.cluster.decide import default_cache

pytestmark = pytest.mark.integration
Stack = Any  # conftest.Stack (fixture `stack`)

ADD = 'def main(a):\n    return {"a": a, "pad": "x" * 200}\n'
MAX_AGE = 12  # seconds; the test waits this long once
GRACE = 2     # MEMOPLANE_RETENTION_GRACE_SECONDS and MEMOPLANE_GC_GRACE_SECONDS of the stack


def job(name: str, a: int) -> dict[str, Any]:
    return computejob_manifest(name, None, {"python": {"source": ADD, "entrypoint": "main"},
                                            "inputs": [{"name": "a", "value": a}]})


def make_cache(stack: Stack, ns: str) -> None:
    assert stack.kube.create(p.RESULTCACHES, ns, default_cache(ns)) is not None


def set_retention(stack: Stack, ns: str, retention: dict[str, Any]) -> None:
    stack.kube.custom.patch_namespaced_custom_object(p.GROUP, p.VERSION, ns, p.RESULTCACHES, p.DEFAULT_RESULT_CACHE,
                                                     {"spec": {"retention": retention}})


def wait_cache(stack: Stack, ns: str, until: Callable[[dict[str, Any]], bool], timeout: float = 90.0
               ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        rc = stack.kube.get(p.RESULTCACHES, ns, p.DEFAULT_RESULT_CACHE) or {}
        status = rc.get("status") or {}
        if until(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"ResultCache {ns}/default: {status}\n{stack.logs()}")
        time.sleep(0.25)


def run(stack: Stack, ns: str, jobs: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Run `jobs` (name -> input) to the end; their statuses."""
    stack.apply(ns, *(job(name, a) for name, a in jobs.items()))
    done = {name: obj["status"] for name, obj in stack.wait_all(ns, list(jobs)).items()}
    assert all(s["phase"] == p.SUCCEEDED for s in done.values()), done
    return done


def delete_jobs(stack: Stack, ns: str, names: list[str]) -> None:
    for name in names:
        stack.kube.delete(p.COMPUTEJOBS, ns, name)
    deadline = time.monotonic() + 60
    while any(stack.kube.get(p.COMPUTEJOBS, ns, n) is not None for n in names):
        assert time.monotonic() < deadline, f"jobs {names} not deleted"
        time.sleep(0.25)


def evictions(stack: Stack, ns: str) -> list[str]:
    events = stack.kube.core.list_namespaced_event(ns).items
    return [e.message for e in events if e.reason == p.REASON_EVICTED and e.involved_object.kind == "ResultCache"]


def test_max_age_evicts_by_last_use_and_never_a_live_jobs_result(stack: Stack, ns: str) -> None:
    make_cache(stack, ns)
    done = run(stack, ns, {"hit-later": 1, "unused": 2, "kept-job": 3})
    keys = {name: s["cacheKey"] for name, s in done.items()}
    wait_cache(stack, ns, lambda s: s.get("entries") == 3)  # the writes are in the usage index
    time.sleep(MAX_AGE + 1)  # every entry was written more than maxAge ago
    hit = run(stack, ns, {"hit-now": 1})["hit-now"]
    assert hit["cached"] is True and hit["cacheKey"] == keys["hit-later"]
    delete_jobs(stack, ns, ["hit-later", "hit-now", "unused"])  # "kept-job" stays: its result is a root

    set_retention(stack, ns, {"maxAge": f"{MAX_AGE}s"})
    status = wait_cache(stack, ns, lambda s: (s.get("evictedEntries") or 0) >= 1)
    store = stack.store(ns)
    assert store.read_ref(keys["unused"]) is None
    assert store.read_ref(keys["hit-later"]) is not None, "written long ago but hit recently: kept"
    assert store.read_ref(keys["kept-job"]) is not None, "a live job's result is never evicted"
    assert status["evictedEntries"] == 1 and status["entries"] == 2 and status.get("lastEvictionTime")
    deadline = time.monotonic() + 30
    while not evictions(stack, ns):
        assert time.monotonic() < deadline, "no Evicted event on the ResultCache"
        time.sleep(0.25)
    assert "evicted 1 entries" in evictions(stack, ns)[0]


def test_max_bytes_evicts_least_recently_used_first(stack: Stack, ns: str) -> None:
    make_cache(stack, ns)
    done = run(stack, ns, {"c": 10, "d": 11, "e": 12})
    run(stack, ns, {"c-again": 10, "e-again": 12})  # c and e used after d: d is least recently used
    delete_jobs(stack, ns, ["c", "d", "e", "c-again", "e-again"])
    before = wait_cache(stack, ns, lambda s: s.get("entries") == 3 and (s.get("logicalBytes") or 0) > 0)
    assert before["logicalBytes"] == sum(s["result"]["size"] for s in done.values())
    time.sleep(GRACE + 1)  # out of the grace period

    set_retention(stack, ns, {"maxBytes": before["logicalBytes"] - 1})
    after = wait_cache(stack, ns, lambda s: (s.get("evictedEntries") or 0) >= 1)
    store = stack.store(ns)
    kept = [name for name in ("c", "d", "e") if store.read_ref(done[name]["cacheKey"]) is not None]
    assert kept == ["c", "e"]
    assert after["entries"] == 2 and after["logicalBytes"] == before["logicalBytes"] - done["d"]["result"]["size"]


def test_the_sweep_keeps_a_gmemseed_overlay(stack: Stack, ns: str) -> None:
    make_cache(stack, ns)
    seed = {"apiVersion": p.API_VERSION, "kind": "GMemSeed", "metadata": {"name": "field", "namespace": ns},
            "spec": {"seed": 1337, "dtype": "float64"}}
    assert stack.kube.create(p.GMEMSEEDS, ns, seed) is not None
    written = subprocess.run([sys.executable, "-m", "memoplane.cli", "gmem", "write", "field", "-n", ns, "10=0.5"],
                             capture_output=True, text=True, env={**os.environ, **stack.cfg.env}, timeout=300)
    assert written.returncode == 0, written.stderr
    deadline = time.monotonic() + 60
    while not ((stack.kube.get(p.GMEMSEEDS, ns, "field") or {}).get("status") or {}).get("overlayBlob"):
        assert time.monotonic() < deadline, "the seed's overlay blob never showed in its status"
        time.sleep(0.25)
    overlay = stack.kube.get(p.GMEMSEEDS, ns, "field")["status"]["overlayBlob"]["digest"]
    store = stack.store(ns)
    litter = store.put_bytes(b"nothing names this " * 100)   # what the sweep must delete
    time.sleep(GRACE + 1)  # both are older than the sweep's grace period

    set_retention(stack, ns, {"maxAge": "720h"})  # a cache with retention is swept
    deadline = time.monotonic() + 60
    while store.backend.exists(object_name("blobs", litter.digest)):
        assert time.monotonic() < deadline, f"the sweep never ran\n{stack.logs()}"
        time.sleep(0.25)
    assert store.get_bytes(overlay), "the overlay of a GMemSeed is a root"
