"""OpenLineage RunEvents of memoplane runs (DESIGN §12), sent to $MEMOPLANE_OPENLINEAGE_URL when set
(memoplane.history.events decides when; this module, and openlineage-python, load only then).

A run is START when it starts computing (a hit: START then COMPLETE) and COMPLETE or FAIL when it
settles, with a `memoplane` run facet {cacheKey, cached, computeSecondsSaved, resultDigest, runId};
inputs and the output are datasets named by content digest. Sending never blocks or fails a run:
events go to a bounded queue that one background thread drains with openlineage-python's HTTP
transport; a full queue or an endpoint that is down drops the event (logged, counted)."""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import attr
from openlineage.client import OpenLineageClient
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import RunFacet
from openlineage.client.transport.http import HttpConfig, HttpTransport

from .records import JobIdentity, RunRecord

log = logging.getLogger("memoplane.history.openlineage")

PRODUCER = "https://memoplane.io/openlineage"
FACET_SCHEMA = "https://memoplane.io/spec/openlineage/1-0-0/MemoplaneRunFacet.json#/$defs/MemoplaneRunFacet"
QUEUE_EVENTS = 1000
SEND_TIMEOUT_SECONDS = 5.0


@attr.define
class MemoplaneRunFacet(RunFacet):
    """What memoplane adds to a run: its key, whether it was served, the seconds a hit saved."""

    cacheKey: str
    cached: bool
    computeSecondsSaved: float
    resultDigest: str | None
    runId: str

    @staticmethod
    def _get_schema() -> str:
        return FACET_SCHEMA


def run_uuid(run_id: str) -> str:
    """OpenLineage wants a UUID: a UUIDv7 from the run id's time (ns) and its digest, the same every time."""
    at_ms = int(run_id[1:21]) // 1_000_000 if run_id[1:21].isdigit() else 0
    rand = int.from_bytes(hashlib.blake2b(run_id.encode(), digest_size=10).digest(), "big")
    value = (at_ms & (2**48 - 1)) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64 | 0b10 << 62 | rand & (2**62 - 1)
    return str(uuid.UUID(int=value))


def _job(identity: JobIdentity) -> Job:
    return Job(namespace=identity.namespace or "memoplane-embedded", name=identity.name)


def _datasets_namespace(cache: str) -> str:
    return f"memoplane://{cache or 'local'}"


def start_event(identity: JobIdentity, run_id: str, key: str, cache: str, at: float | None = None) -> RunEvent:
    facet = MemoplaneRunFacet(cacheKey=key, cached=False, computeSecondsSaved=0.0, resultDigest=None, runId=run_id,
                              producer=PRODUCER)
    return RunEvent(eventType=RunState.START, eventTime=_time(at), run=Run(runId=run_uuid(run_id),
                    facets={"memoplane": facet}), job=_job(identity), producer=PRODUCER,
                    inputs=[], outputs=[])


def settled_event(record: RunRecord) -> RunEvent:
    """COMPLETE (FAIL for a failed run) with the run's inputs and output named by digest."""
    namespace = _datasets_namespace(record.cache)
    facet = MemoplaneRunFacet(cacheKey=record.key, cached=record.cached,
                              computeSecondsSaved=record.compute_seconds if record.cached else 0.0,
                              resultDigest=record.result, runId=record.run_id, producer=PRODUCER)
    inputs = [InputDataset(namespace=namespace, name=i.upstream_result or i.digest) for i in record.inputs if i.digest]
    outputs = [OutputDataset(namespace=namespace, name=record.result)] if record.result else []
    return RunEvent(eventType=RunState.FAIL if record.result is None else RunState.COMPLETE,
                    eventTime=_time(record.ended), run=Run(runId=run_uuid(record.run_id), facets={"memoplane": facet}),
                    job=_job(record.job), producer=PRODUCER, inputs=inputs, outputs=outputs)


def _time(at: float | None) -> str:
    return (datetime.fromtimestamp(at, UTC) if at is not None else datetime.now(UTC)).isoformat()


class Emitter:
    """A bounded queue of events and the thread that sends them; `count(outcome)` hears each
    event's fate: sent, dropped (the queue was full) or failed (the endpoint refused or was down)."""

    def __init__(self, url: str, count: Callable[[str], None] | None = None, size: int = QUEUE_EVENTS) -> None:
        self.url = url
        self.count = count or (lambda outcome: None)
        self.client = OpenLineageClient(transport=HttpTransport(HttpConfig(
            url=url, endpoint="api/v1/lineage", timeout=SEND_TIMEOUT_SECONDS, retry={"total": 0})))
        self._queue: queue.Queue[RunEvent] = queue.Queue(maxsize=size)
        self._thread = threading.Thread(target=self._drain, name="openlineage", daemon=True)
        self._thread.start()

    def emit(self, *events: RunEvent) -> None:
        for event in events:
            try:
                self._queue.put_nowait(event)
            except queue.Full:
                log.warning("OpenLineage event dropped: %d events are waiting to be sent", self._queue.qsize())
                self.count("dropped")

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued event was sent or failed (tests, shutdown); False on timeout."""
        done = threading.Event()

        def wait() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        return done.wait(timeout)

    def _drain(self) -> None:
        while True:
            event = self._queue.get()
            try:
                self.client.emit(event)
                self.count("sent")
            except Exception as exc:  # noqa: BLE001 - whatever the endpoint does, runs go on
                log.warning("OpenLineage event not sent to %s: %s", self.url, exc)
                self.count("failed")
            finally:
                self._queue.task_done()
