"""File inputs a Python job declares `as: mmap`: mapped read-only into the sandbox, so a .npy
larger than the job's memory limit is an array it can read whole, while its own allocations stay
under the limit. Real sandbox runs against a real filesystem store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from memoplane.cas import FilesystemBackend, Store
from memoplane.execute import execute
from memoplane.jobs import BlobInput, Job, JsonInput, PythonCode, job_from_dict, job_to_dict
from memoplane.sandbox import Limits, SandboxPool
from memoplane.sandbox.types import MiB

COUNT = 300 * 10**6 // 8   # float64 values: a 300 MB array, twice the job's 150 MiB
# max_output_bytes small: the memory cgroup (memory + outputs) is then ~166 MiB too.
LIMITS = Limits(timeout_s=180, memory_bytes=150 * MiB, max_output_bytes=16 * MiB)
SUM_ALL = """
import os
import numpy as np
def main(table):
    # Drop the file's cached pages first: the job's reads then fault them in, charged to its own
    # memory cgroup (~166 MiB here, under the 300 MB it reads), which must reclaim, not kill.
    fd = os.open(table.filename, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    total = 0.0
    for start in range(0, len(table), 1 << 22):   # every page of the mapping is read
        total += float(table[start:start + (1 << 22)].sum())
    return [type(table).__name__, str(table.dtype), len(table), table.flags.writeable, total]
"""
ALLOCATE = """
import numpy as np
def main(table, mib):
    first = float(table[0])
    own = np.ones(mib * (1 << 20) // 8)   # the job's own memory, anonymous
    return [first, float(own.sum())]
"""
RAW = """
def main(data):
    try:
        data[0] = 0
    except TypeError:
        return [type(data).__name__, len(data), bytes(data[:5]).decode(), "read-only"]
    return ["written"]
"""


@pytest.fixture(scope="module")
def pool() -> Iterator[SandboxPool]:
    with SandboxPool(size=1) as p:
        yield p


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, BlobInput]:
    """A 300 MB .npy (0, 1, 2, ...) in a store."""
    root = tmp_path_factory.mktemp("mmap")
    path = root / "table.npy"
    np.save(path, np.arange(COUNT, dtype=np.float64))
    store = Store(FilesystemBackend(root / "store"))
    ref = store.put_file(path)
    path.unlink()
    return store, BlobInput(ref.digest, ref.size, "mmap")


def _job(source: str, blob: BlobInput, **inputs: object) -> Job:
    return Job(PythonCode(source, filename="job.py"), limits=LIMITS,
               inputs={"table": blob, **{n: JsonInput(v) for n, v in inputs.items()}})


def test_a_npy_twice_the_memory_limit_is_mapped_and_read_whole(
        pool: SandboxPool, table: tuple[Store, BlobInput]) -> None:
    store, blob = table
    assert blob.size > 2 * LIMITS.memory_bytes - 20 * MiB
    run = execute(_job(SUM_ALL, blob), store, pool)
    assert run.outcome.ok, run.failure
    assert run.outcome.value == ["memmap", "float64", COUNT, False, float(COUNT * (COUNT - 1) // 2)]


def test_the_same_npy_as_bytes_dies_on_memory(pool: SandboxPool, table: tuple[Store, BlobInput]) -> None:
    store, blob = table
    run = execute(_job(SUM_ALL, replace(blob, delivery="bytes")), store, pool)
    assert not run.outcome.ok and run.failure is not None
    assert run.failure.reason == "memory", run.failure
    assert "--as table=mmap" in run.failure.message


def test_a_job_with_a_mapped_input_still_dies_allocating_over_its_limit(
        pool: SandboxPool, table: tuple[Store, BlobInput]) -> None:
    store, blob = table
    under = execute(_job(ALLOCATE, blob, mib=100), store, pool)
    assert under.outcome.ok, under.failure
    assert under.outcome.value == [0.0, float(100 * MiB // 8)]
    # 200 MiB of its own is over 150 MiB, though far under 150 MiB + the 300 MB mapping.
    over = execute(_job(ALLOCATE, blob, mib=200), store, pool)
    assert not over.outcome.ok and over.failure is not None
    assert over.failure.reason == "memory", over.failure


def test_a_file_that_is_not_npy_is_a_read_only_mmap(pool: SandboxPool, tmp_path: Path) -> None:
    store = Store(FilesystemBackend(tmp_path / "store"))
    ref = store.put_bytes(b"hello, mapped world")
    run = execute(Job(PythonCode(RAW.replace("table", "data"), filename="job.py"), limits=LIMITS,
                      inputs={"data": BlobInput(ref.digest, ref.size, "mmap")}), store, pool)
    assert run.outcome.ok, run.failure
    assert run.outcome.value == ["mmap", 19, "hello", "read-only"]


def test_mmap_is_its_own_key_entry_and_travels_in_the_manifest() -> None:
    blob = BlobInput("b3:" + "ab" * 32, 3, "mmap")
    job = _job(SUM_ALL, blob)
    assert job.key_parts().inputs == {"table": "blob-mmap:" + blob.digest}
    assert job.key != _job(SUM_ALL, replace(blob, delivery="path")).key
    data = job_to_dict(job)
    assert data["inputs"]["table"]["blob"]["as"] == "mmap"
    assert job_from_dict(json.loads(json.dumps(data))).key == job.key


def test_cli_as_mmap(tmp_path: Path) -> None:
    script, data = tmp_path / "job.py", tmp_path / "table.npy"
    script.write_text(SUM_ALL)
    np.save(data, np.arange(10, dtype=np.float64))
    env = {**os.environ, "MEMOPLANE_STORE": str(tmp_path / "store")}
    proc = subprocess.run([sys.executable, "-m", "memoplane.cli", "run", "--json", str(script),
                           "--input", f"table=@{data}", "--as", "table=mmap"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["result"] == ["memmap", "float64", 10, False, 45.0]
