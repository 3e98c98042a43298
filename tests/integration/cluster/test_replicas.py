"""spec.verify.replicas end to end: a stack of its own (operator, two honest agents and a
lying one, each signing with its own key) on the real API server and MinIO. Outcomes are
asserted, never timings.

- 200 jobs with replicas: 2 while one agent lies on 20% of its jobs: no wrong result is ever
  accepted, every dispute names the liar's node, and no job without a lie is disputed.
- A job returning time.time_ns() with replicas: 2 is Disputed, with a readable difference.
- An agreed result is a hit for the next 2-replica job; 3 replicas on 3 nodes need a third.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lying_agent import LIAR, lies, with_a_liar  # this directory is on the path, as for conftest

from memoplane.api.conditions import kstatus
from memoplane.api.specs import computejob_manifest
from memoplane.cluster import replicas as rp
from memoplane.testing import cluster, processes
from memoplane.trust import TrustPolicy

pytestmark = pytest.mark.integration

Stack = Any  # conftest.Stack (fixture `stack`)
PREFIX = f"mpr-{uuid.uuid4().hex[:6]}-"
SEED = "replicas-1"
JOBS = int(os.environ.get("MEMOPLANE_REPLICA_JOBS", "200"))
SQUARE = "def main(n):\n    return n * n\n"


@pytest.fixture(scope="module")
def rstack(stack: Stack, control_plane: cluster.ClusterInfo, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[Stack, TrustPolicy]]:
    """The session's helpers over a stack of our own, and whom its caches trust: the operator's
    key and each agent's own (the liar's too: a liar with a trusted key)."""
    directory = Path(tmp_path_factory.mktemp("memoplane-replicas"))
    try:
        with with_a_liar(stack, control_plane.env(), directory, PREFIX, SEED, 0.2) as mine:
            yield mine
    except processes.ProcessError as exc:
        pytest.fail(f"the replicas stack cannot start: {exc}", pytrace=False)


@pytest.fixture
def rns(rstack: tuple[Stack, TrustPolicy]) -> Iterator[str]:
    name = PREFIX + uuid.uuid4().hex[:6]
    rstack[0].kube.ensure_namespace(name)
    yield name
    rstack[0].kube.core.delete_namespace(name)


def job(name: str, source: str, salt: str, replicas: int = 2, **inputs: Any) -> dict[str, Any]:
    return computejob_manifest(name, None, {
        "python": {"source": source}, "inputs": [{"name": k, "value": v} for k, v in inputs.items()],
        "cache": {"version": salt}, "verify": {"replicas": replicas}})


def status(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("status") or {}


def nodes(obj: dict[str, Any]) -> list[str]:
    return [str(r.get("node")) for r in (status(obj).get("verify") or {}).get("replicas") or []]


def test_a_liar_is_never_believed_and_named_in_every_dispute(rstack: tuple[Stack, TrustPolicy], rns: str) -> None:
    s, agents = rstack
    salt = uuid.uuid4().hex[:12]
    started = time.monotonic()
    s.apply(rns, *(job(f"sq-{n}", SQUARE, salt, n=n) for n in range(JOBS)))
    done = s.wait_all(rns, [f"sq-{n}" for n in range(JOBS)], timeout=900)
    elapsed = time.monotonic() - started
    store = s.store(rns)
    policy = agents
    succeeded = disputed = liar_jobs = lied = 0
    for name, obj in done.items():
        n, st, key = int(name.removeprefix("sq-")), status(obj), status(obj)["cacheKey"]
        ran = nodes(obj)
        assert len(ran) == 2 and len(set(ran)) == 2, (name, st)          # two distinct nodes
        liar_lied = LIAR in ran and lies(key, SEED, 0.2)
        liar_jobs += LIAR in ran
        lied += liar_lied
        if st["phase"] == "Succeeded":
            succeeded += 1
            assert st["result"]["value"] == n * n, (name, st)            # never a wrong result accepted
            assert not liar_lied
            assert store.read_ref(key) == st["result"]["digest"]
            envelopes = store.attestations(key, st["result"]["digest"])
            assert rp.attesting_nodes(policy, key, st["result"]["digest"], envelopes) >= set(ran)
        else:
            disputed += 1
            assert st["reason"] == rp.REASON_DISPUTED and liar_lied, (name, st)   # no false dispute
            assert LIAR in st["message"] and "value differs at $" in st["message"], st["message"]
            assert kstatus(obj["metadata"]["generation"], st["observedGeneration"], st["conditions"]) == "Failed"
            assert store.read_ref(key) is None                           # nothing cached
    print(f"\nreplicas: {JOBS} jobs x 2 replicas in {elapsed:.0f}s: {succeeded} succeeded (all true), "
          f"{disputed} disputed (all naming {LIAR}); the liar ran in {liar_jobs}, lied in {lied}")
    assert disputed == lied and succeeded == JOBS - lied and lied > 0


def test_time_ns_is_disputed_with_a_readable_difference(rstack: tuple[Stack, TrustPolicy], rns: str) -> None:
    s, _ = rstack
    clock = "import time\n\ndef main():\n    return {'now': time.time_ns()}\n"
    for attempt in range(10):  # a key the liar lies about differs at $.lie first: take the next salt
        name = f"clock-{attempt}"
        s.apply(rns, job(name, clock, uuid.uuid4().hex[:12]))
        obj = s.wait(rns, name, timeout=180)
        st = status(obj)
        if not lies(st["cacheKey"], SEED, 0.2):
            break
    assert st["phase"] == "Failed" and st["reason"] == "Disputed", st
    disputed = next(c for c in st["conditions"] if c["type"] == "Disputed")
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert disputed["status"] == "True" and ready["status"] == "False"
    assert "value differs at $.now: " in ready["message"] and " vs " in ready["message"]
    digests = {r["digest"] for r in st["verify"]["replicas"]}
    assert len(digests) == 2 and all(d in ready["message"] for d in digests)
    assert st["verify"]["agreed"] is False and st["verify"]["difference"].startswith("value differs at $.now")
    assert s.store(rns).read_ref(st["cacheKey"]) is None
    events = s.kube.core.list_namespaced_event(rns, field_selector=f"involvedObject.name={name}").items
    assert any(e.reason == "Disputed" and "value differs at $.now" in e.message for e in events)
    print(f"\ndispute: {ready['message']}")


def test_agreement_is_a_hit_for_as_many_replicas_and_a_miss_for_more(rstack: tuple[Stack, TrustPolicy],
                                                                     rns: str) -> None:
    s, _ = rstack
    honest = "def main(n):\n    return n + 1000\n"
    for attempt in range(10):  # a key the liar lies about is disputed (checked): take the next salt
        salt = uuid.uuid4().hex[:12]
        s.apply(rns, job(f"first-{attempt}", honest, salt, n=1))
        first = status(s.wait(rns, f"first-{attempt}", timeout=180))
        if first["phase"] == "Succeeded":
            break
        assert first["reason"] == rp.REASON_DISPUTED and lies(first["cacheKey"], SEED, 0.2), first
    assert first["result"]["value"] == 1001 and first["cached"] is False, first
    s.apply(rns, job("again", honest, salt, n=1))
    again = status(s.wait(rns, "again", timeout=120))
    assert again["cached"] is True and again["result"]["digest"] == first["result"]["digest"]
    # Three replicas on three nodes: the stored result has two attesting nodes, so it runs again.
    s.apply(rns, job("three", honest, salt, replicas=3, n=1))
    three = status(s.wait(rns, "three", timeout=180))
    assert three.get("cached") is not True and len(set(nodes({"status": three}))) == 3, three
