"""Run records from what a run knew: the resolved job, its key, its result (or failure)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from ..canonical import canonical_json
from ..cas import Store
from ..errors import MemoplaneError
from ..jobs import BlobInput, CommandCode, Input, Job, JsonInput, SeedInput
from ..keys import KeyParts, runtime_identity
from .records import InputRecord, JobIdentity, RunRecord, new_run_id

log = logging.getLogger("memoplane.history")


def input_records(job: Job, sources: Mapping[str, InputRecord] | None = None) -> tuple[InputRecord, ...]:
    """One record per input, in the job's order. `sources` may say where an input came from
    (fromJob: the upstream job, result and run); its digest and size are the job's."""
    out = []
    for name, value in job.inputs.items():
        given = (sources or {}).get(name)
        record = InputRecord(name, value.digest, _size(value), _kind(value))
        if given is not None:
            record = InputRecord(name, value.digest, record.size, given.source, given.upstream_job,
                                 given.upstream_result, given.upstream_run)
        out.append(record)
    return tuple(out)


def _size(value: Input) -> int | None:
    if isinstance(value, BlobInput):
        return value.size
    if isinstance(value, JsonInput):
        return len(canonical_json(value.value))
    return None


def _kind(value: Input) -> str:
    if isinstance(value, SeedInput):
        return "fromSeed"
    return "file" if isinstance(value, BlobInput) else "value"


def code_text(job: Job) -> bytes:
    if isinstance(job.code, CommandCode):
        return canonical_json(list(job.code.argv))
    return job.code.source.encode("utf-8")


def detail_blobs(store: Store, job: Job) -> tuple[str | None, str | None]:
    """The code's text and the runtime's components as blobs (deduplicated: a blob seen before
    costs no write), for `diff`; (None, None) when the store refuses them."""
    try:
        code = store.put_bytes(code_text(job)).digest
        runtime = None
        if job.runtime is None or job.runtime == runtime_identity(job.profile).digest:
            runtime = store.put_bytes(canonical_json(runtime_identity(job.profile).components())).digest
        return code, runtime
    except (MemoplaneError, OSError) as exc:
        log.warning("run record details not stored: %s", exc)
        return None, None


def run_record(job: Job, parts: KeyParts, identity: JobIdentity, *, result: str | None, result_size: int | None,
               node: str, signer: str | None, started: float, ended: float, cached: bool,
               compute_seconds: float, policy: str = "Use", cache: str = "", failure: str | None = None,
               sources: Mapping[str, InputRecord] | None = None, blobs: tuple[str | None, str | None] = (None, None),
               run_id: str | None = None) -> RunRecord:
    return RunRecord(
        run_id=run_id or new_run_id(), job=identity, key=parts.key, result=result,
        inputs=input_records(job, sources), code=parts.code, runtime=parts.runtime, env=dict(job.env), node=node,
        signer=signer, started=started, ended=ended, cached=cached, compute_seconds=compute_seconds, cache=cache,
        policy=policy, failure=failure, code_blob=blobs[0], runtime_blob=blobs[1], result_size=result_size,
        components=parts.components())


def append(store: Store, record: RunRecord) -> bool:
    """Keep `record` in `store`; a failure to write history never fails the run (logged)."""
    try:
        return store.put_run_record(record.run_id, record.to_json())
    except (MemoplaneError, OSError) as exc:
        log.warning("run record %s not kept: %s", record.run_id, exc)
        return False
