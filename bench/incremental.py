"""Incremental work at scale, on the local control plane (issue 13 item 5). One section per
kind of incremental job; `--section NAME` runs one.

Section "map": a spec.map job over N elements (10,000; `--quick` 1,000), cold, then the
same job with 1% of its elements changed (its `over` list patched: a new generation):
- sandboxes run (the agents' memoplane_agent_runs_total counters) vs the elements changed:
  target <= 1.1% of N;
- apply -> Ready wall time of the changed run vs the cold run: target <= 5% of cold plus a
  fixed overhead, measured here as the apply -> Ready time of a 1-element map over a new
  element (one sandbox run; median of 3 after one that warms the agents up);
- the same 1%-changed list applied as a NEW map job (another 1% changed): its element keys
  are all looked up in the cache (no memory of an earlier generation), 99% are hits.
Wall time is from the create/patch call until a watch sees the job Succeeded + Ready for
its generation (what `kubectl wait` sees).

    python bench/incremental.py [--quick] [-n N] [--section map]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cluster import NODES, Bench, Watcher, load_note, ready, stack
from _common import emit, metric

from memoplane.api.specs import computejob_manifest
from memoplane.cluster import mapping as mp
from memoplane.cluster import protocol as p
from memoplane.testing import processes

RUNS = re.compile(r'^memoplane_agent_runs_total\{outcome="(\w+)"\}\s+([0-9.e+]+)$', re.M)
SOURCE = "def main(x, scale):\n    return x * scale\n"
CHANGED = 0.01


def sandbox_runs(b: Bench) -> float:
    """Sandbox runs (succeeded + failed) of the bench's agents since they started."""
    total = 0.0
    for node in NODES:
        proc = processes.load(b.cfg.directory, processes.AGENT_PREFIX + node)
        assert proc is not None, f"agent {node} is not running"
        with urllib.request.urlopen(proc.url("http", "/metrics"), timeout=5) as response:
            total += sum(float(v) for _, v in RUNS.findall(response.read().decode()))
    return total


def map_manifest(name: str, elements: list[Any], salt: str) -> dict[str, Any]:
    return computejob_manifest(name, None, {
        "python": {"source": SOURCE, "entrypoint": "main"}, "map": {"over": "x"}, "cache": {"version": salt},
        "inputs": [{"name": "x", "value": elements}, {"name": "scale", "value": 3}]})


def timed(b: Bench, name: str, generation: int, act: Callable[[], object], timeout: float) -> tuple[float, float]:
    """(apply -> Ready seconds, sandbox runs) of `act`, which creates or patches map job `name`."""
    def current(obj: dict[str, Any]) -> bool:
        return obj["metadata"].get("generation") == generation and ready(None)(obj)
    watcher = Watcher(b.kube, b.ns, current)
    runs = sandbox_runs(b)
    t = time.perf_counter()
    act()
    seen = watcher.wait(name, timeout=timeout)
    watcher.close()
    return seen - t, sandbox_runs(b) - runs


def changed(elements: list[int], offset: int) -> list[int]:
    """`elements` with every 100th (from `offset`) replaced by a value not in the list: 1% changed, scattered."""
    step = round(1 / CHANGED)
    return [e + 10 * len(elements) if i % step == offset else e for i, e in enumerate(elements)]


