"""Apply -> Ready of a ComputeJob served from the cache, against the raw API-server round trip.

One job is computed once (warm); then N jobs with other names and the identical spec are
created one after the other, each timed from the create call until a watch sees it
Succeeded + Ready with cached: true. Baseline, interleaved job by job: the same client
creates the same object in a namespace no operator watches, patches a Ready status onto
it itself and waits for the same watch to see it — the least any hit can cost.

    python bench/hit_latency.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cluster import Watcher, load_note, quantile_ms, ready, stack
from _common import emit, metric

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
    metrics = {}
    for q in (50, 99):
        ours, base = quantile_ms(hit_s, q), quantile_ms(raw_s, q)
        metrics[f"hit_apply_to_ready_p{q}"] = metric(round(ours, 2), "ms", f"raw_create_status_patch_p{q}",
                                                     round(base, 2))
        print(f"p{q}: cache hit apply->Ready {ours:7.1f} ms   raw API round trip {base:6.1f} ms   "
              f"ratio {ours / base:5.1f}")
    print(f"{n} hits, {load_note()}")
    emit("hit_latency", metrics)


if __name__ == "__main__":
    main()
