"""Apply -> Ready of a ComputeJob served from the cache, against the raw API-server round trip.

One job is computed once (warm); then N jobs with other names and the identical spec are
created one after the other, each timed from the create call until a watch sees it
Succeeded + Ready with cached: true. Baseline, interleaved job by job: the same client
creates the same object in a namespace no operator watches, patches a Ready status onto
it itself and waits for the same watch to see it — the least any hit can cost.

The cost of trust (DESIGN §11), in the same run: the operator judges every hit's
attestations with the cache's policy (memoplane.trust.trusted_hit). The same warm key is
then looked up against the same MinIO store, interleaved: through trusted_hit with the
cache's real policy (the agents' key), and with the judge step skipped (store.get_ref
alone, what a hit cost before attestations). Their difference at p99 is what signature
checking adds to a hit (target: <= 1 ms); the judge alone (parse, Ed25519 verify, checks)
is timed too.

    python bench/hit_latency.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cluster import Bench, Watcher, load_note, quantile_ms, ready, stack
from _common import emit, metric

from memoplane.cluster import protocol as p
from memoplane.cluster import trust as tr
from memoplane.cluster.stores import Stores, StoreSettings
from memoplane.testing import processes
from memoplane.trust import TrustPolicy, judge, trusted_hit

SOURCE = 'def main(rows, scale):\n    return {"total": sum(rows) * scale}\n'
INPUTS = {"rows": [1, 2, 3], "scale": 10}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("-n", type=int, default=None)
    args = parser.parse_args()
    n = args.n or (40 if args.quick else 200)
    salt = uuid.uuid4().hex[:12]
    with stack("hit") as b:
        hits, raws = Watcher(b.kube, b.ns, ready(cached=True)), Watcher(b.kube, b.raw_ns, ready(cached=True))
        computed = Watcher(b.kube, b.ns, ready(cached=False))
        b.create(b.ns, b.job("warm", SOURCE, INPUTS, salt))
        computed.wait("warm", timeout=180)
        warm = b.kube.get(p.COMPUTEJOBS, b.ns, "warm")
        assert warm is not None
        key = str(warm["status"]["cacheKey"])
        for i in range(3):  # warm both paths (connections, caches) untimed
            b.create(b.ns, b.job(f"w{i}", SOURCE, INPUTS, salt))
            hits.wait(f"w{i}")
            b.raw_round_trip(b.job(f"w{i}", SOURCE, INPUTS, salt))
            raws.wait(f"w{i}")
        hit_s: list[float] = []
        raw_s: list[float] = []
        for i in range(n):
            name = f"hit-{i:04d}"
            t = time.perf_counter()
            b.create(b.ns, b.job(name, SOURCE, INPUTS, salt))
            hit_s.append(hits.wait(name) - t)
            t = time.perf_counter()
            b.raw_round_trip(b.job(name, SOURCE, INPUTS, salt))
            raw_s.append(raws.wait(name) - t)
        for w in (hits, raws, computed):
            w.close()
        trusted_s, bare_s, judge_s = signature_cost(b, key, 10 * n)
    metrics = {}
    for q in (50, 99):
        ours, base = quantile_ms(hit_s, q), quantile_ms(raw_s, q)
        metrics[f"hit_apply_to_ready_p{q}"] = metric(round(ours, 2), "ms", f"raw_create_status_patch_p{q}",
                                                     round(base, 2))
        print(f"p{q}: cache hit apply->Ready {ours:7.1f} ms   raw API round trip {base:6.1f} ms   "
              f"ratio {ours / base:5.1f}")
    for q in (50, 99):
        trusted, bare, judged = quantile_ms(trusted_s, q), quantile_ms(bare_s, q), quantile_ms(judge_s, q)
        metrics[f"trusted_lookup_p{q}"] = metric(round(trusted, 3), "ms", f"lookup_without_judge_p{q}",
                                                 round(bare, 3))
        metrics[f"signature_check_added_p{q}"] = metric(round(trusted - bare, 3), "ms", "target_max", 1.0)
        metrics[f"judge_alone_p{q}"] = metric(round(judged, 3), "ms", "target_max", 1.0)
        print(f"p{q}: lookup with trust {trusted:6.2f} ms   without the judge step {bare:6.2f} ms   "
              f"added {trusted - bare:6.3f} ms   judge alone {judged:6.3f} ms")
    print(f"{n} hits, {len(trusted_s)} lookups each way, {load_note()}")
    emit("hit_latency", metrics)


def signature_cost(b: Bench, key: str, n: int) -> tuple[list[float], list[float], list[float]]:
    """The same warm key looked up n times each way, interleaved, against the job's store."""
    rc = b.kube.get(p.RESULTCACHES, b.ns, p.DEFAULT_RESULT_CACHE)
    assert rc is not None
    policy = tr.effective_policy(rc, {}, processes.cluster_keys(b.cfg.directory))
    assert isinstance(policy, TrustPolicy), policy
    stores = Stores(StoreSettings.from_env(b.cfg.env))
    try:
        store = stores.get(p.DEFAULT_BUCKET, p.default_store_prefix(b.ns))
        found = trusted_hit(store, key, policy)
        assert found.hit is not None, found.verdict
        envelopes = store.attestations(key, found.hit.digest, found.hit.attestations)
        trusted_s: list[float] = []
        bare_s: list[float] = []
        judge_s: list[float] = []
        for i in range(n + 20):  # the first 20 of each: warm-up, untimed
            t = time.perf_counter()
            assert trusted_hit(store, key, policy).hit is not None
            t1 = time.perf_counter()
            assert store.get_ref(key) is not None
            t2 = time.perf_counter()
            assert judge(policy, key, found.hit.digest, envelopes).trusted
            t3 = time.perf_counter()
            if i >= 20:
                trusted_s.append(t1 - t)
                bare_s.append(t2 - t1)
                judge_s.append(t3 - t2)
        return trusted_s, bare_s, judge_s
    finally:
        stores.close()


if __name__ == "__main__":
    main()
