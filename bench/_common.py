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


def best_seconds(fns: dict[str, Callable[[], object]], repeat: int = 3) -> dict[str, float]:
    """Fastest of `repeat` runs of each function, run interleaved (a, b, a, b, ...)
    so that load from others on a shared machine hits a variant and its baseline alike."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def emit(bench: str, metrics: dict[str, dict[str, Any]]) -> None:
    """Print the result line; it must be the last line of the benchmark's output."""
    print(json.dumps({"bench": bench, "metrics": metrics}, sort_keys=True), flush=True)
