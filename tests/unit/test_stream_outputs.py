"""A job's output file larger than its memory limit: it stays on the job's /out (capped by
max_output_bytes, not memory_bytes) and the host streams it into the store. The CLI's own peak
RSS is measured (VmHWM of that process alone) to show it never held the output."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from memoplane.cas import FilesystemBackend, Store

SIZE = 300 * 10**6   # bytes: twice the job's 150 MiB and more than the CLI's whole peak RSS
# The CLI in-process, reporting its own peak RSS (not its children's) on stderr when it exits: VmHWM, the
# peak of this program's memory. (Not getrusage's ru_maxrss: Linux carries it across exec, so it counted
# the pytest process the CLI was forked from, which after a memory-hungry test module is the larger.)
CLI = """
import atexit, json, sys
def peak_kib():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1])
atexit.register(lambda: print(json.dumps({"peak_rss_kib": peak_kib()}), file=sys.stderr))
from memoplane.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_output_twice_the_memory_limit_is_stored_streaming(tmp_path: Path) -> None:
    store_dir, restored = tmp_path / "store", tmp_path / "restored"
    write = f'head -c {SIZE} /dev/urandom | tee "$MEMOPLANE_OUT/big.bin" | sha256sum'
    proc = subprocess.run([sys.executable, "-c", CLI, "run", "--json", "--memory", "150Mi", "--max-output", "400M",
                           "--timeout", "600", "--", "sh", "-c", write],
                          capture_output=True, text=True, env={**os.environ, "MEMOPLANE_STORE": str(store_dir)},
                          timeout=900)
    assert proc.returncode == 0, proc.stderr
    run = json.loads(proc.stdout)
    peak = json.loads(proc.stderr.strip().splitlines()[-1])["peak_rss_kib"] * 1024
    assert peak < SIZE * 2 // 3, f"the CLI peaked at {peak} bytes for a {SIZE}-byte output"
    with Store(FilesystemBackend(store_dir)) as store:
        hit = store.get_ref(run["cache_key"])
        assert hit is not None and hit.result.output_tree is not None
        assert store.get_tree(hit.result.output_tree.digest).entries["big.bin"].size == SIZE
        store.materialize(hit.result.output_tree.digest, restored)
        stdout = store.get_bytes(hit.result.stdout.digest).decode()
    sha = hashlib.sha256()
    with open(restored / "big.bin", "rb") as f:
        while block := f.read(1 << 20):
            sha.update(block)
    assert stdout.split()[0] == sha.hexdigest()
