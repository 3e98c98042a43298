"""Shared by the benchmarks (DESIGN §9): timing, and the one-JSON-line result."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any


def metric(value: float, unit: str, baseline_name: str, baseline_value: float) -> dict[str, Any]:
    """One metric measured side by side with its baseline; ratio = value / baseline."""
    return {"value": value, "unit": unit, "baseline": baseline_name, "baseline_value": baseline_value,
            "ratio": value / baseline_value if baseline_value else float("nan")}


def best_seconds(fns: dict[str, Callable[[], object]], repeat: int = 3,
                 cpu: dict[str, float] | None = None) -> dict[str, float]:
    """Fastest of `repeat` runs of each function, run interleaved (a, b, a, b, ...)
    so that load from others on a shared machine hits a variant and its baseline alike.
    `cpu`, if given, receives the least CPU time (all threads of this process) per function:
    the work done, which load from others hardly changes (cores used = cpu / seconds)."""
    best = {name: float("inf") for name in fns}
    least_cpu = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            c, t = time.process_time(), time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
            least_cpu[name] = min(least_cpu[name], time.process_time() - c)
    if cpu is not None:
        cpu.update(least_cpu)
    return best


def emit(bench: str, metrics: dict[str, dict[str, Any]]) -> None:
    """Print the result line; it must be the last line of the benchmark's output."""
    print(json.dumps({"bench": bench, "metrics": metrics}, sort_keys=True), flush=True)
