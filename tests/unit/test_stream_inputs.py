"""File inputs a Python job declares `as: path` or `as: file`: the code streams them, so an input
larger than the job's memory limit works; `as: bytes` (the default) loads it and fails clearly.
Real sandbox runs against a real filesystem store."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from memoplane.cas import FilesystemBackend, Store
from memoplane.chunkmap import leaf_job
from memoplane.execute import execute
from memoplane.jobs import BlobInput, Job, PythonCode, job_from_dict, job_to_dict
from memoplane.keys import explain_change
from memoplane.sandbox import Limits, SandboxPool
from memoplane.sandbox.types import Delivery, MiB

BIG = 200 * 10**6   # bytes: more than the 150 MiB the job may use
LIMITS = Limits(timeout_s=120, memory_bytes=150 * MiB)
HASH_PATH = """
import hashlib
def main(data):
    digest = hashlib.sha256()
    with open(data, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return [type(data).__name__, digest.hexdigest()]
"""
HASH_FILE = """
import hashlib
def main(data):
    digest = hashlib.sha256()
    while block := data.read(1 << 20):
        digest.update(block)
    return [type(data).__name__, digest.hexdigest()]
"""
HASH_BYTES = """
import hashlib
def main(data):
    return ["bytes", hashlib.sha256(data).hexdigest()]
"""


@pytest.fixture(scope="module")
def pool() -> Iterator[SandboxPool]:
    with SandboxPool(size=1) as p:
        yield p


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, BlobInput, str]:
    """A 200 MB input in a store (distinct 1 MiB blocks: nothing deduplicates) and its sha256."""
    root = tmp_path_factory.mktemp("stream")
    path, digest = root / "big.bin", hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(BIG // MiB + 1):
            block = hashlib.shake_256(i.to_bytes(4, "big")).digest(MiB)[: BIG - i * MiB]
            f.write(block)
            digest.update(block)
    store = Store(FilesystemBackend(root / "store"))
    ref = store.put_file(path)
    path.unlink()
    return store, BlobInput(ref.digest, ref.size), digest.hexdigest()


def _job(source: str, blob: BlobInput, delivery: Delivery) -> Job:
    return Job(PythonCode(source, filename="job.py"), inputs={"data": replace(blob, delivery=delivery)},
               limits=LIMITS)


def test_a_file_over_the_memory_limit_streams_by_path(pool: SandboxPool, big: tuple[Store, BlobInput, str]) -> None:
    store, blob, sha = big
    assert blob.size == BIG > LIMITS.memory_bytes
    run = execute(_job(HASH_PATH, blob, "path"), store, pool)
    assert run.outcome.ok, run.failure
    assert run.outcome.value == ["str", sha]


def test_a_file_over_the_memory_limit_streams_as_an_open_file(
        pool: SandboxPool, big: tuple[Store, BlobInput, str]) -> None:
    store, blob, sha = big
    run = execute(_job(HASH_FILE, blob, "file"), store, pool)
    assert run.outcome.ok, run.failure
    assert run.outcome.value == ["BufferedReader", sha]


def test_the_same_file_as_bytes_fails_on_memory(pool: SandboxPool, big: tuple[Store, BlobInput, str]) -> None:
    store, blob, _ = big
    run = execute(_job(HASH_BYTES, blob, "bytes"), store, pool)
    assert not run.outcome.ok and run.failure is not None
    assert run.failure.reason == "memory", run.failure
    assert "file input 'data' (200000000 bytes) is loaded whole as bytes" in run.failure.message
    assert "--as data=path" in run.failure.message
    assert run.result is None


def test_a_path_input_is_read_only(pool: SandboxPool, tmp_path: Path) -> None:
    store = Store(FilesystemBackend(tmp_path / "store"))
    ref = store.put_bytes(b"original")
    source = ("def main(data):\n    try:\n        open(data, 'ab').write(b'x')\n    except OSError as e:\n"
              "        return ['refused', open(data, 'rb').read().decode()]\n    return ['written']\n")
    run = execute(_job(source, BlobInput(ref.digest, ref.size), "path"), store, pool)
    assert run.outcome.ok, run.failure
    assert run.outcome.value == ["refused", "original"]


def test_small_inputs_reach_the_code_as_declared(pool: SandboxPool, tmp_path: Path) -> None:
    store = Store(FilesystemBackend(tmp_path / "store"))
    ref = store.put_bytes(b"abc")
    blob = BlobInput(ref.digest, ref.size)
    source = ("import os\ndef main(data):\n    if isinstance(data, bytes):\n        return ['bytes', data.decode()]\n"
              "    if isinstance(data, str):\n        return ['path', data.startswith(os.environ['MEMOPLANE_IN']),"
              " open(data).read()]\n    return ['file', data.mode, data.read().decode()]\n")
    got = {d: execute(_job(source, blob, d), store, pool).outcome.value for d in ("bytes", "path", "file")}
    assert got == {"bytes": ["bytes", "abc"], "path": ["path", True, "abc"], "file": ["file", "rb", "abc"]}


def test_the_delivery_is_part_of_the_key_and_bytes_keeps_the_old_key() -> None:
    blob = BlobInput("b3:" + "ab" * 32, 3)
    keys = {d: _job(HASH_PATH, blob, d).key for d in ("bytes", "path", "file")}
    assert len(set(keys.values())) == 3
    assert _job(HASH_PATH, blob, "bytes").key_parts().inputs == {"data": "blob:" + blob.digest}


def test_explain_names_a_changed_delivery() -> None:
    blob = BlobInput("b3:" + "ab" * 32, 3)
    before, after = (_job(HASH_PATH, blob, d).key_parts().components() for d in ("bytes", "path"))
    assert explain_change(before, after) == ["inputs.data changed: blob:b3:abababababab -> blob-path:b3:abababababab"]


def test_the_job_manifest_carries_the_delivery() -> None:
    job = _job(HASH_PATH, BlobInput("b3:" + "ab" * 32, 3), "file")
    data = job_to_dict(job)
    assert data["inputs"]["data"]["blob"]["as"] == "file"
    assert job_from_dict(json.loads(json.dumps(data))).key == job.key
    legacy = _job(HASH_PATH, BlobInput("b3:" + "ab" * 32, 3), "bytes")
    assert "as" not in job_to_dict(legacy)["inputs"]["data"]["blob"]   # manifests of old agents read the same
    data["inputs"]["data"]["blob"]["as"] = "copy"
    with pytest.raises(ValueError, match="delivery 'copy'"):
        job_from_dict(data)


def _cli(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MEMOPLANE_STORE": str(store)}
    return subprocess.run([sys.executable, "-m", "memoplane.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_as_path(tmp_path: Path) -> None:
    script, data = tmp_path / "job.py", tmp_path / "data.bin"
    script.write_text(HASH_PATH)
    data.write_bytes(b"hello")
    store = tmp_path / "store"
    proc = _cli(store, "run", "--json", str(script), "--input", f"data=@{data}", "--as", "data=path")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["result"] == ["str", hashlib.sha256(b"hello").hexdigest()]
    refused = _cli(store, "run", str(script), "--input", "data=[1]", "--as", "data=path")
    assert refused.returncode != 0 and "there is no file input 'data'" in refused.stderr


def test_each_chunk_of_an_over_chunks_map_arrives_as_the_whole_input_was_declared() -> None:
    whole = _job(HASH_PATH, BlobInput("b3:" + "ab" * 32, 3), "path")
    leaf = leaf_job(whole, "data", BlobInput("b3:" + "cd" * 32, 1))
    assert leaf.inputs["data"] == BlobInput("b3:" + "cd" * 32, 1, "path")


def test_submit_puts_as_on_the_file_input(tmp_path: Path) -> None:
    script, data = tmp_path / "job.py", tmp_path / "data.bin"
    script.write_text(HASH_FILE)
    data.write_bytes(b"hello")
    proc = _cli(tmp_path / "store", "submit", str(script), "--input", f"data=@{data}", "--as", "data=file",
                "--dry-run", "-n", "ml")
    assert proc.returncode == 0, proc.stderr
    (item,) = json.loads(proc.stdout)["spec"]["inputs"]
    assert item["as"] == "file" and set(item) == {"name", "fromConfigMap", "as"}
