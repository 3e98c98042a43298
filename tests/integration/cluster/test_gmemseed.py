"""GMemSeed on the stack: Ready with digest and version; a ComputeJob reading `fromSeed` gets
exactly the generated range; an identical job is a hit; a write through the CLI changes the
digest and makes the same job spec compute again with the new values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from memoplane.cluster import protocol as p
from memoplane.gmem import GMem, GMemParams, Layer, seed_digest

Stack = Any  # the `stack` fixture of this folder's conftest

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
SPEC = {"seed": 1337, "dtype": "float64", "layers": [{"seed": 7, "weight": 0.5}]}
PARAMS = GMemParams(1337, "float64", (Layer(7, 0.5),))
OFFSET, COUNT = 10**15, 200_000
SOURCE = """
def main(noise):
    return {"sum": float(noise.sum()), "n": int(noise.shape[0]), "dtype": str(noise.dtype),
            "head": [float(x) for x in noise[:3]]}
"""


def gmem() -> GMem:
    return GMem(1337, "float64", [Layer(7, 0.5)])


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memoplane.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def seed_manifest(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": p.API_VERSION, "kind": "GMemSeed", "metadata": {"name": name}, "spec": spec}


def job(name: str, seed: str = "field", offset: int = OFFSET, count: int = COUNT) -> dict[str, Any]:
    return {"apiVersion": p.API_VERSION, "kind": "ComputeJob", "metadata": {"name": name},
            "spec": {"python": {"source": SOURCE},
                     "inputs": [{"name": "noise", "fromSeed": {"name": seed, "offset": offset, "count": count}}]}}


def wait_seed(stack: Stack, ns: str, name: str, until: Callable[[dict[str, Any]], bool],
              timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        obj = stack.kube.get(p.GMEMSEEDS, ns, name)
        if obj is not None and until(obj):
            return obj
        if time.monotonic() > deadline:
            raise AssertionError(f"GMemSeed {ns}/{name}: {json.dumps((obj or {}).get('status'), indent=1)}\n"
                                 f"{stack.logs()}")
        time.sleep(0.2)


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    status = obj.get("status") or {}
    if status.get("observedGeneration") != obj["metadata"]["generation"]:
        return {}
    return next((c for c in status.get("conditions") or () if c.get("type") == type_), {})


def ready(obj: dict[str, Any]) -> bool:
    return condition(obj, "Ready").get("status") == "True"


def create_seed(stack: Stack, ns: str, name: str, spec: dict[str, Any]) -> None:
    body = seed_manifest(name, spec)
    body["metadata"]["namespace"] = ns
    assert stack.kube.create(p.GMEMSEEDS, ns, body) is not None


def test_seed_jobs_hits_and_writes(stack: Stack, ns: str) -> None:
    env = stack.cfg.env
    stack.apply(ns, job("early"))  # before the seed exists: it waits for it
    create_seed(stack, ns, "field", SPEC)
    seed = wait_seed(stack, ns, "field", ready)
    assert seed["status"]["digest"] == seed_digest(PARAMS) and seed["status"]["version"] == 0
    assert seed["status"]["overlayEntries"] == 0 and seed["status"].get("overlayBlob") is None

    expected = gmem().fetch_range(OFFSET, COUNT)
    early = stack.wait(ns, "early")["status"]
    assert early["phase"] == "Succeeded", early
    assert early["result"]["value"] == {"sum": float(expected.sum()), "n": COUNT, "dtype": "float64",
                                        "head": expected[:3].tolist()}
    assert early["inputDigests"]["noise"] == seed["status"]["digest"]

    stack.apply(ns, job("again"))
    again = stack.wait(ns, "again")["status"]
    assert again["cached"] is True and again["cacheKey"] == early["cacheKey"]

    # A write through the CLI: applied by the operator before the command returns.
    written = cli("gmem", "write", "field", "-n", ns, f"{OFFSET}=0.5", f"{OFFSET + 2}=0.25", env=env)
    assert written.returncode == 0, written.stderr
    after = json.loads(written.stdout)
    g = gmem()
    g.write_many([OFFSET, OFFSET + 2], [0.5, 0.25])
    assert after["digest"] == seed_digest(PARAMS, g.overlay) != seed["status"]["digest"]
    assert after["overlayEntries"] == 2 and after["version"] == 1 and after["ready"] is True

    stack.apply(ns, job("after-write"))
    recomputed = stack.wait(ns, "after-write")["status"]
    assert recomputed["phase"] == "Succeeded" and recomputed["cached"] is False
    assert recomputed["cacheKey"] != early["cacheKey"]
    new = g.fetch_range(OFFSET, COUNT)
    assert recomputed["result"]["value"]["sum"] == float(new.sum())
    assert recomputed["result"]["value"]["head"] == [0.5, float(expected[1]), 0.25]

    fetched = cli("gmem", "fetch", "field", "-n", ns, "--offset", str(OFFSET - 1), "--count", "4", env=env)
    assert fetched.returncode == 0, fetched.stderr
    assert json.loads(fetched.stdout) == g.fetch_range(OFFSET - 1, 4).tolist()
    stats = json.loads(cli("gmem", "stats", "field", "-n", ns, env=env).stdout)
    assert stats["digest"] == after["digest"] and stats["seed"] == 1337


def test_invalid_and_changed_specs_stall(stack: Stack, ns: str) -> None:
    create_seed(stack, ns, "bits", {"seed": 5, "dtype": "uint64", "layers": [{"seed": 1, "weight": 0.5}]})
    bad = wait_seed(stack, ns, "bits", lambda o: condition(o, "Stalled").get("status") == "True")
    assert "uint64 layers combine by XOR" in condition(bad, "Stalled")["message"]
    assert condition(bad, "Ready")["status"] == "False"

    create_seed(stack, ns, "plain", {"seed": 9})
    wait_seed(stack, ns, "plain", ready)
    written = cli("gmem", "write", "plain", "-n", ns, "3=0.5", env=stack.cfg.env)
    assert written.returncode == 0, written.stderr
    stack.kube.custom.patch_namespaced_custom_object(p.GROUP, p.VERSION, ns, p.GMEMSEEDS, "plain",
                                                     {"spec": {"seed": 10}})
    changed = wait_seed(stack, ns, "plain", lambda o: condition(o, "Stalled").get("status") == "True")
    assert condition(changed, "Stalled")["reason"] == "ParametersChanged"
    # A job reading a seed that is not Ready waits, naming why.
    stack.apply(ns, job("blocked", seed="plain", offset=0, count=10))
    waiting = stack.wait(ns, "blocked", until=lambda o: (o.get("status") or {}).get("reason") == "SeedNotReady")
    assert "restore them, or delete and recreate" in waiting["status"]["message"]
    # Back to the bound parameters: Ready again, with the overlay written before.
    stack.kube.custom.patch_namespaced_custom_object(p.GROUP, p.VERSION, ns, p.GMEMSEEDS, "plain",
                                                     {"spec": {"seed": 9}})
    back = wait_seed(stack, ns, "plain", ready)
    assert back["status"]["overlayEntries"] == 1
    done = stack.wait(ns, "blocked")["status"]
    g = GMem(9)
    g.write(3, 0.5)
    assert done["phase"] == "Succeeded" and done["result"]["value"]["sum"] == float(g.fetch_range(0, 10).sum())


def test_example_and_cli_create(stack: Stack, ns: str, kubectl: Any) -> None:
    kubectl("apply", "-n", ns, "-f", str(EXAMPLES / "gmemseed.yaml"))
    kubectl("wait", "-n", ns, "--for=condition=Ready", "gseed/monte-carlo-noise", "cjob/estimate-pi",
            "--timeout=120s")
    noise = GMem(1337).fetch_range(0, 1_000_000)
    x, y = noise[0::2], noise[1::2]
    value = stack.get(ns, "estimate-pi")["status"]["result"]["value"]
    assert value == {"pi": 4.0 * float(np.mean(x * x + y * y < 1.0)), "samples": 500_000}
    assert abs(value["pi"] - 3.1416) < 0.01

    created = cli("gmem", "create", "other", "-n", ns, "--seed", "3", "--dtype", "uint64", env=stack.cfg.env)
    assert created.returncode == 0, created.stderr
    got = json.loads(created.stdout)
    assert got["ready"] is True and got["digest"] == seed_digest(GMemParams(3, "uint64"))
    fetched = cli("gmem", "fetch", "other", "-n", ns, "--count", "3", env=stack.cfg.env)
    assert json.loads(fetched.stdout) == GMem(3, "uint64").fetch_range(0, 3).tolist()
