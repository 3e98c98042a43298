"""Apply -> Ready of a trivial ComputeJob that is not in the cache (a unique input each time):
resolve, schedule to a node, run in a sandbox, store the result, report.

Timed from the create call until a watch sees it Succeeded + Ready (cached: false).
Baselines, interleaved job by job: the raw API-server round trip (create + a status patch
from the same client, seen by the same watch), and `subprocess.run([python, "-c", "pass"])`,
a pod-less lower bound for starting a process at all.

    python bench/miss_latency.py [--quick]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cluster import Watcher, load_note, quantile_ms, ready, stack
from _common import emit, metric

SOURCE = "def main(i):\n    return i + 1\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("-n", type=int, default=None)
    args = parser.parse_args()
    n = args.n or (10 if args.quick else 50)
    salt = uuid.uuid4().hex[:12]
    with stack("miss") as b:
        misses, raws = Watcher(b.kube, b.ns, ready(cached=False)), Watcher(b.kube, b.raw_ns, ready(cached=True))
        for i in range(3):  # warm both paths (sandbox pools, connections) untimed
            b.create(b.ns, b.job(f"w{i}", SOURCE, {"i": -1 - i}, salt))
            misses.wait(f"w{i}", timeout=180)
            b.raw_round_trip(b.job(f"w{i}", SOURCE, {"i": 0}, salt))
            raws.wait(f"w{i}")
        miss_s: list[float] = []
        raw_s: list[float] = []
        proc_s: list[float] = []
        for i in range(n):
            name = f"miss-{i:04d}"
            t = time.perf_counter()
            b.create(b.ns, b.job(name, SOURCE, {"i": i}, salt))
            miss_s.append(misses.wait(name) - t)
            t = time.perf_counter()
            b.raw_round_trip(b.job(name, SOURCE, {"i": i}, salt))
            raw_s.append(raws.wait(name) - t)
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], check=True)
            proc_s.append(time.perf_counter() - t)
        for w in (misses, raws):
            w.close()
    metrics = {}
    for q in (50, 99):
        ours = quantile_ms(miss_s, q)
        base, proc = quantile_ms(raw_s, q), quantile_ms(proc_s, q)
        metrics[f"miss_apply_to_ready_p{q}"] = metric(round(ours, 2), "ms", f"raw_create_status_patch_p{q}",
                                                      round(base, 2))
        metrics[f"miss_apply_to_ready_p{q}_vs_process"] = metric(round(ours, 2), "ms",
                                                                 f"subprocess_python_pass_p{q}", round(proc, 2))
        print(f"p{q}: uncached job apply->Ready {ours:7.1f} ms   raw API round trip {base:6.1f} ms   "
              f"python -c pass {proc:6.1f} ms")
    print(f"{n} misses, {load_note()}")
    emit("miss_latency", metrics)


if __name__ == "__main__":
    main()
