"""Concurrent `memoplane run` of tiny jobs (distinct keys: every one a miss), with a running
`memoplane serve` (the local daemon: its warm pool) against the same run's baseline without one
(`--daemon never`: each process starts its own cold sandbox).

Per process: the wall time from its start to its exit, while all N run at once; the median and
the slowest, and the whole batch's wall time.

    python bench/daemon.py [--quick] [--processes N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, metric

SOURCE = "def main(i):\n    return i * 2\n"
_START_DEADLINE = 120.0


def batch(env: dict[str, str], script: Path, first: int, count: int, mode: str) -> tuple[list[float], float]:
    """Per-process seconds of `count` concurrent runs (inputs first.., all distinct), and the batch's."""
    seconds: list[float] = [0.0] * count
    failures: list[str] = []

    def one(k: int) -> None:
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "memoplane.cli", "run", "--json", "--daemon", mode,
                               str(script), "-i", f"i={first + k}"], env=env, capture_output=True, text=True)
        seconds[k] = time.perf_counter() - t
        if proc.returncode != 0 or json.loads(proc.stdout)["cached"]:
            failures.append(f"run {first + k}: exit {proc.returncode}: {proc.stderr.strip()[-300:]}")

    threads = [threading.Thread(target=one, args=(k,)) for k in range(count)]
    t = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = time.perf_counter() - t
    if failures:
        raise SystemExit(f"{len(failures)} of {count} runs failed or were not misses; first: {failures[0]}")
    return seconds, total


def start_daemon(env: dict[str, str], home: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "memoplane.cli", "serve", "--port", "0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(home / "serve.log", "wb"))
    deadline = time.monotonic() + _START_DEADLINE
    while not list((home / "run" / "memoplane").glob("serve-*.sock")):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit(f"memoplane serve did not open its socket; see {home / 'serve.log'}")
        time.sleep(0.05)
    return proc


def summary(name: str, seconds: list[float], total: float) -> dict[str, float]:
    print(f"{name}: median {statistics.median(seconds):.2f} s, slowest {max(seconds):.2f} s, "
          f"batch {total:.2f} s", flush=True)
    return {"median": statistics.median(seconds), "max": max(seconds), "batch": total}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="20 processes instead of 200")
    parser.add_argument("--processes", type=int, help="processes at once (default 200, --quick 20)")
    args = parser.parse_args()
    count = args.processes or (20 if args.quick else 200)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        (home / "run").mkdir(mode=0o700)
        # Bytecode cached (in the run's directory), as for an installed memoplane: a process that
        # compiles every module it imports measures the compiler, on either side.
        env = {**os.environ, "MEMOPLANE_STORE": str(home / "store"), "MEMOPLANE_KEYS_DIR": str(home / "keys"),
               "XDG_RUNTIME_DIR": str(home / "run"), "PYTHONPYCACHEPREFIX": str(home / "pycache")}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        script = home / "job.py"
        script.write_text(SOURCE)
        batch(env, script, -1, 1, "never")   # the store and keyring exist before the batches start
        alone = summary(f"{count} at once, no daemon", *batch(env, script, 0, count, "never"))
        proc = start_daemon(env, home)
        try:
            batch(env, script, -2, 1, "always")   # the daemon's pool is warm
            served = summary(f"{count} at once, daemon", *batch(env, script, count, count, "always"))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    emit("daemon", {
        f"median_seconds_{count}_at_once": metric(served["median"], "s", "no_daemon_median_seconds",
                                                  alone["median"]),
        f"slowest_seconds_{count}_at_once": metric(served["max"], "s", "no_daemon_slowest_seconds", alone["max"]),
        f"batch_seconds_{count}_at_once": metric(served["batch"], "s", "no_daemon_batch_seconds", alone["batch"]),
    })


if __name__ == "__main__":
    main()
