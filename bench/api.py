"""`memoplane serve` through the official E2B SDK, against a process per request, in one run.

- create -> first command output: `Sandbox.create()` then `commands.run("echo hi")` over HTTP
  (warm pool), p50 and p99; baseline: `memoplane run --policy Bypass -- echo hi`, a process
  that starts its own cold sandbox (what an agent without the daemon pays per command).
- /v1/run cache hit: the server's own time (`duration_ms`) and the client's wall time;
  baseline: the same hit as a `memoplane run` command.
- sandboxes created (and killed) per second through the API, one client; baseline: the
  `memoplane run` commands per second.

    python bench/api.py [--quick]
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

import httpx
from e2b import Sandbox

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, metric

SOURCE = "def main(n):\n    return sum(range(n))\n"
# Issue 16's targets: each metric that has one says in the JSON whether this run met it.
TARGETS = {"create_to_first_output_p50_seconds": 0.020, "create_to_first_output_p99_seconds": 0.060,
           "v1_run_hit_server_seconds": 0.005}


def with_targets(metrics: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    for name, target in TARGETS.items():
        metrics[name].update(target=target, meets_target=metrics[name]["value"] <= target)
    return metrics


def loadavg() -> str:
    """The machine's load (1, 5 and 15 min): others' work shares the cores with this run."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def start_server(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "memoplane.cli", "serve", "--port", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=open(log, "wb"), text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"memoplane serve did not start: {line!r}; see {log}")
    url = line.split("listening on ")[1].split()[0]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health").status_code == 204:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("memoplane serve did not answer /health within 60 s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cli(env: dict[str, str], *args: str) -> tuple[float, dict[str, Any]]:
    t = time.perf_counter()
    # --daemon never: the baseline is a process that starts its own sandbox, even with serve running
    proc = subprocess.run([sys.executable, "-m", "memoplane.cli", "run", "--json", "--daemon", "never", *args],
                          env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - t, json.loads(proc.stdout)


def create_to_output(opts: dict[str, str]) -> tuple[float, Sandbox]:
    t = time.perf_counter()
    sandbox = Sandbox.create(**opts)  # type: ignore[arg-type]
    first: list[float] = []
    sandbox.commands.run("echo hi", on_stdout=lambda _: first.append(time.perf_counter()))
    return first[0] - t, sandbox


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    rounds = 8 if parser.parse_args().quick else 40
    load_before = loadavg()
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "MEMOPLANE_STORE": f"{home}/store", "MEMOPLANE_KEYS_DIR": f"{home}/keys"}
        script = Path(home) / "job.py"
        script.write_text(SOURCE)
        proc, url = start_server(env, Path(home) / "serve.log")
        opts = {"api_url": url, "sandbox_url": url, "api_key": "local"}
        try:
            create_to_output(opts)[1].kill()   # warm up both sides once
            cli(env, "--policy", "Bypass", "--", "echo", "hi")
            api_first, process_first, api_hit, api_hit_server, process_hit = [], [], [], [], []
            body = {"code": SOURCE, "inputs": {"n": 1000}}
            httpx.post(url + "/v1/run", json=body, timeout=120)   # the miss that the hits serve
            with httpx.Client(timeout=120) as client:
                for _ in range(rounds):
                    seconds, sandbox = create_to_output(opts)
                    api_first.append(seconds)
                    sandbox.kill()
                    process_first.append(cli(env, "--policy", "Bypass", "--", "echo", "hi")[0])
                    t = time.perf_counter()
                    out = client.post(url + "/v1/run", json=body).json()
                    api_hit.append(time.perf_counter() - t)
                    assert out["cached"] is True
                    api_hit_server.append(out["duration_ms"] / 1000)
                    process_hit.append(cli(env, str(script), "-i", "n=1000")[0])
            t = time.perf_counter()
            for _ in range(rounds):
                Sandbox.create(**opts).kill()  # type: ignore[arg-type]
            api_rate = rounds / (time.perf_counter() - t)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    process_rate = 1 / statistics.median(process_first)
    p50, p99, base50, base99 = (percentile(api_first, 0.5), percentile(api_first, 0.99),
                                percentile(process_first, 0.5), percentile(process_first, 0.99))
    print(f"create -> first output: p50 {p50 * 1000:.1f} ms p99 {p99 * 1000:.1f} ms; process per request: "
          f"p50 {base50 * 1000:.1f} ms p99 {base99 * 1000:.1f} ms")
    print(f"/v1/run hit: server {statistics.median(api_hit_server) * 1000:.2f} ms, client "
          f"{statistics.median(api_hit) * 1000:.2f} ms; memoplane run hit {statistics.median(process_hit) * 1000:.1f} ms")
    print(f"sandboxes/s through the API {api_rate:.1f}; memoplane run commands/s {process_rate:.1f}")
    print(f"load average before {load_before}, after {loadavg()}")
    emit("api", with_targets({
        "create_to_first_output_p50_seconds": metric(p50, "s", "process_per_request_p50_seconds", base50),
        "create_to_first_output_p99_seconds": metric(p99, "s", "process_per_request_p99_seconds", base99),
        "v1_run_hit_server_seconds": metric(statistics.median(api_hit_server), "s", "memoplane_run_hit_seconds",
                                            statistics.median(process_hit)),
        "v1_run_hit_client_seconds": metric(statistics.median(api_hit), "s", "memoplane_run_hit_seconds",
                                            statistics.median(process_hit)),
        "sandboxes_per_second": metric(api_rate, "1/s", "memoplane_run_commands_per_second", process_rate),
    }))


if __name__ == "__main__":
    main()
