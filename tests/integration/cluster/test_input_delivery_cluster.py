"""spec.inputs[i].as on the cluster: the operator resolves the delivery into the job manifest, the
agent's sandbox hands the code a path or an open file, and each delivery is its own cache key.
Real API server, MinIO, operator and agents."""

from __future__ import annotations

import hashlib
import io
import uuid
from typing import Any

import numpy as np
import pytest
from conftest import NODES, OPEN_PREFIX
from test_object_inputs_cluster import INPUTS_BUCKET, put_object

from memoplane.api.specs import computejob_manifest
from memoplane.cluster import protocol as p
from memoplane.testing import processes

pytestmark = pytest.mark.integration
Stack = Any  # conftest.Stack (fixture `stack`)

DESCRIBE = """
import os
def main(t):
    if isinstance(t, bytes):
        return ["bytes", t.decode()]
    if isinstance(t, str):
        return ["path", t.startswith(os.environ["MEMOPLANE_IN"]), open(t).read()]
    return ["file", t.read().decode()]
"""


def delivery_job(name: str, key: str, version: str, delivery: str | None) -> dict[str, Any]:
    item: dict[str, Any] = {"name": "t", "fromObject": {"bucket": INPUTS_BUCKET, "key": key}}
    if delivery is not None:
        item["as"] = delivery
    return computejob_manifest(name, None, {"python": {"source": DESCRIBE, "entrypoint": "main"},
                                            "inputs": [item], "cache": {"version": version}})


def test_each_delivery_reaches_the_code_on_an_agent_under_its_own_key(stack: Stack, ns: str) -> None:
    key, version = OPEN_PREFIX + f"delivery-{uuid.uuid4().hex}.txt", uuid.uuid4().hex
    put_object(stack, key, b"abc")
    names = {"bytes": "as-bytes", "path": "as-path", "file": "as-file", None: "as-default"}
    stack.apply(ns, *(delivery_job(name, key, version, d) for d, name in names.items()))
    done = stack.wait_all(ns, list(names.values()))
    status = {name: done[name].get("status") or {} for name in names.values()}
    assert all(s.get("phase") == p.SUCCEEDED for s in status.values()), status
    values = {name: s["result"]["value"] for name, s in status.items()}
    assert values == {"as-bytes": ["bytes", "abc"], "as-path": ["path", True, "abc"], "as-file": ["file", "abc"],
                      "as-default": ["bytes", "abc"]}
    keys = {name: s.get("cacheKey") for name, s in status.items()}
    assert keys["as-bytes"] == keys["as-default"]
    assert len({keys["as-bytes"], keys["as-path"], keys["as-file"]}) == 3


HASH_PATH = """
import hashlib
def main(t):
    digest = hashlib.sha256()
    with open(t, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
"""


def big_job(name: str, key: str, source: str, delivery: str) -> dict[str, Any]:
    return computejob_manifest(name, None, {
        "python": {"source": source, "entrypoint": "main"},
        "inputs": [{"name": "t", "fromObject": {"bucket": INPUTS_BUCKET, "key": key}, "as": delivery}],
        "resources": {"memory": "150Mi"}, "cache": {"version": uuid.uuid4().hex}, "backoffLimit": 0})


def test_a_200_mb_object_streams_as_path_under_150_mib_on_an_agent_and_fails_as_bytes(stack: Stack, ns: str) -> None:
    data = b"".join(hashlib.shake_256(i.to_bytes(4, "big")).digest(1 << 20) for i in range(191))  # 200.3 MB
    key = OPEN_PREFIX + f"big-{uuid.uuid4().hex}.bin"
    put_object(stack, key, data)
    before = {node: reset_peak_rss(stack, node) for node in NODES}   # peaks from here on, not from earlier tests
    stack.apply(ns, big_job("big-path", key, HASH_PATH, "path"),
                big_job("big-bytes", key, "def main(t):\n    return len(t)\n", "bytes"))
    done = stack.wait_all(ns, ["big-path", "big-bytes"], timeout=400)
    status = done["big-path"].get("status") or {}
    assert status.get("phase") == p.SUCCEEDED, status
    assert status["result"]["value"] == hashlib.sha256(data).hexdigest()
    failed = done["big-bytes"].get("status") or {}
    assert failed.get("phase") == p.FAILED, failed
    assert "loaded whole as bytes" in str(failed.get("failure")), failed
    # The agent wrote the input into the job's $MEMOPLANE_IN window by window: no agent ever held it.
    # (What an agent already held, its heap after the tests before this one, is not the input's.)
    grown = {node: agent_peak_rss(stack, node) - before[node] for node in NODES}
    assert all(growth < len(data) // 2 for growth in grown.values()), (grown, before)


def reset_peak_rss(stack: Stack, node: str) -> int:
    """Reset the agent process's VmHWM to its current RSS (proc(5): clear_refs, value 5); that RSS, in bytes."""
    with open(f"/proc/{stack.proc(processes.AGENT_PREFIX + node).pid}/clear_refs", "w") as f:
        f.write("5")
    return agent_peak_rss(stack, node)


def agent_peak_rss(stack: Stack, node: str) -> int:
    """The agent process's peak resident memory since it started or reset_peak_rss (VmHWM), in bytes."""
    with open(f"/proc/{stack.proc(processes.AGENT_PREFIX + node).pid}/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


MAPPED = """
def main(t):
    return [type(t).__name__, t.flags.writeable, float(t.sum())]
"""


def test_a_npy_object_as_mmap_is_a_read_only_array_on_an_agent(stack: Stack, ns: str) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.arange(1000, dtype=np.float64))
    key = OPEN_PREFIX + f"mapped-{uuid.uuid4().hex}.npy"
    put_object(stack, key, buffer.getvalue())
    stack.apply(ns, big_job("as-mmap", key, MAPPED, "mmap"))
    status = stack.wait(ns, "as-mmap").get("status") or {}
    assert status.get("phase") == p.SUCCEEDED, status
    assert status["result"]["value"] == ["memmap", False, 499500.0]
