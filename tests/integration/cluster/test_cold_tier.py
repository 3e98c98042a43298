"""A ResultCache with a cold tier on the cluster: the operator's maintenance moves content not read
for tiers[0].after to the tier's bucket (an Event Demoted says how much), and hits and downstream
jobs still get the result, read back through the tier (the job's status.coldTier names it to the agent). Both
locations are buckets of the stack's one object store (MinIO): a tier uses the chart's endpoint,
as spec.store does. Real API server, MinIO, operator and agents; demotion runs every second
(conftest)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from conftest import NODES

from memoplane.api.specs import computejob_manifest
from memoplane.cas.packs import PACKS
from memoplane.cas.tiers import TieredBackend
from memoplane.cluster import protocol as p
from memoplane.cluster.decide import default_cache

pytestmark = pytest.mark.integration
Stack = Any  # conftest.Stack (fixture `stack`)

BIG = "def main(n):\n    return bytes(range(256)) * n\n"
TOTAL = 'def main(xs):\n    return {"sum": sum(xs), "n": len(xs)}\n'
N = 2000  # 512 KB of bytes: a blob of several chunks (in a pack), handed to a downstream job as a file the agent writes


def job(name: str, source: str, inputs: list[dict[str, Any]]) -> dict[str, Any]:
    return computejob_manifest(name, None, {"python": {"source": source, "entrypoint": "main"}, "inputs": inputs})


def packs(backend: Any) -> set[str]:
    return {i.name for i in backend.list(PACKS)}


def test_content_moves_to_the_cold_tier_and_is_still_served(stack: Stack, ns: str) -> None:
    cold_bucket = f"mpt-cold-{uuid.uuid4().hex[:8]}"
    rc = default_cache(ns)
    rc["spec"]["tiers"] = [{"after": "2s", "store": {"bucket": cold_bucket, "prefix": ns}}]
    assert stack.kube.create(p.RESULTCACHES, ns, rc) is not None
    stack.apply(ns, job("big", BIG, [{"name": "n", "value": N}]))
    first = stack.wait(ns, "big")["status"]
    assert first["phase"] == p.SUCCEEDED, first

    demoted = stack.eventually_events(ns, p.DEFAULT_RESULT_CACHE, p.REASON_DEMOTED, timeout=60)
    assert f"to s3://{cold_bucket}/{ns}/" in demoted[0]
    hot = stack.store(ns).backend   # the test's own view: the hot location only
    cold = stack.stores.get(cold_bucket, ns).backend
    deadline = time.monotonic() + 60
    while packs(hot) or not packs(cold):
        assert time.monotonic() < deadline, f"hot {len(packs(hot))} packs, cold {len(packs(cold))}"
        time.sleep(0.5)
    assert list(hot.list("index/")) and not list(cold.list("index/"))   # index segments stay hot

    for node in NODES:   # the agents' node-local caches forget the location's files, as fresh nodes' would
        cached = stack.cfg.directory / "node-cache" / node / p.DEFAULT_BUCKET / p.default_store_prefix(ns).strip("/")
        for path in [f for f in cached.rglob("*") if f.is_file()]:
            path.unlink()
    stack.apply(ns, job("big-again", BIG, [{"name": "n", "value": N}]),
                job("total", TOTAL, [{"name": "xs", "fromJob": {"name": "big"}, "as": "bytes"}]))
    done = {name: obj["status"] for name, obj in stack.wait_all(ns, ["big-again", "total"]).items()}
    assert done["big-again"]["cached"] is True and done["big-again"]["result"] == first["result"]
    assert done["total"]["phase"] == p.SUCCEEDED and done["total"]["attempts"] == 1, (done["total"], stack.logs())
    assert done["total"]["result"]["value"] == {"sum": 255 * 128 * N, "n": 256 * N}
    assert done["total"]["coldTier"] == p.ColdTier(cold_bucket, ns, 2.0).text()   # what the agent read through
    stack.stores.set_tier(p.DEFAULT_BUCKET, p.default_store_prefix(ns), p.ColdTier(cold_bucket, ns, 2.0))
    tiered = stack.store(ns)
    assert isinstance(tiered.backend, TieredBackend)
    assert tiered.load_value(tiered.get_result(first["result"]["digest"]).value) == bytes(range(256)) * N