def map_section(b: Bench, n: int) -> dict[str, dict[str, Any]]:
    salt = uuid.uuid4().hex[:12]
    timeout = max(600.0, n * 0.2)
    ones = []
    for i in range(4):  # the first warms the agents' sandbox pools up and is not counted
        one = map_manifest(f"one{i}", [-1 - i], salt)
        seconds, _ = timed(b, f"one{i}", 1, lambda m=one: b.create(b.ns, m), 300)
        ones.append(seconds)
    overhead = statistics.median(ones[1:])
    print(f"map: fixed overhead (a 1-element map over a new element, apply -> Ready, median of 3): {overhead:.2f}s "
          f"(first, warming up: {ones[0]:.2f}s)")
    elements = list(range(n))
    cold, cold_runs = timed(b, "big", 1, lambda: b.create(b.ns, map_manifest("big", elements, salt)), timeout)
    print(f"map: cold, {n} elements: {cold:.2f}s, {cold_runs:.0f} sandbox runs")
    edit = changed(elements, 0)
    patch = {"spec": {"inputs": [{"name": "x", "value": edit}, {"name": "scale", "value": 3}]}}
    warm, warm_runs = timed(b, "big", 2, lambda: b.kube.custom.patch_namespaced_custom_object(
        p.GROUP, p.VERSION, b.ns, p.COMPUTEJOBS, "big", patch), timeout)
    big = b.kube.get(p.COMPUTEJOBS, b.ns, "big")
    assert big is not None
    print(f"map: 1% changed (patched, generation 2): {warm:.2f}s, {warm_runs:.0f} sandbox runs; "
          f"status.map {big['status']['map']}")
    fresh_edit = changed(elements, 50)
    fresh, fresh_runs = timed(b, "fresh", 1, lambda: b.create(b.ns, map_manifest("fresh", fresh_edit, salt)), timeout)
    print(f"map: 1% changed as a new job (every key looked up): {fresh:.2f}s, {fresh_runs:.0f} sandbox runs")
    batches, _ = b.kube.list(p.COMPUTEJOBS, b.ns, f"{mp.PARENT_LABEL}={big['metadata']['uid']}")
    print(f"map: {len(batches)} child ComputeJobs for {n} elements (was {n} before batching)")
    log = b.cfg.directory / "logs" / f"{processes.OPERATOR}.log"
    for line in log.read_text().splitlines() if log.exists() else ():
        if "element keys in" in line or "map of" in line:
            print("map: operator:", line.split(" ", 2)[-1])
    changed_n = sum(1 for a, e in zip(elements, edit, strict=True) if a != e)
    return {
        "map_changed_sandbox_runs": metric(warm_runs / n, "fraction of elements", "fraction changed", changed_n / n),
        "map_changed_wall": metric(round(warm, 3), "s", "cold run s", round(cold, 3)),
        "map_changed_wall_less_overhead": metric(round(max(0.0, warm - overhead), 3), "s", "cold run s",
                                                 round(cold, 3)),
        "map_fixed_overhead": metric(round(overhead, 3), "s", "cold run s", round(cold, 3)),
        "map_new_job_changed_sandbox_runs": metric(fresh_runs / n, "fraction of elements", "fraction changed",
                                                   changed_n / n),
        "map_new_job_changed_wall": metric(round(fresh, 3), "s", "cold run s", round(cold, 3)),
        "map_cold_runs_per_element": metric(cold_runs / n, "runs", "one run per element", 1.0),
    }


def chunks(_: Bench, n: int) -> dict[str, Any]:
    """spec.map.overChunks' curve, embedded (bench/incremental_chunks.py): a 64 MiB table, 8 MiB with --quick."""
    from incremental_chunks import chunks_section, section_metrics

    return section_metrics(chunks_section(64 if n >= 10_000 else 8))


SECTIONS: dict[str, Callable[[Bench, int], dict[str, Any]]] = {"map": map_section, "chunks": chunks}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("-n", type=int, default=None, help="elements of the map (default 10,000; --quick 1,000)")
    parser.add_argument("--section", choices=sorted(SECTIONS), action="append")
    args = parser.parse_args()
    n = args.n or (1000 if args.quick else 10_000)
    metrics: dict[str, dict[str, Any]] = {}
    with stack("incr") as b:
        for name in args.section or sorted(SECTIONS):
            metrics.update(SECTIONS[name](b, n))
    print(load_note())
    emit("incremental", metrics)


if __name__ == "__main__":
    main()
