"""`memoplane run` cache hit against recomputing the same example (examples/primes.py,
about a second of pure-Python work), both as the whole CLI command a user types.

Recompute: `--policy Refresh` (runs in the sandbox, stores, replaces the ref);
hit: the default policy. Interleaved, several rounds; medians reported, and the
in-process part of a hit (`duration_ms` from --json) beside the whole command.

    python bench/run.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, metric

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "primes.py"


def run(store: str, *extra: str) -> tuple[float, dict[str, Any]]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "memoplane.cli", "run", str(EXAMPLE), "--json", *extra],
                          capture_output=True, text=True, env={**os.environ, "MEMOPLANE_STORE": store}, check=True)
    return time.perf_counter() - t, json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    rounds = 3 if parser.parse_args().quick else 7
    computes, hits, hit_inner = [], [], []
    with tempfile.TemporaryDirectory() as store:
        run(store)  # first computation
        for _ in range(rounds):
            seconds, out = run(store, "--policy", "Refresh")
            assert out["cached"] is False
            computes.append(seconds)
            seconds, out = run(store)
            assert out["cached"] is True and out["result"]["count"] == 1857859
            hits.append(seconds)
            hit_inner.append(out["duration_ms"] / 1000)
    compute, hit, inner = (statistics.median(x) for x in (computes, hits, hit_inner))
    print(f"recompute {compute * 1000:8.1f} ms   hit (whole command) {hit * 1000:7.1f} ms "
          f"  hit (in process) {inner * 1000:6.2f} ms   speedup {compute / hit:5.1f}x")
    emit("run", {
        "hit_command_seconds": metric(hit, "s", "recompute_command_seconds", compute),
        "hit_in_process_seconds": metric(inner, "s", "recompute_command_seconds", compute),
    })


if __name__ == "__main__":
    main()
