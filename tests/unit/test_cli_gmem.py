"""`memoplane gmem`: create, fetch, write (durable across processes), stats, compact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from memoplane.gmem import GMem


def gmem(store: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "memoplane.cli", "gmem", *args], capture_output=True, text=True,
                          env={**os.environ, "MEMOPLANE_STORE": str(store)}, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


def test_values_match_the_engine_and_writes_persist(tmp_path: Path) -> None:
    created = json.loads(gmem(tmp_path, "create", "field", "--seed", "1337").stdout)
    assert created["overlayEntries"] == 0 and created["seed"] == 1337
    fetched = json.loads(gmem(tmp_path, "fetch", "field", "--offset", "100", "--count", "5").stdout)
    assert fetched == GMem(1337).fetch_range(100, 5).tolist()
    after = json.loads(gmem(tmp_path, "write", "field", "101=0.25", "0x66=0.75").stdout)
    assert after["overlayEntries"] == 2 and after["digest"] != created["digest"]
    values = json.loads(gmem(tmp_path, "fetch", "field", "--offset", "100", "--count", "3").stdout)
    assert values[1:] == [0.25, 0.75] and values[0] == fetched[0]
    compacted = json.loads(gmem(tmp_path, "compact", "field").stdout)
    assert compacted["digest"] == after["digest"] and compacted["version"] == 1
    assert json.loads(gmem(tmp_path, "stats", "field").stdout)["overlayEntries"] == 2


def test_fetch_to_a_numpy_file(tmp_path: Path) -> None:
    gmem(tmp_path, "create", "u", "--seed", "7", "--dtype", "uint64")
    out = tmp_path / "v.npy"
    gmem(tmp_path, "fetch", "u", "--count", "20000", "--out", str(out))
    np.testing.assert_array_equal(np.load(out), GMem(7, "uint64").fetch_range(0, 20000))


def test_errors_name_the_fix(tmp_path: Path) -> None:
    missing = gmem(tmp_path, "fetch", "nope", check=False)
    assert missing.returncode == 4 and "memoplane gmem create nope" in missing.stderr
    gmem(tmp_path, "create", "f", "--seed", "1")
    rebound = gmem(tmp_path, "create", "f", "--seed", "2", check=False)
    assert rebound.returncode == 2 and "other parameters" in rebound.stderr
    bad = gmem(tmp_path, "write", "f", "12", check=False)
    assert bad.returncode == 2 and "ADDR=VALUE" in bad.stderr
    many = gmem(tmp_path, "fetch", "f", "--count", "20000", check=False)
    assert many.returncode == 2 and "--out" in many.stderr


def test_run_with_a_seed_input_recomputes_after_a_write(tmp_path: Path) -> None:
    script = tmp_path / "mc.py"
    script.write_text("def main(noise):\n    return {'sum': float(noise.sum()), 'first': float(noise[0])}\n")
    gmem(tmp_path, "create", "field", "--seed", "1337", "--layer", "7:0.5")

    def run() -> dict:
        proc = subprocess.run([sys.executable, "-m", "memoplane.cli", "run", "--json", str(script),
                               "--input", "noise=@seed:field:1000:50000"], capture_output=True, text=True,
                              env={**os.environ, "MEMOPLANE_STORE": str(tmp_path)}, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    from memoplane.gmem import Layer

    g = GMem(1337, "float64", [Layer(7, 0.5)])
    first = run()
    assert first["cached"] is False and first["result"]["sum"] == float(g.fetch_range(1000, 50000).sum())
    assert run()["cached"] is True
    gmem(tmp_path, "write", "field", "1000=0.5")
    g.write(1000, 0.5)
    after = run()
    assert after["cached"] is False and after["cache_key"] != first["cache_key"]
    assert after["result"] == {"sum": float(g.fetch_range(1000, 50000).sum()), "first": 0.5}
    bad = subprocess.run([sys.executable, "-m", "memoplane.cli", "run", str(script), "--input", "noise=@seed:field:x"],
                         capture_output=True, text=True, env={**os.environ, "MEMOPLANE_STORE": str(tmp_path)})
    assert bad.returncode == 2 and "@seed:NAME:OFFSET:COUNT" in bad.stderr
