"""The agent loop: lease, watch, claim, run, store, report. Decisions are in
memoplane.cluster (claim.py, retry.py, status.py); this module does the I/O.

Order of a run (DESIGN §4): claim (Running, resourceVersion precondition) -> load the job
manifest -> check the runtime -> execute (chunks, manifests, result) -> unless Bypass or the
cache was at its quota (the assignment's cache-result annotation): attest
the result with this node's own key (DESIGN §11; its public key is in the node's Lease) and
set the ref listing that attestation
(durable first) -> report Succeeded. A crash anywhere before the report leaves the
job Running on this node: a restarted agent re-runs it, a dead one loses its Lease and the
operator reassigns the job.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from memoplane.cas import ResultManifest, Store
from memoplane.cluster import lineage
from memoplane.cluster import mapping as mp
from memoplane.cluster import protocol as p
from memoplane.cluster import status as st
from memoplane.cluster.agentkeys import key_annotation
from memoplane.cluster.claim import Assignment, agent_action, assignment_of, claimable, still_ours
from memoplane.cluster.kube import Kube
from memoplane.cluster.metrics import AgentMetrics
from memoplane.cluster.replicas import is_replica
from memoplane.cluster.retry import after_failure
from memoplane.cluster.spotcheck import checked_digest
from memoplane.cluster.stores import Stores
from memoplane.cluster.views import meta_of, section
from memoplane.errors import MemoplaneError
from memoplane.execute import Execution, execute
from memoplane.history import build as history
from memoplane.history import events, new_run_id
from memoplane.jobs import Job, job_from_dict
from memoplane.keys import runtime_identity
from memoplane.leftovers import sweep
from memoplane.sandbox import SandboxPool
from memoplane.trust import SigningKey
from memoplane.trust.attestation import attest

from .replica import store_replica

log = logging.getLogger("memoplane.agent")


@dataclass
class AgentConfig:
    node: str
    lease_namespace: str = "memoplane-system"
    patterns: list[str] = field(default_factory=list)
    capacity: int = 2
    profiles: list[str] = field(default_factory=lambda: ["python"])
    require_isolation: bool = True
    renew_seconds: float = p.RENEW_SECONDS
    lease_duration: int = p.LEASE_DURATION_SECONDS
    backoff_base: float = 1.0
    watch_timeout: int = 30
    sessions: str = ""   # host:port of the session endpoint, announced in the Lease ("": none)


class _Stale(Exception):
    """The assignment changed under us: drop the job silently."""


@dataclass(frozen=True)
class _Done:
    digest: str
    result: ResultManifest
    ms: int
    execution: Execution


@dataclass(frozen=True)
class _Failed:
    reason: str
    message: str
    detail: str
    execution: Execution | None   # None: the store failed before the run had an outcome


class Agent:
    def __init__(self, config: AgentConfig, kube: Kube, stores: Stores, signer: SigningKey,
                 metrics: AgentMetrics | None = None) -> None:
        self.cfg = config
        self.signer = signer
        # What the agent re-uses on its own (an earlier attempt's result): what its own key attests.
        self.kube = kube
        self.stores = stores
        self.metrics = metrics or AgentMetrics()
        self.holder = f"{config.node}/{os.getpid()}"
        self.pools: dict[str, SandboxPool] = {}
        self.runtimes: dict[str, str] = {}
        self.local: dict[str, Assignment] = {}   # uid -> assignment queued or running here
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=max(1, config.capacity), thread_name_prefix="job")
        self._threads: list[threading.Thread] = []
        self.last_renew = 0.0   # monotonic
        self.watching = False

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        sweep()   # what an earlier agent that crashed left behind, before our pools make their own
        for profile in self.cfg.profiles:
            self.pools[profile] = SandboxPool(profile, size=self.cfg.capacity,
                                              require_isolation=self.cfg.require_isolation)
            self.runtimes[profile] = runtime_identity(profile).digest
            self.metrics.pool_size.labels(profile).set(self.cfg.capacity)
        self.kube.ensure_namespace(self.cfg.lease_namespace)
        self._renew()
        for name, target in (("lease", self._lease_loop), ("watch", self._watch_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("agent %s up: capacity %d, profiles %s, leases in %s, namespaces %s", self.cfg.node,
                 self.cfg.capacity, ",".join(self.cfg.profiles), self.cfg.lease_namespace,
                 " ".join(self.cfg.patterns) or "all")

    def stop(self, drain_seconds: float = 30.0) -> None:
        """Stop taking jobs, finish the running ones, then give up the lease."""
        self._stop.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
        for pool in self.pools.values():
            pool.close()
        self.kube.flush_events()
        try:
            self.kube.coord.delete_namespaced_lease(p.lease_name(self.cfg.node), self.cfg.lease_namespace)
        except Exception as exc:  # noqa: BLE001 - shutting down: the lease expires on its own
            log.debug("lease not deleted: %s", exc)

    def live(self) -> bool:
        return all(t.is_alive() for t in self._threads) and not self._stop.is_set()

    def ready(self) -> tuple[bool, str]:
        if not self.pools:
            return False, "sandbox pools not started"
        if time.monotonic() - self.last_renew > self.cfg.lease_duration:
            return False, "lease not renewed"
        if not self.watching:
            return False, "not watching jobs yet"
        return True, "ready"

    # -- lease ---------------------------------------------------------------------------

    def _renew(self) -> None:
        with self._lock:
            running = len(self.local)
        annotations = {p.CAPACITY_ANNOTATION: str(self.cfg.capacity), p.RUNNING_ANNOTATION: str(running),
                       p.PROFILES_ANNOTATION: ",".join(self.cfg.profiles),
                       p.SIGNING_KEY_ANNOTATION: key_annotation(self.signer.public)}
        annotations.update({p.runtime_annotation(k): v for k, v in self.runtimes.items()})
        if self.cfg.sessions:
            annotations[p.SESSIONS_ANNOTATION] = self.cfg.sessions
        self.kube.renew_lease(self.cfg.lease_namespace, self.cfg.node, self.holder, annotations,
                              self.cfg.lease_duration)
        self.last_renew = time.monotonic()

    def _lease_loop(self) -> None:
        while not self._stop.wait(self.cfg.renew_seconds):
            try:
                self._renew()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive one failed renewal
                log.warning("lease renewal failed: %s", exc)

    # -- watch ---------------------------------------------------------------------------

    def _watch_loop(self) -> None:
        selector = f"{p.NODE_LABEL}={self.cfg.node}"
        while not self._stop.is_set():
            try:
                items, rv = self.kube.list(p.COMPUTEJOBS, label_selector=selector)
                self.watching = True
                for obj in items:
                    self.consider(obj)
                for kind, obj in self.kube.watch(p.COMPUTEJOBS, rv, selector, self.cfg.watch_timeout):
                    if self._stop.is_set():
                        return
                    if kind in ("ADDED", "MODIFIED"):
                        self.consider(obj)
            except ApiException as exc:
                if exc.status != 410:  # 410 Gone: our resourceVersion is too old, relist
                    log.warning("watch failed: %s", exc.reason)
                    self._stop.wait(1.0)
            except Exception as exc:  # noqa: BLE001 - the watch restarts after any failure
                log.warning("watch failed: %s", exc)
                self._stop.wait(1.0)

    def consider(self, obj: dict[str, Any]) -> None:
        uid = meta_of(obj).uid
        with self._lock:
            if self._stop.is_set():
                return
            if agent_action(obj, self.cfg.node, uid in self.local, self.cfg.patterns) != "claim":
                return
            assignment = assignment_of(obj)
            assert assignment is not None
            self.local[uid] = assignment
            self.metrics.running.set(len(self.local))
        self._executor.submit(self._run, obj, assignment)

    # -- one job ---------------------------------------------------------------------------

    def _run(self, obj: dict[str, Any], a: Assignment) -> None:
        started = time.monotonic()
        try:
            self._claim_and_run(obj, a)
        except _Stale:
            log.info("%s/%s: assignment changed, dropped", a.namespace, a.name)
        finally:
            self.metrics.run_seconds.observe(time.monotonic() - started)
            with self._lock:
                self.local.pop(a.uid, None)
                self.metrics.running.set(len(self.local))

    def _claim_and_run(self, obj: dict[str, Any], a: Assignment) -> None:
        try:
            claimed = self._claim(obj, a)
        except _Stale:
            raise
        except Exception as exc:  # noqa: BLE001 - not ours yet: the job stays Scheduled, the next event retries
            log.error("%s/%s: could not claim: %s", a.namespace, a.name, exc)
            return
        try:
            self._run_claimed(claimed, a)
        except _Stale:
            raise
        except Exception as exc:  # noqa: BLE001 - a poison pill must not leave the job Running
            self._agent_failed(claimed, a, exc)

    def _claim(self, obj: dict[str, Any], a: Assignment) -> dict[str, Any]:
        """Mark the assigned job Running on this node while it is still claimable."""
        return self._patch_while(obj, a, lambda s: st.running(s, a.generation, self.cfg.node, datetime.now(UTC)),
                                 claimable)

    def _report(self, obj: dict[str, Any], a: Assignment, build: Any) -> dict[str, Any]:
        """Write the outcome patch built by `build(status)` while the assignment is ours."""
        return self._patch_while(obj, a, build, still_ours)

    def _patch_while(self, obj: dict[str, Any], a: Assignment, build: Callable[[Mapping[str, Any]], Any],
                     valid: Callable[[Mapping[str, Any], str, Assignment], bool]) -> dict[str, Any]:
        """Patch the status with `build(status)` under a resourceVersion precondition; on a
        conflict read the job again and retry (up to 10 times) while `valid` holds for it.
        _Stale when the job is gone or no longer valid."""
        rv = meta_of(obj).resource_version
        for _ in range(10):
            try:
                return self.kube.patch_status(p.COMPUTEJOBS, a.namespace, a.name, build(section(obj, "status")), rv)
            except ApiException as exc:
                if exc.status == 404:
                    raise _Stale() from None
                if exc.status != 409:
                    raise
            fresh = self.kube.get(p.COMPUTEJOBS, a.namespace, a.name)
            if fresh is None or not valid(fresh, self.cfg.node, a):
                raise _Stale()
            obj, rv = fresh, fresh["metadata"]["resourceVersion"]
        raise _Stale()

    def _run_claimed(self, obj: dict[str, Any], a: Assignment) -> None:
        """Run a job claimed by `obj` (the claim's answer) and report its outcome."""
        node = self.cfg.node
        self.kube.event(obj, p.REASON_RUNNING, f"running on node {node} (attempt {a.attempts})",
                        component=p.AGENT_COMPONENT, host=node)
        try:
            if a.cold_tier is not None:   # never unset here: a job resolved before the tier existed names none
                self.stores.set_tier(*p.parse_store_url(a.store), a.cold_tier)
            store = self.stores.by_url(a.store)
            job = job_from_dict(json.loads(store.get_bytes(a.job_digest)))
        except (MemoplaneError, ValueError, KeyError) as exc:
            self._attempt_failed(obj, a, p.REASON_STORE, f"cannot load the job manifest {a.job_digest}: {exc}", "")
            return
        pool = self.pools.get(job.profile)
        if pool is None or job.runtime != self.runtimes.get(job.profile):
            why = (f"node {node} does not serve profile '{job.profile}'" if pool is None else
                   f"node {node} runs profile '{job.profile}' as {self.runtimes[job.profile]}, "
                   f"the key was derived for {job.runtime}")
            self._report(obj, a, lambda s: st.pending(s, a.generation, p.REASON_RUNTIME_MISMATCH, why,
                                                      datetime.now(UTC)))
            self.kube.event(obj, p.REASON_RUNTIME_MISMATCH, why, warning=True, component=p.AGENT_COMPONENT,
                            host=node)
            return
        over = meta_of(obj).annotations.get(mp.BATCH_ANNOTATION)   # a spec.map batch: one run per element
        why = ""
        try:
            jobs = mp.jobs_of_batch(obj, job) if over else [job]
        except ValueError as exc:
            jobs, why = [], str(exc)
        key = (mp.batch_key(over, [j.key for j in jobs]) if over else job.key) if jobs else ""
        if key != a.cache_key:
            message = why if not jobs else \
                f"the job manifest {a.job_digest} derives key {key}, status says {a.cache_key}"
            self._report(obj, a, lambda s: st.failed(s, a.generation, p.REASON_INVALID, message,
                                                     datetime.now(UTC)))
            return
        # No lookup here: the operator looked the key up under the cache's trust policy before it
        # assigned the job, and this node's own signature must not stand in for what that policy
        # refused (a cache with minSignatures: 2 would be served one node's result).
        if over:
            self._compute_batch(obj, a, jobs, store, pool)
        else:
            self._compute(obj, a, job, store, pool)

    def _compute(self, obj: dict[str, Any], a: Assignment, job: Job, store: Store, pool: SandboxPool) -> None:
        node, run_id = self.cfg.node, new_run_id()
        if not is_replica(obj):
            events.run_started(lineage.identity(obj), run_id, a.cache_key, lineage.cache_label(obj))
        out = self._execute(obj, a, job, store, pool)
        if isinstance(out, _Failed):
            self._attempt_failed(obj, a, out.reason, out.message, out.detail, record=lambda: self._record(
                obj, job, store, out.execution, run_id, failure=f"{out.reason}: {out.message}"))
            return
        attested = a.policy != "Bypass" and a.cache_result
        kept = self._record(obj, job, store, out.execution, run_id, result=(out.digest, out.result),
                            signer=self.signer.keyid if attested else None)
        done = self._report(obj, a, lambda s: st.succeeded(s, a.generation, node, out.digest, out.result, a.store,
                                                           out.ms, datetime.now(UTC), kept))
        self.kube.event(done, p.REASON_COMPUTED, f"computed on {node} in {out.ms} ms, result {out.digest[:15]}",
                        component=p.AGENT_COMPONENT, host=node)

    def _compute_batch(self, obj: dict[str, Any], a: Assignment, jobs: list[Job], store: Store,
                       pool: SandboxPool) -> None:
        """Each element of a map's batch as its own run (own key, result, attestation, ref and run
        record), in order; the first that fails fails this attempt, naming it (a retry runs the
        batch again)."""
        node, started, digests, sizes = self.cfg.node, time.monotonic(), list[str](), list[int]()
        attested = a.policy != "Bypass" and a.cache_result
        for index, element in enumerate(jobs):
            run_id = new_run_id()
            out = self._execute(obj, a, element, store, pool)
            if isinstance(out, _Failed):
                self._record(obj, element, store, out.execution, run_id, failure=f"{out.reason}: {out.message}")
                self._attempt_failed(obj, a, out.reason, f"element {index} of the batch: {out.message}", out.detail,
                                     extra=st.batch_failure(len(jobs), digests, index, sizes))
                return
            self._record(obj, element, store, out.execution, run_id, result=(out.digest, out.result),
                         signer=self.signer.keyid if attested else None)
            digests.append(out.digest)
            sizes.append(out.result.logical_size)   # the operator's usage index records each element's write
        ms = int((time.monotonic() - started) * 1000)
        done = self._report(obj, a, lambda s: st.batch_succeeded(s, a.generation, node, digests, ms,
                                                                 datetime.now(UTC), sizes))
        self.kube.event(done, p.REASON_COMPUTED, f"computed {len(jobs)} elements on {node} in {ms} ms",
                        component=p.AGENT_COMPONENT, host=node)

    def _execute(self, obj: dict[str, Any], a: Assignment, job: Job, store: Store, pool: SandboxPool
                 ) -> _Done | _Failed:
        """Run `job` and keep its result (attested, under its key, unless not cached)."""
        node = self.cfg.node
        try:
            execution = execute(job, store, pool, node=node)
        except MemoplaneError as exc:
            return _Failed(p.REASON_STORE, str(exc), "", None)
        if execution.result is None or execution.digest is None:
            failure = execution.failure
            reason = failure.reason if failure else "sandbox"
            message = failure.message if failure else "the sandbox returned no result and no reason"
            detail = (failure.detail if failure and failure.detail else "") or \
                execution.outcome.stderr.decode("utf-8", "replace")
            self.metrics.runs.labels("failed").inc()
            return _Failed(reason, message, detail, execution)
        result, digest = execution.result, execution.digest
        if is_replica(obj):  # stored and attested, not believed on its own: the parent compares (no ref)
            result, digest = store_replica(store, job, result, self.signer, node, checked_digest(obj))
        elif a.policy != "Bypass" and a.cache_result:  # attested and durable before anyone is told
            provenance = execution.result.provenance
            envelope = attest(execution.key, job.key_parts().components(), execution.digest, self.signer, node,
                              provenance.started_at, provenance.ended_at)
            store.set_ref(execution.key, execution.digest,
                          [store.put_attestation(execution.key, execution.digest, envelope)])
        self.metrics.runs.labels("succeeded").inc()
        self.metrics.bytes_stored.inc(result.logical_size)
        return _Done(digest, result, int(execution.outcome.duration_s * 1000), execution)

    def _record(self, obj: Mapping[str, Any], job: Job, store: Store, execution: Execution | None, run_id: str, *,
                result: tuple[str, ResultManifest] | None = None, signer: str | None = None,
                failure: str | None = None) -> str | None:
        """Append this run's record to the job's store before the status write that names its run id
        (a crash in between leaves a record no status names; never a status naming no record), and
        announce it settled. `signer`: this node's key id when it attested the result. The run id,
        None when the record was not kept (a replica's: its parent's record stands for it)."""
        if is_replica(obj):
            return None
        provenance = result[1].provenance if result is not None else None
        seconds = execution.outcome.duration_s if execution is not None else 0.0
        record = lineage.job_record(
            obj, job, run_id=run_id, result=result[0] if result else None,
            result_size=result[1].logical_size if result else None, node=self.cfg.node, signer=signer,
            started=provenance.started_at if provenance else time.time() - seconds,
            ended=provenance.ended_at if provenance else time.time(), cached=False,
            compute_seconds=seconds, failure=failure, store=store)
        kept = history.append(store, record)
        events.run_settled(record)
        return run_id if kept else None

    def _attempt_failed(self, obj: dict[str, Any], a: Assignment, reason: str, message: str, detail: str,
                        record: Callable[[], str | None] | None = None,
                        extra: Mapping[str, Any] | None = None) -> None:
        """`record`: appends the failed run's record (every attempt is a run; the final one's id goes
        into the status). `extra`: more status fields (a batch's results so far)."""
        decision = after_failure(a.attempts, a.backoff_limit, reason, base=self.cfg.backoff_base)
        run_id = record() if record is not None else None
        now = datetime.now(UTC)
        more = dict(extra or {})
        if decision.retry:
            self._report(obj, a, lambda s: {**st.retrying(s, a.generation, a.attempts, reason, message,
                                                          decision.delay_s, now, stderr_tail=detail or None), **more})
            self.kube.event(obj, p.REASON_BACKOFF, f"attempt {a.attempts} failed ({reason}): {message[:200]}",
                            warning=True, component=p.AGENT_COMPONENT, host=self.cfg.node)
            return
        text = message if a.attempts <= 1 else f"{message} (after {a.attempts} attempts)"
        self._report(obj, a, lambda s: {**st.failed(s, a.generation, reason, text, now, stderr_tail=detail or None,
                                                    attempts=a.attempts, run_id=run_id), **more})
        self.kube.event(obj, "Failed", f"{reason}: {message[:300]}", warning=True, component=p.AGENT_COMPONENT,
                        host=self.cfg.node)

    def _agent_failed(self, obj: dict[str, Any], a: Assignment, exc: Exception) -> None:
        """An exception from our own code while handling a claimed job: a failed attempt like any
        other, so backoffLimit bounds it. If even that report fails, log it and give up: the job
        stays Running on this node until the next claim of it (never a loop here)."""
        try:
            detail = "".join(traceback.format_exception(exc))
            log.error("%s/%s: agent error (attempt %d):\n%s", a.namespace, a.name, a.attempts, detail)
            self._attempt_failed(obj, a, p.REASON_AGENT_ERROR, agent_error_message(exc), detail)
        except _Stale:
            log.info("%s/%s: assignment changed before the agent error was reported", a.namespace, a.name)
        except Exception:  # noqa: BLE001 - last resort: logged, never retried here (see above)
            log.error("%s/%s: could not report the agent error:\n%s", a.namespace, a.name, traceback.format_exc())


def agent_error_message(exc: BaseException) -> str:
    """One line naming what failed: the exception, where it was raised, its first line."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" in {frames[-1].name} ({os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "no message"
    return f"the agent failed while handling the job: {type(exc).__name__}{where}: {text}"
