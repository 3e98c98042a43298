"""A spec.map batch on the node agent: each element is its own sandbox run, with its own
key, result, attestation and ref; the batch reports the results in order, or the element
that failed and the results before it. Driven through Agent._run with a fake Kube, a
filesystem store and a real sandbox pool."""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeKube
from memoplane_agent.agent import Agent, AgentConfig

from memoplane.api.common import API_VERSION
from memoplane.cas import Store
from memoplane.cluster import mapping as mp
from memoplane.cluster import protocol as p
from memoplane.cluster.claim import assignment_of
from memoplane.cluster.stores import Stores, StoreSettings
from memoplane.jobs import Job, JsonInput, PythonCode, job_to_dict
from memoplane.keys import runtime_identity
from memoplane.sandbox import SandboxPool
from memoplane.trust import SigningKey, TrustPolicy, trusted_hit

NODE = "node-a"
STORE_URL = p.store_url(p.DEFAULT_BUCKET, "ml")
SOURCE = "def main(x, k):\n    return k // x\n"


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Agent, FakeKube, Store]]:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    kube = FakeKube()
    stores = Stores(StoreSettings(root=str(tmp_path / "s3")))
    agent = Agent(AgentConfig(node=NODE, backoff_base=0.5), kube, stores, SigningKey.generate("test-agents-1"))
    agent.runtimes["python"] = runtime_identity("python").digest
    with SandboxPool("python", size=1, require_isolation=False) as pool:
        agent.pools["python"] = pool
        try:
            yield agent, kube, stores.by_url(STORE_URL)
        finally:
            agent._executor.shutdown(wait=True)
            stores.close()


def batch(kube: FakeKube, store: Store, elements: list[Any], key: str | None = None
          ) -> tuple[dict[str, Any], list[str]]:
    """A batch ComputeJob as the operator leaves it for the agent, and its elements' keys."""
    job = Job(PythonCode(SOURCE, "main"), inputs={"x": JsonInput(elements), "k": JsonInput(10)},
              runtime=runtime_identity("python").digest)
    keys = [j.key for j in mp.batch_jobs(job, "x")]
    digest = store.put_bytes(json.dumps(job_to_dict(job)).encode()).digest
    obj: dict[str, Any] = {
        "apiVersion": API_VERSION, "kind": "ComputeJob",
        "metadata": {"name": "sq-0123456789", "namespace": "ml", "uid": "uid-b", "generation": 1,
                     "resourceVersion": "7", "labels": {p.NODE_LABEL: NODE, mp.PARENT_LABEL: "uid-sq"},
                     "annotations": {p.JOB_DIGEST_ANNOTATION: digest, p.JOB_GENERATION_ANNOTATION: "1",
                                     p.STORE_ANNOTATION: STORE_URL, mp.BATCH_ANNOTATION: "x",
                                     mp.KEYS_ANNOTATION: json.dumps(keys)}},
        "spec": {"python": {"source": SOURCE}, "backoffLimit": 0},
        "status": {"phase": p.SCHEDULED, "cacheKey": key or mp.batch_key("x", keys), "attempts": 1,
                   "observedGeneration": 1},
    }
    kube.objects[(p.COMPUTEJOBS, "ml", obj["metadata"]["name"])] = copy.deepcopy(obj)
    return obj, keys


def run(agent: Agent, kube: FakeKube, obj: dict[str, Any]) -> dict[str, Any]:
    assignment = assignment_of(obj)
    assert assignment is not None
    agent._run(obj, assignment)
    found: dict[str, Any] = kube.objects[(p.COMPUTEJOBS, "ml", obj["metadata"]["name"])]["status"]
    return found


def test_each_element_is_its_own_cached_run_and_the_batch_lists_the_results(setup: Any) -> None:
    agent, kube, store = setup
    obj, keys = batch(kube, store, [1, 2, 5])
    s = run(agent, kube, obj)
    assert s["phase"] == p.SUCCEEDED and s["map"]["total"] == 3 and s["map"].get("failedElement") is None, s
    assert s["map"]["results"] == [store.read_ref(k) for k in keys]
    assert [store.load_value(store.get_result(d).value) for d in s["map"]["results"]] == [10, 5, 2]
    policy = TrustPolicy.of([agent.signer.public])
    assert all(trusted_hit(store, k, policy).hit is not None for k in keys), "each element attested by the node"
    assert store.read_ref(s["cacheKey"]) is None, "nothing is stored under the batch's own key"
    # Each element's key is that of a plain job over the element.
    plain = Job(PythonCode(SOURCE, "main"), inputs={"x": JsonInput(2), "k": JsonInput(10)},
                runtime=runtime_identity("python").digest)
    assert plain.key == keys[1]


def test_the_first_failing_element_fails_the_batch_and_is_named(setup: Any) -> None:
    agent, kube, store = setup
    obj, keys = batch(kube, store, [1, 0, 2])
    s = run(agent, kube, obj)
    assert s["phase"] == p.FAILED, s
    assert s["map"]["failedElement"] == 1 and s["map"]["results"] == [store.read_ref(keys[0])]
    assert "element 1 of the batch" in s["message"]
    assert "ZeroDivisionError" in s["message"] + s["failure"].get("stderrTail", "")
    assert store.read_ref(keys[2]) is None, "the elements after the failure did not run"


def test_a_batch_whose_key_is_not_its_elements_is_refused(setup: Any) -> None:
    agent, kube, store = setup
    obj, keys = batch(kube, store, [1, 2], key="b3:" + "0" * 64)
    s = run(agent, kube, obj)
    assert s["phase"] == p.FAILED and s["reason"] == p.REASON_INVALID and "derives key" in s["message"], s
    assert all(store.read_ref(k) is None for k in keys)
