"""A 4 GiB input through a job under a 256 MiB memory limit: memory and throughput.

    python bench/stream.py [--quick] [--size GIB]

`memoplane run --json job.py --input data=@FILE --as data=path --memory 256Mi` in a fresh
process (the CLI, which runs the job embedded: the same `execute` an agent runs), against a
filesystem store in $TMPDIR. The input (4 GiB, 2 GiB with --quick) is distinct blake3 output:
nothing deduplicates or compresses, so the store really holds it. The job reads the whole file
by path and returns its crc32 (checked here) and its own peak RSS.

Metrics (same run, side by side):
- run_throughput: input bytes / wall time of the first run (stream the file into the store,
  write it verified into the job's $MEMOPLANE_IN, the job reads it), vs `cat FILE > /dev/null`
  of the same file (page cache warm, best of 2).
- hit_throughput: the same command again, a cache hit (the CLI re-hashes the input to find
  the key; every chunk is already stored), vs the same cat.
- cli_peak_rss / job_peak_rss: peak RSS (getrusage ru_maxrss) of the CLI process and of the
  job, vs the job's 256 MiB limit (ratio < 1: nothing holds the input in memory).
Files are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import blake3

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, metric

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30
LIMIT_MIB = 256
BLOCK = 64 * MiB
JOB = """
import resource
import zlib
def main(data):
    crc, buf = 0, bytearray(1 << 20)
    view = memoryview(buf)
    with open(data, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return [crc, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]
"""
# The CLI in-process, reporting its own peak RSS (not its children's) when it exits.
CLI = """
import atexit, json, resource, sys
atexit.register(lambda: print(json.dumps({"cli_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}),
                              file=sys.stderr))
from memoplane.cli import main
sys.exit(main(sys.argv[1:]))
"""


def make_input(path: Path, size: int) -> int:
    """Write `size` bytes no chunk of which repeats; return their crc32."""
    crc = 0
    with open(path, "wb") as f:
        for i in range(0, size, BLOCK):
            block = blake3.blake3(i.to_bytes(8, "big")).digest(length=min(BLOCK, size - i))
            crc = zlib.crc32(block, crc)
            f.write(block)
    return crc


def cat_seconds(path: Path) -> float:
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        with open(os.devnull, "wb") as null:
            subprocess.run(["cat", str(path)], stdout=null, check=True)
        best = min(best, time.perf_counter() - t)
    return best


def run_job(script: Path, data: Path, store: Path) -> tuple[float, list[int], int]:
    """(wall seconds, the job's [crc32, peak RSS KiB], the CLI's peak RSS KiB)."""
    env = {**os.environ, "MEMOPLANE_STORE": str(store),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CLI, "run", "--json", str(script), "--input", f"data=@{data}",
                           "--as", "data=path", "--memory", f"{LIMIT_MIB}Mi", "--timeout", "3600"],
                          capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"memoplane run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    return seconds, json.loads(proc.stdout)["result"], int(report["cli_maxrss_kib"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 2 GiB input instead of 4 GiB")
    ap.add_argument("--size", type=float, metavar="GIB", help="the input size in GiB (overrides --quick)")
    args = ap.parse_args()
    size = int((args.size or (2 if args.quick else 4)) * GiB)
    work = Path(tempfile.mkdtemp(prefix="memoplane-bench-stream-"))
    try:
        data, script = work / "data.bin", work / "job.py"
        script.write_text(JOB)
        crc = make_input(data, size)
        cat = cat_seconds(data)
        first, (job_crc, job_kib), cli_kib = run_job(script, data, work / "store")
        if job_crc != crc:
            raise SystemExit(f"the job read crc32 {job_crc:#x}, the input has {crc:#x}")
        hit, _, hit_cli_kib = run_job(script, data, work / "store")
        cat_mibs = size / MiB / cat
        metrics: dict[str, dict[str, Any]] = {
            "run_throughput": metric(size / MiB / first, "MiB/s", "cat to /dev/null", cat_mibs),
            "hit_throughput": metric(size / MiB / hit, "MiB/s", "cat to /dev/null", cat_mibs),
            "cli_peak_rss": metric(max(cli_kib, hit_cli_kib) / 1024, "MiB", "job memory limit", LIMIT_MIB),
            "job_peak_rss": metric(job_kib / 1024, "MiB", "job memory limit", LIMIT_MIB),
        }
        print(f"input {size / GiB:g} GiB; first run {first:.1f} s, hit {hit:.1f} s, cat {cat:.2f} s; "
              f"CLI peak RSS {cli_kib / 1024:.0f} MiB (hit run {hit_cli_kib / 1024:.0f} MiB), "
              f"job {job_kib / 1024:.0f} MiB, limit {LIMIT_MIB} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)  # before the last line: GiBs of input must not outlive the run
    emit("stream", metrics)


if __name__ == "__main__":
    main()
