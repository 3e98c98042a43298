"""/v1/run hit on Kubernetes (issue 16): the API as the chart runs it (`memoplane serve` with
MEMOPLANE_SERVE_NAMESPACE, sandboxes and ComputeJobs on a private stack on the local control
plane), against the embedded `memoplane serve` hit of the same call, interleaved in one run.

- server time (`duration_ms`) of a hit, median of back-to-back calls (the ResultCache, its trust
  policy and the agents' runtime reused, the store kept open); target 5 ms.
- the same after more than KEPT_SECONDS without a call (what a hit costs when it reads them again).
- baseline: the embedded server's hit of the same body (its team store on a filesystem).

    python bench/api_cluster.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cluster import stack
from _common import emit, metric
from api import TARGETS, loadavg, start_server

from memoplane.server.apikeys import ApiKeys
from memoplane.server.cluster_runs import KEPT_SECONDS
from memoplane.testing import processes

SOURCE = "def main(n):\n    return sum(range(n))\n"
TARGET = TARGETS["v1_run_hit_server_seconds"]


def hit_ms(client: httpx.Client, url: str, body: dict[str, Any], headers: dict[str, str]) -> float:
    answer = client.post(url, json=body, headers=headers)
    answer.raise_for_status()
    out = answer.json()
    assert out["cached"] is True, out
    return float(out["duration_ms"]) / 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    quick = parser.parse_args().quick
    rounds, spaced_rounds = (20, 2) if quick else (100, 5)
    load_before = loadavg()
    body = {"code": SOURCE, "inputs": {"n": 1000}}
    with stack("apihit") as bench, tempfile.TemporaryDirectory() as home:
        keys = ApiKeys(Path(home) / "apikeys.json")
        _, token = keys.create("alpha", ["run"], tier="large", namespaces=[bench.ns])   # 100 hits: over "standard"'s burst
        cluster_url = processes.start_api(bench.cfg, api_keys=keys.path).url("http", "/v1/run")
        env = {"MEMOPLANE_STORE": f"{home}/store", "MEMOPLANE_KEYS_DIR": f"{home}/keys"}
        proc, embedded = start_server({**os.environ, **env}, Path(home) / "serve.log")
        auth = {"X-API-KEY": token}
        try:
            with httpx.Client(timeout=300) as client:
                first = client.post(cluster_url, json=body, headers=auth).json()   # the miss: a ComputeJob
                assert first["cached"] is False and first["computejob"], first
                client.post(embedded + "/v1/run", json=body).raise_for_status()
                cluster_hits, embedded_hits, spaced = [], [], []
                for _ in range(rounds):
                    cluster_hits.append(hit_ms(client, cluster_url, body, auth))
                    embedded_hits.append(hit_ms(client, embedded + "/v1/run", body, {}))
                for _ in range(spaced_rounds):
                    time.sleep(KEPT_SECONDS + 0.2)
                    spaced.append(hit_ms(client, cluster_url, body, auth))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    cluster_s, embedded_s, spaced_s = (statistics.median(v) for v in (cluster_hits, embedded_hits, spaced))
    print(f"/v1/run hit server time: Kubernetes {cluster_s * 1000:.2f} ms (p90 "
          f"{sorted(cluster_hits)[int(0.9 * (rounds - 1))] * 1000:.2f} ms), after {KEPT_SECONDS:.0f}+ s idle "
          f"{spaced_s * 1000:.2f} ms; embedded serve {embedded_s * 1000:.2f} ms ({rounds} hits each, interleaved)")
    print(f"load average before {load_before}, after {loadavg()}")
    emit("api_cluster", {
        "cluster_v1_run_hit_server_seconds": {**metric(cluster_s, "s", "embedded_v1_run_hit_server_seconds",
                                                       embedded_s), "target": TARGET, "meets_target": cluster_s <= TARGET},
        "cluster_v1_run_hit_after_idle_server_seconds": metric(spaced_s, "s", "embedded_v1_run_hit_server_seconds",
                                                               embedded_s),
    })


if __name__ == "__main__":
    main()
