"""Issue 9's attacks as ComputeJobs, run by the agents on the local control plane.

The agents are root processes on this machine holding the store's keys: the
output race once returned their environment (the S3 keys) and host files as
job outputs; an output cap was only checked after the disk had filled."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from memoplane.api.specs import computejob_manifest

pytestmark = pytest.mark.integration
Stack = Any  # conftest.Stack (fixture `stack`)

# Finding 1, as in tests/hostile/test_outputs.py (see the file's docstring).
RACE = (Path(__file__).parents[2] / "attacks" / "output_race.py").read_text()


def _job(name: str, source: str, inputs: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return computejob_manifest(name, None, {
        "python": {"source": source, "entrypoint": "main"},
        "inputs": [{"name": k, "value": v} for k, v in inputs.items()],
        "cache": {"version": uuid.uuid4().hex[:12]}, "backoffLimit": 0, **spec})


def _everything(stack: Stack, ns: str, obj: dict[str, Any]) -> str:
    """The job's status plus every file of its stored result."""
    s = obj.get("status") or {}
    parts = [json.dumps(s)]
    digest = (s.get("result") or {}).get("digest")
    if digest:
        store = stack.store(ns)
        result = store.get_result(digest)
        if result.output_tree is not None:
            tree = store.get_tree(result.output_tree.digest)
            for rel, entry in tree.entries.items():
                assert entry.digest is not None, f"a link was stored: {rel} -> {entry}"
                parts.append(store.get_bytes(entry.digest).decode("utf-8", "replace"))
    return "\n".join(parts)


def test_output_race_never_returns_host_files_or_agent_secrets(stack: Stack, ns: str, tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "f0").write_text("NODE-SECRET-e41c")
    (private / "f0").chmod(0o600)
    secrets = ["NODE-SECRET-e41c", stack.cfg.env["MEMOPLANE_S3_SECRET_KEY"], "MEMOPLANE_S3", "KUBECONFIG="]
    names = []
    for k in range(50):
        target = "/proc/self" if k % 2 else str(private)
        names.append(f"race-{k}")
        stack.apply(ns, _job(names[-1], RACE, {"target": target, "delay": 0.002 * (k % 10), "hold": "frame"}))
    phases = []
    for name, obj in stack.wait_all(ns, names, timeout=600).items():
        seen = _everything(stack, ns, obj)
        for secret in secrets:
            assert secret not in seen, f"{name}: {secret!r} came back: {seen[:2000]}"
        s = obj["status"]
        phases.append(s["phase"] if s["phase"] == "Succeeded" else s["failure"]["reason"])
    assert set(phases) <= {"Succeeded", "forbidden"}, phases
    assert "forbidden" in phases, phases


def test_output_cap_stops_writes_on_the_node(stack: Stack, ns: str) -> None:
    # Finding 3: the job could fill the node's disk before its cap was checked.
    source = ("import errno, os\ndef main():\n    written = 0\n    block = b'x' * (1 << 20)\n"
              "    try:\n        with open(os.environ['MEMOPLANE_OUT'] + '/big', 'wb') as f:\n"
              "            for _ in range(1024):\n                f.write(block)\n                f.flush()\n"
              "                written += len(block)\n"
              "    except OSError as e:\n"
              "        raise OSError(e.errno, f'wrote {written} then {errno.errorcode[e.errno]}') from None\n")
    stack.apply(ns, _job("fill", source, {}, resources={"maxOutputBytes": "8Mi"}))
    s = stack.wait(ns, "fill")["status"]
    assert s["phase"] == "Failed" and s["failure"]["reason"] == "output-too-large", s
    found = re.search(r"wrote (\d+) then ENOSPC", s["failure"]["message"])
    assert found, s["failure"]
    assert int(found[1]) <= (8 << 20) + (1 << 20), found[0]
