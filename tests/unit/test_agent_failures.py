"""The node agent turns any exception while handling a claimed job into a failed attempt.

A job that breaks host-side code (a RecursionError from a deep value, an OSError from the
disk, a bug) must end Failed or back off like any failed attempt, bounded by backoffLimit:
never stay Running to be re-run on every relist. Driven through Agent._run with a fake Kube
(the calls the agent makes, over dicts) and a filesystem store.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeKube, computed_result
from memoplane_agent.agent import Agent, AgentConfig, agent_error_message

from memoplane.api.common import API_VERSION
from memoplane.cas import Store
from memoplane.cluster import protocol as p
from memoplane.cluster.claim import assignment_of
from memoplane.cluster.stores import Stores, StoreSettings
from memoplane.jobs import Job, PythonCode, job_from_dict, job_to_dict
from memoplane.sandbox.types import SandboxOutcome, SandboxRequest
from memoplane.trust import SigningKey, TrustPolicy, trusted_hit
from memoplane.trust.attestation import attest

NODE = "node-a"
RUNTIME = "b3:" + "ab" * 32
STORE_URL = p.store_url(p.DEFAULT_BUCKET, "ml")


class RaisingRunner:
    """A SandboxRunner whose run raises, as host-side code does on a poison pill."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.runs = 0

    def run(self, request: SandboxRequest) -> SandboxOutcome:
        self.runs += 1
        assert request.in_dir.parent.name.startswith("memoplane-job-")
        raise self.exc


@pytest.fixture
def tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tempfile's directory for the test: execute() makes its job directory there."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return scratch


@pytest.fixture
def setup(tmp_path: Path, tmp_dir: Path) -> Iterator[tuple[Agent, FakeKube, Store]]:
    kube = FakeKube()
    stores = Stores(StoreSettings(root=str(tmp_path / "s3")))
    agent = Agent(AgentConfig(node=NODE, backoff_base=0.5), kube, stores, SigningKey.generate("test-agents-1"))
    agent.runtimes["python"] = RUNTIME
    try:
        yield agent, kube, stores.by_url(STORE_URL)
    finally:
        agent._executor.shutdown(wait=True)
        stores.close()


def scheduled_job(kube: FakeKube, store: Store, backoff_limit: int, attempts: int = 1) -> dict[str, Any]:
    """A ComputeJob as the operator leaves it for the agent: labelled, resolved, Scheduled."""
    job = Job(PythonCode("def main():\n    return [[[]]]\n"), runtime=RUNTIME)
    digest = store.put_bytes(json.dumps(job_to_dict(job)).encode()).digest
    obj: dict[str, Any] = {
        "apiVersion": API_VERSION, "kind": "ComputeJob",
        "metadata": {"name": "deep", "namespace": "ml", "uid": "uid-deep", "generation": 1, "resourceVersion": "7",
                     "labels": {p.NODE_LABEL: NODE},
                     "annotations": {p.JOB_DIGEST_ANNOTATION: digest, p.JOB_GENERATION_ANNOTATION: "1",
                                     p.STORE_ANNOTATION: STORE_URL}},
        "spec": {"python": {"source": "..."}, "backoffLimit": backoff_limit},
        "status": {"phase": p.SCHEDULED, "cacheKey": job.key, "attempts": attempts, "observedGeneration": 1},
    }
    kube.objects[(p.COMPUTEJOBS, "ml", "deep")] = copy.deepcopy(obj)
    return obj


def run(agent: Agent, obj: dict[str, Any]) -> None:
    assignment = assignment_of(obj)
    assert assignment is not None
    agent._run(obj, assignment)


def status(kube: FakeKube) -> dict[str, Any]:
    found: dict[str, Any] = kube.objects[(p.COMPUTEJOBS, "ml", "deep")]["status"]
    return found


def deep(n: int) -> Any:
    value: Any = []
    for _ in range(n):
        value = [value]
    return value


def recursion_error() -> RecursionError:
    def walk(value: Any) -> int:
        return 1 + max((walk(v) for v in value), default=0)
    try:
        walk(deep(5000))
    except RecursionError as exc:
        return exc
    raise AssertionError("a 5000-deep walk did not exceed the recursion limit")


@pytest.mark.parametrize("exc", [recursion_error(), OSError(28, "No space left on device"),
                                 RuntimeError("a bug\nsecond line")], ids=["recursion", "oserror", "bug"])
def test_an_agent_error_fails_the_job_at_backoff_limit_zero(setup: Any, tmp_dir: Path, exc: BaseException) -> None:
    agent, kube, store = setup
    runner = RaisingRunner(exc)
    agent.pools["python"] = runner
    run(agent, scheduled_job(kube, store, backoff_limit=0))
    s = status(kube)
    assert runner.runs == 1
    assert s["phase"] == p.FAILED and s["reason"] == p.REASON_AGENT_ERROR
    assert s["failure"]["reason"] == p.REASON_AGENT_ERROR
    message = s["failure"]["message"]
    assert "\n" not in message and type(exc).__name__ in message and str(exc).splitlines()[0] in message
    detail = s["failure"]["stderrTail"]
    assert f"{type(exc).__name__}: " in detail and detail.rstrip().endswith(str(exc).splitlines()[-1]), \
        "the detail is the traceback's tail"
    assert ("Failed", True) in {(e.reason, e.warning) for e in kube.events}
    assert not agent.local, "the job is no longer counted as running here"
    assert list(tmp_dir.iterdir()) == [], "execute() left its job directory behind"


