"""Run records of ComputeJobs (DESIGN §12): who ran (namespace, name, uid, generation), the
fromJob inputs' exact upstream results and runs, and the cache it ran against.

Resolution reads each upstream job once; `resolve.SeenJobs` keeps what it read, so status.upstreams
names the very result digest (and its status.runId) that went into the key, never a later one.
Whoever settles a run (the agent for what it computed, the operator for what it served or
assembled) fixes a run id, appends the record to the store of the job's ResultCache
(create-if-absent), then writes that run id in the status write that settles the job.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..api.computejob import SOURCES
from ..cas import Store
from ..history import build
from ..history.records import InputRecord, JobIdentity, RunRecord
from ..jobs import Job
from .views import job


def upstream_runs(obj: Mapping[str, Any], seen: Mapping[tuple[str, str], Mapping[str, Any]]) -> list[dict[str, Any]]:
    """status.upstreams: each fromJob input's upstream ("ns/name"), the result digest its key
    used and the upstream's status.runId, as read during resolution."""
    view = job(obj)
    out = []
    for item in view.spec.inputs:
        ref = item.get("fromJob")
        if not isinstance(ref, Mapping):
            continue
        namespace, name = str(ref.get("namespace") or view.meta.namespace), str(ref.get("name"))
        upstream = job(seen.get((namespace, name)) or {}).status
        out.append({"input": str(item.get("name")), "job": f"{namespace}/{name}",
                    "result": upstream.result_digest, "runId": upstream.raw.get("runId")})
    return out


def identity(obj: Mapping[str, Any]) -> JobIdentity:
    meta = job(obj).meta
    return JobIdentity(meta.namespace, meta.name, meta.uid, meta.generation)


def cache_label(obj: Mapping[str, Any]) -> str:
    view = job(obj)
    return f"{view.meta.namespace}/{view.spec.result_cache}"


def sources(obj: Mapping[str, Any]) -> dict[str, InputRecord]:
    """Where each input came from (the spec's source), with status.upstreams' run for fromJob."""
    view = job(obj)
    upstreams = {str(u.get("input")): u for u in view.status.raw.get("upstreams") or () if isinstance(u, Mapping)}
    out = {}
    for item in view.spec.inputs:
        name = str(item.get("name"))
        source = next((s for s in SOURCES if s in item), "value")
        up = upstreams.get(name) or {}
        out[name] = InputRecord(name, "", None, source, _opt(up.get("job")), _opt(up.get("result")),
                                _opt(up.get("runId")))
    return out


def _opt(value: Any) -> str | None:
    return None if value is None else str(value)


def job_record(obj: Mapping[str, Any], resolved: Job, *, run_id: str, result: str | None, result_size: int | None,
               node: str, signer: str | None, started: float, ended: float, cached: bool, compute_seconds: float,
               failure: str | None = None, store: Store | None = None) -> RunRecord:
    """The record of one run of the ComputeJob `obj` (as resolved to `resolved`). With `store`,
    the code text and runtime components are kept as blobs for `diff` (a computed run's)."""
    blobs = build.detail_blobs(store, resolved) if store is not None else (None, None)
    return build.run_record(
        resolved, resolved.key_parts(), identity(obj), result=result, result_size=result_size, node=node,
        signer=signer, started=started, ended=ended, cached=cached, compute_seconds=compute_seconds,
        policy=job(obj).spec.policy, cache=cache_label(obj), failure=failure, sources=sources(obj), blobs=blobs,
        run_id=run_id)
