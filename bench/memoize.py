"""Hit latency of @memoplane.memoize against joblib.Memory, same function and arguments.

Both caches are warmed with one call, then each hit is timed alone, the two
libraries interleaved call by call so machine load hits both alike. Three ways:
  - memoplane, repeated hits in one process (served from the verified in-process LRU)
  - memoplane with memory_bytes=0: every hit reads and verifies the store on disk
  - joblib.Memory: every hit reads its pickle from disk (it has no memory tier)
Arguments: small scalars, and a 1 MiB float64 array (hashed by content by both).

    python bench/memoize.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, metric

import memoplane


def featurize(rows: Any, scale: float, label: str = "x") -> dict:
    return {"label": label, "total": float(np.sum(rows)) * scale, "n": int(np.size(rows))}


def timed_hits(calls: dict[str, Callable[[], object]], n: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(n):
        for name, call in calls.items():
            t = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - t)
    return samples


def p(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100)[int(q) - 1] * 1e6 if q < 100 else max(samples) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    n = 300 if parser.parse_args().quick else 3000
    metrics: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        job = joblib.Memory(Path(tmp) / "joblib", verbose=0).cache(featurize)
        mem = memoplane.memoize(store=Path(tmp) / "mp")(featurize)
        disk = memoplane.memoize(store=Path(tmp) / "mp", memory_bytes=0)(featurize)
        for label, args in (("scalars", ([1, 2, 3], 2.5)), ("array_1mib", (np.random.default_rng(0).random(131072), 2.5))):
            for fn in (job, mem, disk):
                assert fn(*args) == featurize(*args)  # warm, and a hit returns the right value
            samples = timed_hits({"joblib": lambda a=args: job(*a), "memory": lambda a=args: mem(*a),
                                  "store": lambda a=args: disk(*a)}, n)
            base = p(samples["joblib"], 50)
            for variant in ("memory", "store"):
                ours = p(samples[variant], 50)
                metrics[f"hit_p50_{variant}_{label}"] = metric(ours, "us", "joblib_hit_p50", base)
                metrics[f"hit_p99_{variant}_{label}"] = metric(p(samples[variant], 99), "us", "joblib_hit_p99",
                                                              p(samples["joblib"], 99))
                print(f"{label:11s} {variant:6s} p50 {ours:8.1f} us   joblib {base:8.1f} us   "
                      f"speedup {base / ours:5.1f}x")
    emit("memoize", metrics)


if __name__ == "__main__":
    main()
