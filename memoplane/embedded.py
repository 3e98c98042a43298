"""Embedded mode: the whole memoplane loop in one process, no cluster.

derive key -> (policy Use) serve a verified hit that the reader's trust policy
accepts -> else, holding a per-key lock so concurrent identical runs compute once,
execute in a sandbox -> store -> sign (attest) -> set the ref -> remember the key's
components so the next miss can be explained.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cas import Hit, Store
from .cas import audit as audit_log
from .errors import JobFailed, NotFound, StoreCorrupted
from .execute import Execution, SandboxRunner, execute
from .history import build as records
from .history import events
from .history.records import InputRecord, JobIdentity, RunRecord
from .jobs import Job, Policy
from .keys import explain_change
from .leftovers import sweep
from .run_report import RunReport
from .sandbox.types import Failure
from .trust import SigningKey, TrustPolicy, trusted_hit
from .trust.local import commit_signed, refused_note


def run_job(
    job: Job,
    store: Store,
    sandbox: Callable[[], SandboxRunner],
    *,
    policy: Policy = "Use",
    identity: str,
    trust: TrustPolicy,
    signer: SigningKey,
    node: str = "local",
    job_identity: JobIdentity | None = None,
    sources: Mapping[str, InputRecord] | None = None,
    shared: Shared | None = None,
) -> RunReport:
    """Run `job` once; `sandbox` is called only on a miss (starting one costs). A stored result is
    served only if `trust` accepts its attestations; what is computed is signed by `signer`.
    Every run, served or computed or failed, appends a run record to the store's history, as
    `job_identity` (default: `identity`, unnamespaced); `sources` says where inputs came from.
    `shared`: stores whose results the reader may read too, looked up (judged by the same `trust`)
    after a miss in its own and before computing; a hit there is audited (Shared.log)."""
    run = _Run(job, store, policy, job_identity or JobIdentity("", identity), sources, node)
    parts = job.key_parts()
    key = parts.key
    history = RunHistory(store)
    explanation = explain_change(history.previous(identity), parts.components())
    notes: list[str] = []
    if policy == "Use":
        hit, vouched = _lookup(store, key, trust, notes)
        source, shared_by = store, ""
        if hit is None and shared is not None:
            shared_by, source, hit, vouched = _shared_lookup(shared, key, trust, notes) or ("", store, None, None)
        if hit is None:
            with key_lock(store, key):
                hit, vouched = _lookup(store, key, trust, notes)  # another process may have finished it
                if hit is None:
                    return _compute(job, store, sandbox, policy, signer, identity, run, explanation, notes)
        history.record(identity, key, parts.components())
        report = hit_report(source, hit, run.started, cached=True, explain=[], notes=notes)
        report.shared_by = shared_by
        return run.done(report, vouched)
    return _compute(job, store, sandbox, policy, signer, identity, run, explanation, notes)


@dataclass(frozen=True)
class Shared:
    """Stores shared with a reader (their owners' names -> store), the reader's name, and the store
    whose audit log records each read across them."""

    stores: Mapping[str, Store]
    reader: str
    log: Store


def _shared_lookup(shared: Shared, key: str, trust: TrustPolicy,
                   notes: list[str]) -> tuple[str, Store, Hit, str | None] | None:
    """The first trusted hit among the shared stores (in name order), audited."""
    for name, other in sorted(shared.stores.items()):
        hit, vouched = _lookup(other, key, trust, notes)
        if hit is not None:
            shared.log.audit_log.append(audit_log.SHARED_READ, {"key": hit.key, "result": hit.digest,
                                                                "reader": shared.reader, "cache": name})
            return name, other, hit, vouched
    return None


class _Run:
    """One run as its record needs it: when it started and what it was."""

    def __init__(self, job: Job, store: Store, policy: Policy, identity: JobIdentity,
                 sources: Mapping[str, InputRecord] | None, node: str) -> None:
        self.job, self.store, self.policy, self.identity, self.sources, self.node = \
            job, store, policy, identity, sources, node
        self.started = time.perf_counter()
        self.started_at = time.time()

    def done(self, report: RunReport, signer: str | None) -> RunReport:
        result = report.result
        computed = result.provenance.duration_s
        record = self._record(result=report.result_digest, result_size=result.logical_size, signer=signer,
                              cached=report.cached, compute_seconds=computed)
        if records.append(self.store, record):
            report.run_id = record.run_id
        events.run_settled(record, start=True)
        return report

    def failed(self, execution: Execution) -> None:
        failure = execution.failure
        record = self._record(result=None, result_size=None, signer=None, cached=False, compute_seconds=0.0,
                              failure=f"{failure.reason}: {failure.message}" if failure else "no result")
        records.append(self.store, record)
        events.run_settled(record, start=True)

    def _record(self, *, result: str | None, result_size: int | None, signer: str | None, cached: bool,
                compute_seconds: float, failure: str | None = None) -> RunRecord:
        return records.run_record(
            self.job, self.job.key_parts(), self.identity, result=result, result_size=result_size, node=self.node,
            signer=signer, started=self.started_at, ended=time.time(), cached=cached,
            compute_seconds=compute_seconds, policy=self.policy, failure=failure, sources=self.sources,
            blobs=records.detail_blobs(self.store, self.job) if not cached else (None, None))


def _lookup(store: Store, key: str, trust: TrustPolicy, notes: list[str]) -> tuple[Hit | None, str | None]:
    """A trusted hit (and the first key that vouched for it), or why not in `notes`."""
    had_ref = store.read_ref(key) is not None
    found = trusted_hit(store, key, trust)
    note = None
    if found.refused and found.verdict is not None:
        note = refused_note(found.verdict)
    elif found.hit is None and had_ref:
        note = "the stored entry was damaged or incomplete: quarantined and recomputed"
    if note is not None and note not in notes:  # looked up twice: before and under the key's lock
        notes.append(note)
    signers = found.verdict.signers if found.verdict is not None else ()
    return found.hit, ",".join(signers) or None


def _compute(job: Job, store: Store, sandbox: Callable[[], SandboxRunner], policy: Policy, signer: SigningKey,
             identity: str, run: _Run, explanation: list[str], notes: list[str]) -> RunReport:
    sweep()   # before our own pool starts: what crashed runs left behind
    execution = execute(job, store, sandbox(), node=run.node)
    history = RunHistory(store)
    if execution.result is None or execution.digest is None:
        history.record_failure(identity, execution.key, execution.failure)
        run.failed(execution)
        raise _job_failed(execution)
    if policy != "Bypass":
        commit_signed(store, job.key_parts().components(), execution.result, execution.digest, signer)
    history.record(identity, execution.key, job.key_parts().components())
    hit = Hit(execution.key, execution.digest, execution.result)
    report = hit_report(store, hit, run.started, cached=False, explain=explanation, notes=notes)
    return run.done(report, signer.keyid if policy != "Bypass" else None)


def hit_report(store: Store, hit: Hit, started: float, *, cached: bool,
               explain: list[str], notes: list[str]) -> RunReport:
    """What a run answers for `hit` (its value read and verified from `store`)."""
    try:
        value = store.load_value(hit.result.value)
    except (StoreCorrupted, NotFound) as exc:
        raise StoreCorrupted(f"result {hit.digest}: its value could not be read ({exc.cause})",
                             "run again: the damaged entry was quarantined and will be recomputed") from None
    return RunReport(
        cache_key=hit.key,
        cached=cached,
        result_digest=hit.digest,
        result=hit.result,
        value=value,
        duration_ms=(time.perf_counter() - started) * 1000.0,
        compute_seconds_saved=hit.result.provenance.duration_s if cached else 0.0,
        explain=explain,
        notes=notes,
    )


def _job_failed(execution: Execution) -> JobFailed:
    failure = execution.failure or Failure("sandbox", "the sandbox returned no result and no reason")
    error = JobFailed(f"job failed ({failure.reason}): {failure.message} (nothing was cached)")
    error.detail = failure.detail  # type: ignore[attr-defined]
    error.failure = failure  # type: ignore[attr-defined]
    return error


@contextlib.contextmanager
def key_lock(store: Store, key: str) -> Iterator[None]:
    """An exclusive per-key lock across processes on this machine (single flight)."""
    root = store.local_root
    lock_dir = root / "locks" if root is not None else Path(tempfile.gettempdir()) / "memoplane-locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{key.removeprefix('b3:')}.lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class RunHistory:
    """The key components of the last run of each job identity (a script path and
    entrypoint, or a command), kept in the store so `explain` works across runs."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def previous(self, identity: str) -> dict[str, Any] | None:
        raw = self.store.last_run(identity)
        try:
            record = json.loads(raw) if raw is not None else None
        except ValueError:
            return None
        components = record.get("components") if isinstance(record, dict) else None
        return components if isinstance(components, dict) else None

    def record(self, identity: str, key: str, components: dict[str, Any]) -> None:
        self._put(identity, {"identity": identity, "key": key, "components": components, "at": time.time()})

    def record_failure(self, identity: str, key: str, failure: Failure | None) -> None:
        previous = self.previous(identity)
        record: dict[str, Any] = {"identity": identity, "components": previous, "at": time.time()}
        if failure is not None:
            record["failure"] = {"key": key, "reason": failure.reason, "message": failure.message,
                                 "detail": failure.detail}
        self._put(identity, record)

    def _put(self, identity: str, record: dict[str, Any]) -> None:
        self.store.set_last_run(identity, json.dumps(record, sort_keys=True).encode())
