"""OpenLineage events of runs: a loopback HTTP server receives them; each has the structure the
OpenLineage RunEvent schema requires (SCHEMA below: the spec's required fields and formats for the
parts memoplane sends) and the memoplane run facet. An endpoint that is down never fails a run."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import pytest

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

FACET = {"type": "object", "required": ["_producer", "_schemaURL"],
         "properties": {"_producer": {"type": "string", "format": "uri"},
                        "_schemaURL": {"type": "string", "format": "uri"}}}
DATASET = {"type": "object", "required": ["namespace", "name"],
           "properties": {"namespace": {"type": "string"}, "name": {"type": "string"}}}
SCHEMA = {  # OpenLineage 2-0-2 RunEvent: required fields, eventType, formats (uuid, date-time, uri)
    "type": "object", "required": ["eventTime", "producer", "schemaURL", "run", "job"],
    "properties": {
        "eventType": {"enum": ["START", "RUNNING", "COMPLETE", "ABORT", "FAIL", "OTHER"]},
        "eventTime": {"type": "string", "format": "date-time"},
        "producer": {"type": "string", "format": "uri"},
        "schemaURL": {"type": "string", "format": "uri"},
        "run": {"type": "object", "required": ["runId"],
                "properties": {"runId": {"type": "string", "format": "uuid"},
                               "facets": {"type": "object", "additionalProperties": FACET}}},
        "job": {"type": "object", "required": ["namespace", "name"],
                "properties": {"namespace": {"type": "string"}, "name": {"type": "string"}}},
        "inputs": {"type": "array", "items": DATASET},
        "outputs": {"type": "array", "items": DATASET},
    },
}
MEMOPLANE_FACET = {"type": "object", "required": ["cacheKey", "cached", "computeSecondsSaved", "runId"]}  # resultDigest: once there is one


def valid(event: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER).validate(
        event)
    jsonschema.validate(event["run"]["facets"]["memoplane"], MEMOPLANE_FACET)


class Receiver:
    """An OpenLineage endpoint on loopback that keeps what it receives."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        received = self.events

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                received.append(json.loads(body))
                self.send_response(201)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()
    events.configure("")


def test_run_uuid_is_a_stable_uuid7() -> None:
    run_id = new_run_id()
    assert run_uuid(run_id) == run_uuid(run_id) != run_uuid(new_run_id())
    assert uuid.UUID(run_uuid(run_id)).version == 7


def test_embedded_runs_send_valid_start_complete_and_fail(receiver: Receiver, tmp_path: Path) -> None:
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
    emitter.emit(*made)   # returns at once: 2 queued (at most), the rest dropped
    assert emitter.flush()
    assert outcomes.count("dropped") >= 17 and "sent" not in outcomes
    assert outcomes.count("failed") + outcomes.count("dropped") == 20
