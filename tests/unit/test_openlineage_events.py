"""OpenLineage events of runs: a loopback HTTP server receives them; each is checked by
tests/openlineage_check.py. An endpoint that is down never fails a run."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from openlineage_check import LineageReceiver, valid

from memoplane import embedded
from memoplane.cas import open_store
from memoplane.errors import JobFailed
from memoplane.history import events
from memoplane.history.openlineage import Emitter, run_uuid
from memoplane.history.records import new_run_id
from memoplane.jobs import Job, JsonInput, PythonCode
from memoplane.sandbox import SandboxPool
from memoplane.trust import SigningKey
from memoplane.trust.policy import TrustPolicy


@pytest.fixture
def receiver() -> Iterator[LineageReceiver]:
    r = LineageReceiver()
    yield r
    r.close()
    events.configure("")


def test_run_uuid_is_a_stable_uuid7() -> None:
    run_id = new_run_id()
    assert run_uuid(run_id) == run_uuid(run_id) != run_uuid(new_run_id())
    assert uuid.UUID(run_uuid(run_id)).version == 7


def test_embedded_runs_send_valid_start_complete_and_fail(receiver: LineageReceiver, tmp_path: Path) -> None:
    emitter = events.configure(receiver.url)
    assert emitter is not None
    store = open_store(tmp_path / "store")
    key = SigningKey.generate("me-1")
    trust = TrustPolicy.of([key.public])
    pool = SandboxPool("python", size=1, require_isolation=False)
    try:
        job = Job(PythonCode("def main(x):\n    return x + 1\n"), {"x": JsonInput(1)})
        run = {"sandbox": lambda: pool, "identity": "add", "trust": trust, "signer": key}
        computed = embedded.run_job(job, store, **run)
        served = embedded.run_job(job, store, **run)
        broken = Job(PythonCode("def main(x):\n    raise ValueError('no')\n"), {"x": JsonInput(1)})
        with pytest.raises(JobFailed):
            embedded.run_job(broken, store, **run)
    finally:
        pool.close()
    assert emitter.flush()
    for event in receiver.events:
        valid(event)
    kinds = [(e["eventType"], e["run"]["facets"]["memoplane"]["cached"]) for e in receiver.events]
    assert kinds == [("START", False), ("COMPLETE", False), ("START", False), ("COMPLETE", True),
                     ("START", False), ("FAIL", False)]
    complete = receiver.events[3]["run"]["facets"]["memoplane"]
    assert complete["runId"] == served.run_id and complete["resultDigest"] == served.result_digest
    assert complete["computeSecondsSaved"] >= 0 and complete["cacheKey"] == served.cache_key
    assert receiver.events[1]["outputs"][0]["name"] == computed.result_digest
    assert receiver.events[1]["inputs"][0]["name"] == job.inputs["x"].digest
    assert receiver.events[5]["outputs"] == []


def test_an_endpoint_that_is_down_drops_events_and_never_blocks() -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    outcomes: list[str] = []
    emitter = Emitter(url, outcomes.append, size=2)
    from memoplane.history.openlineage import start_event
    from memoplane.history.records import JobIdentity

    made = [start_event(JobIdentity("ns", f"j{i}"), new_run_id(), "b3:00", "ns/default") for i in range(20)]
    emitter.emit(*made)   # returns at once: what the bounded queue cannot hold is dropped
    assert emitter.flush()
    # How many the sender thread took before the queue filled depends on scheduling; that the
    # queue is bounded does not (an unbounded one would drop none of the 20).
    assert outcomes.count("dropped") >= 1 and "sent" not in outcomes
    assert outcomes.count("failed") + outcomes.count("dropped") == 20