def test_an_agent_error_within_backoff_limit_backs_off(setup: Any) -> None:
    agent, kube, store = setup
    agent.pools["python"] = RaisingRunner(OSError(5, "Input/output error"))
    run(agent, scheduled_job(kube, store, backoff_limit=1))
    s = status(kube)
    assert s["phase"] == p.PENDING and s["reason"] == p.REASON_BACKOFF and s["attempts"] == 1
    assert s["failure"]["reason"] == p.REASON_AGENT_ERROR and "OSError" in s["failure"]["message"]
    assert s.get("node") is None, "the job is released for the operator to schedule again"


def test_an_agent_error_on_the_last_attempt_fails_the_job(setup: Any) -> None:
    agent, kube, store = setup
    agent.pools["python"] = RaisingRunner(OSError(5, "Input/output error"))
    run(agent, scheduled_job(kube, store, backoff_limit=1, attempts=2))
    s = status(kube)
    assert s["phase"] == p.FAILED and s["attempts"] == 2 and "after 2 attempts" in s["message"]


def test_a_failing_failure_report_is_logged_once(setup: Any, caplog: pytest.LogCaptureFixture) -> None:
    agent, kube, store = setup
    agent.pools["python"] = RaisingRunner(RuntimeError("boom"))
    kube.refuse_status_from = 2   # the claim goes through, every later status write fails
    run(agent, scheduled_job(kube, store, backoff_limit=0))
    assert kube.status_attempts == 2, "one claim, one failed report, no retry loop"
    assert status(kube)["phase"] == p.RUNNING
    assert "could not report the agent error" in caplog.text
    assert not agent.local


def test_a_job_gone_meanwhile_is_dropped_without_a_report(setup: Any, caplog: pytest.LogCaptureFixture) -> None:
    agent, kube, store = setup
    caplog.set_level(logging.INFO, logger="memoplane.agent")
    obj = scheduled_job(kube, store, backoff_limit=0)

    class DeletingRunner:
        def run(self, request: SandboxRequest) -> SandboxOutcome:
            del kube.objects[(p.COMPUTEJOBS, "ml", "deep")]
            raise RuntimeError("boom")

    agent.pools["python"] = DeletingRunner()
    run(agent, obj)
    assert (p.COMPUTEJOBS, "ml", "deep") not in kube.objects
    assert "assignment changed" in caplog.text and "could not report" not in caplog.text


def test_the_message_names_the_exception_and_where_it_was_raised() -> None:
    def load() -> None:
        raise KeyError("digest")
    try:
        load()
    except KeyError as exc:
        message = agent_error_message(exc)
    assert message.startswith("the agent failed while handling the job: KeyError in load (test_agent_failures.py:")
    assert message.endswith(": 'digest'")
    assert agent_error_message(ValueError()).endswith("ValueError: no message")


def test_an_assigned_job_computes_even_when_its_node_signed_a_stored_result(setup: Any) -> None:
    """The operator assigns a job only after its lookup under the cache's trust policy missed or
    refused: the agent must not serve what its own signature alone vouches for (a cache with
    minSignatures: 2 would be served one node's result)."""
    agent, kube, store = setup
    obj = scheduled_job(kube, store, backoff_limit=0)
    key = obj["status"]["cacheKey"]
    result = computed_result(store, key, {"sum": 7}, NODE, 1.0, RUNTIME)
    job = job_from_dict(json.loads(store.get_bytes(obj["metadata"]["annotations"][p.JOB_DIGEST_ANNOTATION])))
    manifest = job.key_parts().components()
    envelope = attest(key, manifest, store.put_result(result), agent.signer, NODE, 1.0, 2.0)
    store.commit(result, [envelope])
    assert trusted_hit(store, key, TrustPolicy.of([agent.signer.public])).hit is not None, "a hit for its key"
    runner = RaisingRunner(RuntimeError("computed"))
    agent.pools["python"] = runner
    run(agent, obj)
    assert runner.runs == 1, "the job was served from the store instead of computed"
    assert status(kube)["phase"] == p.FAILED and not status(kube).get("cached")


@pytest.mark.parametrize("named", [True, False], ids=["tier-named", "tier-not-named"])
def test_the_agent_reads_a_job_manifest_moved_to_the_cold_tier_the_assignment_names(
        setup: Any, tmp_path: Path, named: bool) -> None:
    agent, kube, store = setup
    runner = RaisingRunner(RuntimeError("reached the sandbox"))
    agent.pools["python"] = runner
    obj = scheduled_job(kube, store, backoff_limit=0)
    hot, cold = tmp_path / "s3" / p.DEFAULT_BUCKET / "ml", tmp_path / "s3" / "memoplane-cold" / "ml"
    packs = [f for f in (hot / "packs").rglob("*") if f.is_file()]
    assert packs
    for pack in packs:   # as a demotion leaves them (index/ segments stay hot)
        (cold / pack.relative_to(hot)).parent.mkdir(parents=True, exist_ok=True)
        pack.rename(cold / pack.relative_to(hot))
    if named:
        obj["status"]["coldTier"] = p.ColdTier("memoplane-cold", "ml", 3600.0).text()
    run(agent, obj)
    assert runner.runs == (1 if named else 0)
    assert status(kube)["reason"] == (p.REASON_AGENT_ERROR if named else p.REASON_STORE)
    assert any(f.is_file() for f in (hot / "packs").rglob("*")) == named   # re-warmed on the way
