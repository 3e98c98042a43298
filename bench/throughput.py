"""Cache-hit throughput: N ComputeJobs with one already-computed spec applied at once.

One job is computed once (warm); then N jobs with other names and the identical spec are
created by a few client threads as fast as they go, and jobs/s is N over the time from
the first create call until a watch has seen the last one Succeeded + Ready (cached).
Baseline: the same threads create the same objects in a namespace no operator watches and
patch a Ready status onto each themselves (create + status patch per job, the API
server's own limit), timed the same way; run before and after the operator's batch, mean.

    python bench/throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cluster import Bench, Watcher, load_note, ready, stack
from _common import emit, metric

SOURCE = 'def main(rows, scale):\n    return {"total": sum(rows) * scale}\n'
INPUTS = {"rows": [1, 2, 3], "scale": 10}
THREADS = 4


def batch(b: Bench, watcher: Watcher, names: list[str], submit: Any) -> tuple[float, float]:
    """(seconds from the first create to the last seen Ready, seconds spent creating)."""
    t = time.perf_counter()
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(submit, names))
    created = time.perf_counter() - t
    return watcher.wait(names, timeout=900) - t, created


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("-n", type=int, default=None)
    args = parser.parse_args()
    n = args.n or (100 if args.quick else 500)
    salt = uuid.uuid4().hex[:12]
    with stack("tput") as b:
        hits, raws = Watcher(b.kube, b.ns, ready(cached=True)), Watcher(b.kube, b.raw_ns, ready(cached=True))
        computed = Watcher(b.kube, b.ns, ready(cached=False))
        b.create(b.ns, b.job("warm", SOURCE, INPUTS, salt))
        computed.wait("warm", timeout=180)
        manifest = b.job("x", SOURCE, INPUTS, salt)

        def named(name: str) -> dict[str, Any]:
            return {**manifest, "metadata": {**manifest["metadata"], "name": name}}

        raw_rates = []
        for round_ in ("a", "b"):
            names = [f"raw{round_}-{i:04d}" for i in range(n)]
            total, _ = batch(b, raws, names, lambda name: b.raw_round_trip(named(name)))
            raw_rates.append(n / total)
            print(f"raw create+status patch, round {round_}: {n / total:6.1f} jobs/s")
            if round_ == "a":
                names = [f"hit-{i:04d}" for i in range(n)]
                total, creating = batch(b, hits, names, lambda name: b.create(b.ns, named(name)))
                ours = n / total
                print(f"operator, cache hits: {ours:6.1f} jobs/s ({n} jobs Ready in {total:.2f}s; "
                      f"creating them took {creating:.2f}s)")
        for w in (hits, raws, computed):
            w.close()
    base = sum(raw_rates) / len(raw_rates)
    print(f"{n} jobs, {THREADS} client threads, {load_note()}")
    emit("throughput", {"cache_hit_jobs_per_s": metric(round(ours, 2), "jobs/s", "raw_create_status_patch_per_s",
                                                       round(base, 2))})


if __name__ == "__main__":
    main()
