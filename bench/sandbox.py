"""Benchmark the sandbox: latency to the first line of user code, throughput, memory.

    python bench/sandbox.py [--quick]

Metrics (baselines measured side by side in the same run):
- warm_first_line_p50/p99: from `pool.run()` being called to the first line of
  the job's entrypoint, with a warm child waiting (the pool is topped up before
  each request). Baseline: `subprocess.run([python, "-c", ...])` importing the
  same modules (the profile's preload list) to its first line.
- cold_first_line_p50/p99: the same with an empty pool (the child is forked,
  enters its namespaces and builds its view on demand).
- throughput: sandboxes run to completion per second, 2 threads submitting
  trivial jobs back to back; baseline: the same count of `subprocess.run` calls.
- cpu_per_sandbox: CPU time (user + system) per sandbox in that throughput
  run: this process (pool, bench threads) plus the zygote and every child it
  reaped (/proc/<zygote>/stat utime+stime+cutime+cstime). Less noisy than
  wall-clock figures on a shared machine. Baseline: CPU per `subprocess.run`
  of `python -c pass` (this process plus its reaped children).
- idle_child_private: private memory (Private_Clean + Private_Dirty from
  /proc/<pid>/smaps_rollup) of an idle pooled child; baseline: the private
  memory of a fresh interpreter that imported the same modules.

Both clocks are CLOCK_MONOTONIC (time.perf_counter_ns), shared by all processes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import emit, metric

from memoplane.sandbox import PythonTask, SandboxPool, SandboxRequest
from memoplane.sandbox.profiles import get_profile

JOB = "import time\ndef main():\n    return time.perf_counter_ns()\n"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def wait_warm(pool: SandboxPool) -> None:
    while pool._ready.qsize() < pool.size:
        time.sleep(0.001)
    time.sleep(0.002)  # let the zygote and the filler go idle


def first_line_ms(pool: SandboxPool, tmp: Path, n: int, warm: bool) -> list[float]:
    task = PythonTask(JOB)
    out = []
    for k in range(n):
        if warm:
            wait_warm(pool)
        d = tmp / f"{'w' if warm else 'c'}{k}"
        (d / "i").mkdir(parents=True)
        (d / "o").mkdir()
        t0 = time.perf_counter_ns()
        res = pool.run(SandboxRequest(task, d / "i", d / "o"))
        assert res.ok, res.failure
        out.append((res.value - t0) / 1e6)
    return out


def subprocess_first_line_ms(preload: tuple[str, ...], n: int) -> list[float]:
    imports = "".join(f"\ntry:\n import {m}\nexcept ImportError:\n pass" for m in preload)
    code = f"import time{imports}\nprint(time.perf_counter_ns())"
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
        out.append((int(p.stdout) - t0) / 1e6)
    return out


def zygote_cpu_s(pool: SandboxPool) -> float:
    """CPU seconds of the zygote and of every child it has reaped."""
    with open(f"/proc/{pool._zygote.proc.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime..cstime


def own_cpu_s(children: bool = False) -> float:
    t = os.times()
    return t.children_user + t.children_system if children else t.user + t.system


def throughput(pool: SandboxPool, tmp: Path, n: int, threads: int = 2) -> tuple[float, float]:
    """Sandboxes per second, and CPU ms per sandbox (see the module docstring)."""
    task = PythonTask("def main():\n    return 1\n")
    (tmp / "ti").mkdir()
    (tmp / "to").mkdir()
    req = SandboxRequest(task, tmp / "ti", tmp / "to")
    per = n // threads

    def work() -> None:
        for _ in range(per):
            assert pool.run(req).ok

    ts = [threading.Thread(target=work) for _ in range(threads)]
    wait_warm(pool)
    cpu0 = own_cpu_s() + zygote_cpu_s(pool)
    t = time.perf_counter()
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    rate = per * threads / (time.perf_counter() - t)
    # Once refilled, as many warm children wait as before: the ones consumed were
    # reaped (their whole cost counted), the new ones have not been yet.
    wait_warm(pool)
    time.sleep(0.1)
    cpu = (own_cpu_s() + zygote_cpu_s(pool) - cpu0) * 1e3 / (per * threads)
    return rate, cpu


def subprocess_cpu_ms(n: int) -> float:
    c0 = own_cpu_s() + own_cpu_s(children=True)
    for _ in range(n):
        subprocess.run([sys.executable, "-c", "pass"], check=True)
    return (own_cpu_s() + own_cpu_s(children=True) - c0) * 1e3 / n


def subprocess_throughput(n: int, threads: int = 2) -> float:
    per = n // threads

    def work() -> None:
        for _ in range(per):
            subprocess.run([sys.executable, "-c", "pass"], check=True)

    ts = [threading.Thread(target=work) for _ in range(threads)]
    t = time.perf_counter()
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    return per * threads / (time.perf_counter() - t)


def private_kib(pid: int) -> int:
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total


def idle_child_mib(pool: SandboxPool) -> float:
    wait_warm(pool)
    time.sleep(0.2)
    pids = [s.pid for s in list(pool._ready.queue)]
    return statistics.median(private_kib(p) for p in pids) / 1024


def interpreter_mib(preload: tuple[str, ...]) -> float:
    imports = "".join(f"\ntry:\n import {m}\nexcept ImportError:\n pass" for m in preload)
    code = f"import sys{imports}\nprint(1, flush=True)\nsys.stdin.read()"
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdin is not None
    p.stdout.readline()
    try:
        return private_kib(p.pid) / 1024
    finally:
        p.stdin.close()
        p.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n_lat, n_tp = (60, 200) if args.quick else (300, 1000)
    preload = get_profile("python").preload
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        with SandboxPool(size=4) as pool:
            first_line_ms(pool, tmp / "warmup", 10, warm=True)
            warm = first_line_ms(pool, tmp, n_lat, warm=True)
            mem = idle_child_mib(pool)
            tp, cpu = throughput(pool, tmp, n_tp)
        with SandboxPool(size=0) as cold_pool:
            cold = first_line_ms(cold_pool, tmp, n_lat // 2, warm=False)
        base = subprocess_first_line_ms(preload, n_lat // 2)
        base_tp = subprocess_throughput(n_tp // 4)
        base_cpu = subprocess_cpu_ms(n_lat // 4)
        base_mem = interpreter_mib(preload)
    b50, b99 = pct(base, 50), pct(base, 99)
    for name, xs in (("warm", warm), ("cold", cold), ("subprocess", base)):
        print(f"{name:>10} first line: p50 {pct(xs, 50):.3f} ms  p99 {pct(xs, 99):.3f} ms  n={len(xs)}")
    print(f"throughput: {tp:.0f} sandboxes/s (subprocess.run: {base_tp:.0f}/s)")
    print(f"CPU per sandbox: {cpu:.2f} ms (per subprocess.run: {base_cpu:.2f} ms)")
    print(f"idle child private memory: {mem:.2f} MiB (fresh interpreter: {base_mem:.2f} MiB)")
    sub = "subprocess_run_first_line"
    emit("sandbox", {
        "warm_first_line_p50": metric(pct(warm, 50), "ms", sub + "_p50", b50),
        "warm_first_line_p99": metric(pct(warm, 99), "ms", sub + "_p99", b99),
        "cold_first_line_p50": metric(pct(cold, 50), "ms", sub + "_p50", b50),
        "cold_first_line_p99": metric(pct(cold, 99), "ms", sub + "_p99", b99),
        "throughput": metric(tp, "sandboxes/s", "subprocess_run_per_s", base_tp),
        "cpu_per_sandbox": metric(cpu, "ms", "subprocess_run_cpu", base_cpu),
        "idle_child_private": metric(mem, "MiB", "fresh_interpreter_private", base_mem),
    })


if __name__ == "__main__":
    main()
