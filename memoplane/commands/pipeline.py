"""ComputeJob manifests run embedded, keyed exactly as on a cluster.

Each job is resolved by the cluster's own `memoplane.cluster.resolve.resolve`, through
`ApplyLookups` (the applied manifests and the local store instead of the API server and
the cluster's store), with the runtime digest a local agent would advertise for the job's
profile (`memoplane.keys.runtime_identity`, as memoplane_agent does): so the keys are the
cluster's by construction. Jobs run in fromJob order through `memoplane.embedded.run_job`,
which appends a run record each; fromJob inputs name the upstream run of this apply.

No state file: propagation is decided by the keys alone. An upstream whose code or inputs
changed gets a new key and recomputes; its downstream's input digest is that of the new
result's value, so the downstream's key changes only if the value did. If it did not, the
downstream's key is one the store already holds and it is served (early cutoff).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import count
from pathlib import Path
from typing import Any

from ..api.computejob import Input as SpecInput
from ..cas import BlobRef, Provenance, ResultManifest, Store
from ..chunkmap.embedded import run_chunk_map
from ..cluster import mapping as mp
from ..cluster import protocol as p
from ..cluster import resolve as rs
from ..cluster import retry
from ..embedded import RunHistory, run_job
from ..errors import InputError, JobFailed, MemoplaneError, NotFound, StoreCorrupted
from ..execute import SandboxRunner
from ..history import build as records
from ..history.records import InputRecord, JobIdentity, RunRecord, new_run_id
from ..jobs import BlobInput, Input, Job, JsonInput
from ..keys import digest_value, runtime_identity
from ..run_report import RunReport
from ..sandbox.profiles import PROFILES
from ..trust import SigningKey, TrustPolicy, trusted_hit
from ..trust.local import commit_signed
from .chunks import configured_task_bytes
from .manifests import JobDoc, Manifests, Ref

NODE = "local"
NOT_EMBEDDED = "not supported embedded"


@dataclass
class Outcome:
    """What happened to one job in this apply."""

    ref: Ref
    state: str                               # computed | cached | failed | skipped
    key: str | None = None
    result: str | None = None                # the result manifest's digest
    value_digest: str | None = None          # what a downstream's input digest is (the value's)
    value: Any = None
    value_kind: str = "json"                 # memoplane.cas.records.VALUE_KINDS
    run_id: str = ""
    changed: list[str] = field(default_factory=list)      # upstreams whose value differs from the last run's
    early_cutoff: list[str] = field(default_factory=list)  # upstreams recomputed here to the value this
    #                                                       job's last run saw: it was served
    why: list[str] = field(default_factory=list)          # what changed in the key (computed jobs)
    message: str = ""                                      # why it failed or was skipped
    attempts: int = 0
    map: dict[str, int] | None = None                      # a map parent: total, computed, cached

    @property
    def ok(self) -> bool:
        return self.state in ("computed", "cached")


class ApplyLookups:
    """`resolve.Lookups` over the applied manifests and the local store: a ComputeJob of this
    apply has the status of its run here (Succeeded with its result, or Failed)."""

    def __init__(self, manifests: Manifests, namespace: str, store: Store, outcomes: Mapping[Ref, Outcome],
                 objects: Mapping[tuple[str, str], Path]) -> None:
        self.manifests, self.namespace, self.store, self.outcomes, self.objects = \
            manifests, namespace, store, outcomes, objects

    def get_job(self, name: str) -> Mapping[str, Any] | None:
        return self._job((self.namespace, name))

    def foreign_job(self, namespace: str, name: str) -> tuple[Mapping[str, Any] | None, str]:
        denied = "" if namespace == self.namespace else (
            f"{NOT_EMBEDDED}: reading another namespace's results is its ResultCache's sharing decision; "
            "put the jobs in one namespace, or apply the manifests to a cluster")
        return self._job((namespace, name)), denied

    def _job(self, ref: Ref) -> Mapping[str, Any] | None:
        doc = self.manifests.jobs.get(ref)
        if doc is None:
            return None
        done = self.outcomes.get(ref)
        status: dict[str, Any] = {}
        if done is not None and done.ok:
            status = {"phase": p.SUCCEEDED, "result": {"digest": done.result}}
        elif done is not None:
            status = {"phase": p.FAILED, "failure": {"reason": done.state, "message": done.message}}
        return {**doc.obj, "status": status}

    def get_config_map(self, name: str) -> Mapping[str, Any] | None:
        return self.manifests.config_maps.get((self.namespace, name))

    def result_input(self, result_digest: str, store_url: str | None) -> Input:
        try:
            value = self.store.get_result(result_digest).value
            if value.blob is None:
                return JsonInput(value.inline)
            if value.kind == "json":
                return JsonInput(json.loads(self.store.get_bytes(value.blob.digest)))
            self.store.blob_manifest(value.blob.digest)  # present and sealed
            return BlobInput(value.blob.digest, value.blob.size)
        except (NotFound, StoreCorrupted) as exc:
            raise rs.LookupError_("UpstreamResultUnavailable", str(exc)) from None
        except MemoplaneError as exc:
            raise rs.LookupError_(p.REASON_STORE, str(exc)) from None

    def object_refusal(self, bucket: str, key: str) -> str | None:
        if (bucket, key) in self.objects:
            return None
        return f"{NOT_EMBEDDED} without a local copy: pass --object {bucket}/{key}=PATH"

    def object_input(self, bucket: str, key: str) -> BlobInput | None:
        path = self.objects[(bucket, key)]
        if not path.is_file():
            return None
        ref = self.store.put_file(path)
        return BlobInput(ref.digest, ref.size)

    def put_bytes(self, data: bytes) -> BlobInput:
        ref = self.store.put_bytes(data)
        return BlobInput(ref.digest, ref.size)

    def stored_blob(self, digest: str) -> BlobInput | None:
        try:
            return BlobInput(digest, self.store.blob_manifest(digest).size)  # in the local store: present, sealed
        except NotFound:
            return None
        except MemoplaneError as exc:
            raise rs.LookupError_(p.REASON_STORE, str(exc)) from None

    def get_seed(self, name: str) -> Mapping[str, Any] | None:
        return self.manifests.seeds.get((self.namespace, name))

    def seed_overlay(self, digest: str, store_url: str) -> BlobInput:
        raise rs.LookupError_(p.REASON_INVALID, f"a seed overlay is {NOT_EMBEDDED}")


def label(ref: Ref, namespace: str = "") -> str:
    """A job's name as seen from `namespace` (namespace/name from elsewhere)."""
    return ref[1] if ref[0] == namespace else f"{ref[0]}/{ref[1]}"


def order(manifests: Manifests) -> list[Ref]:
    """The jobs, each after its fromJob upstreams (document order otherwise); a cycle is refused
    with its path."""
    done: dict[Ref, None] = {}
    for start in manifests.jobs:
        path: list[Ref] = []
        _visit(manifests, start, path, done)
    return list(done)


def _visit(manifests: Manifests, ref: Ref, path: list[Ref], done: dict[Ref, None]) -> None:
    if ref in done or ref not in manifests.jobs:
        return  # an upstream not in this apply: resolution says so, naming the input
    if ref in path:
        cycle = [*path[path.index(ref):], ref]
        raise _cycle_error(cycle)
    path.append(ref)
    for up in rs.upstream_refs(manifests.jobs[ref].obj):
        _visit(manifests, up, path, done)
    path.pop()
    done[ref] = None


def _cycle_error(cycle: list[Ref]) -> InputError:
    names = " -> ".join(label(r, cycle[0][0]) for r in cycle)
    return InputError(f"fromJob inputs form a cycle: {names}", "break the cycle: a job cannot depend on its own result")


@dataclass
class Context:
    """What every job of one apply shares."""

    manifests: Manifests
    store: Store
    trust: TrustPolicy
    signer: SigningKey
    sandbox: Callable[[str], Callable[[], SandboxRunner]]   # profile -> a lazy pool
    objects: Mapping[tuple[str, str], Path] = field(default_factory=dict)
    outcomes: dict[Ref, Outcome] = field(default_factory=dict)
    sleep: Callable[[float], None] = time.sleep

    def lookups(self, namespace: str) -> ApplyLookups:
        return ApplyLookups(self.manifests, namespace, self.store, self.outcomes, self.objects)


def apply(ctx: Context, on_done: Callable[[Outcome], None] = lambda _: None) -> list[Outcome]:
    """Run every job once, in fromJob order; a failed job's downstream jobs are skipped."""
    for ref in order(ctx.manifests):
        outcome = _apply_one(ctx, ctx.manifests.jobs[ref])
        ctx.outcomes[ref] = outcome
        on_done(outcome)
    return list(ctx.outcomes.values())


def _apply_one(ctx: Context, doc: JobDoc) -> Outcome:
    failed = [up for up in rs.upstream_refs(doc.obj) if up in ctx.outcomes and not ctx.outcomes[up].ok]
    if failed:
        names = ", ".join(label(up, doc.ref[0]) for up in failed)
        return Outcome(doc.ref, "skipped", message=f"upstream {names} did not succeed")
    if mp.is_chunk_map(doc.obj):
        return _apply_chunks(ctx, doc)
    if doc.job.spec.map is not None:
        return _apply_map(ctx, doc)
    return _resolve_and_run(ctx, doc, doc.obj, doc.ref)


def _apply_chunks(ctx: Context, doc: JobDoc) -> Outcome:
    """spec.map.overChunks: the parent resolved as a plain job (its overChunks input the whole blob),
    then its chunk tree run as the operator's chunker runs it (memoplane.chunkmap: the same node
    jobs, so the cluster's keys); the root node's result is the parent's."""
    spec = doc.job.spec
    runtime = _runtime(spec.runtime.profile)
    if runtime is None:
        return Outcome(doc.ref, "failed", message=f"spec.runtime.profile '{spec.runtime.profile}': no local runtime")
    plain = {**doc.obj, "spec": mp.chunk_spec(doc.obj, keep_over=True)}
    got = rs.resolve(plain, runtime, ctx.lookups(doc.ref[0]), datetime.now(UTC), grace=0.0)
    if not isinstance(got, rs.Resolved):
        return Outcome(doc.ref, "failed", message=got.message)
    over, combine = str(mp.chunks_over(doc.obj)), str(spec.python.combine if spec.python else "")
    try:
        report = run_chunk_map(got.job, over, combine, ctx.store, ctx.sandbox(spec.runtime.profile),
                               policy=spec.cache.policy, identity=f"apply:{doc.ref[0]}/{doc.ref[1]}",
                               trust=ctx.trust, signer=ctx.signer, target=configured_task_bytes())
    except (JobFailed, InputError) as exc:
        return Outcome(doc.ref, "failed", message=str(exc))
    result = ctx.store.read_ref(report.root_key)
    computed = report.leaf_runs + report.combine_runs
    outcome = Outcome(doc.ref, "computed" if computed else "cached", key=report.root_key, result=result,
                      value=report.value, value_digest=JsonInput(report.value).digest)
    outcome.map = {"total": report.leaves + report.combines, "computed": computed,
                   "cached": report.leaves + report.combines - computed}
    return outcome


def _spec_inputs(doc: JobDoc, obj: Mapping[str, Any]) -> list[SpecInput]:
    """The job's inputs but a map child's element, which is a value (mapping.child_spec)."""
    over = mp.over_of(doc.obj) if obj is not doc.obj else None
    return [item for item in doc.job.spec.inputs if item.name != over]


def _runtime(profile: str) -> str | None:
    """What a local agent advertises for `profile` (memoplane_agent: runtime_identity(profile))."""
    return runtime_identity(profile).digest if profile in PROFILES else None


def _resolve_and_run(ctx: Context, doc: JobDoc, obj: Mapping[str, Any], ref: Ref) -> Outcome:
    profile = doc.job.spec.runtime.profile
    runtime = _runtime(profile)
    if runtime is None:
        return Outcome(ref, "failed", message=f"spec.runtime.profile '{profile}': no local runtime of that "
                                              f"name (known: {', '.join(sorted(PROFILES))})")
    got = rs.resolve(obj, runtime, ctx.lookups(ref[0]), datetime.now(UTC), grace=0.0)
    if not isinstance(got, rs.Resolved):
        return Outcome(ref, "failed", message=got.message)
    return _run(ctx, doc, got.job, ref, _spec_inputs(doc, obj))


def _sources(ctx: Context, namespace: str, inputs: list[SpecInput]) -> dict[str, InputRecord]:
    """Where each input came from; a fromJob input names the upstream's run in this apply."""
    out = {}
    for item in inputs:
        if item.from_job is not None:
            up = (item.from_job.namespace or namespace, item.from_job.name)
            done = ctx.outcomes.get(up)
            out[item.name] = InputRecord(item.name, "", source="fromJob", upstream_job=f"{up[0]}/{up[1]}",
                                         upstream_result=done.result if done else None,
                                         upstream_run=(done.run_id or None) if done else None)
        elif "value" not in item.sources():
            out[item.name] = InputRecord(item.name, "", source=next(iter(item.sources())))
    return out


def _run(ctx: Context, doc: JobDoc, job: Job, ref: Ref, inputs: list[SpecInput]) -> Outcome:
    """run_job, retried as the cluster retries (spec.backoffLimit, memoplane.cluster.retry)."""
    spec = doc.job.spec
    identity = f"apply:{ref[0]}/{ref[1]}"
    previous = RunHistory(ctx.store).previous(identity)
    for attempt in count(1):
        try:
            report = run_job(job, ctx.store, ctx.sandbox(spec.runtime.profile), policy=spec.cache.policy,
                             identity=identity, trust=ctx.trust, signer=ctx.signer, node=NODE,
                             job_identity=JobIdentity(ref[0], ref[1]), sources=_sources(ctx, ref[0], inputs))
        except JobFailed as exc:
            reason = getattr(getattr(exc, "failure", None), "reason", "")
            decision = retry.after_failure(attempt, spec.backoff_limit, reason)
            if not decision.retry:
                return Outcome(ref, "failed", key=job.key_parts().key, message=str(exc), attempts=attempt)
            ctx.sleep(decision.delay_s)
            continue
        return _succeeded(ctx, ref, job, inputs, report, previous, attempt)
    raise AssertionError("unreachable")


def _succeeded(ctx: Context, ref: Ref, job: Job, inputs: list[SpecInput], report: RunReport,
               previous: Mapping[str, Any] | None, attempts: int) -> Outcome:
    outcome = Outcome(ref, "cached" if report.cached else "computed", key=report.cache_key,
                      result=report.result_digest, value=report.value, value_kind=report.value_kind,
                      run_id=report.run_id,
                      why=report.explain, attempts=attempts,
                      value_digest=ctx.lookups(ref[0]).result_input(report.result_digest, None).digest)
    before = (previous or {}).get("inputs") or {}
    now = job.key_parts().inputs
    for item in inputs:
        if item.from_job is None:
            continue
        up = (item.from_job.namespace or ref[0], item.from_job.name)
        name = label(up, ref[0])
        if item.name not in before:
            continue  # no earlier run of this job saw this input: nothing to compare
        if before[item.name] != now.get(item.name):
            outcome.changed.append(name)
        elif report.cached and ctx.outcomes.get(up, outcome).state == "computed" and name not in outcome.early_cutoff:
            outcome.early_cutoff.append(name)   # recomputed to the value this job saw last time
    return outcome


# -- spec.map ----------------------------------------------------------------------------------


def _elements(ctx: Context, doc: JobDoc) -> list[Any] | str:
    """The `over` input's list (a value, or an upstream's JSON result), or why not."""
    over = mp.over_of(doc.obj)
    raw = mp.over_input(doc.obj)
    if raw is None:
        return f"spec.map.over: '{over}' is not the name of an input"
    item = SpecInput.model_validate(raw)
    got = rs.resolve_input(item, doc.ref[1], ctx.lookups(doc.ref[0]), None, datetime.now(UTC), 0.0)
    if isinstance(got, rs.Waiting | rs.Failed):
        return got.message
    if not isinstance(got, JsonInput):
        return f"spec.map.over: input '{over}' is not JSON: map over a JSON list"
    return mp.elements_problem(got.value, over) or list(got.value)


def _apply_map(ctx: Context, doc: JobDoc) -> Outcome:
    """One run per distinct element (a child ComputeJob as the cluster makes it); the parent's key
    and result as the cluster defines them (memoplane.cluster.mapping)."""
    started = time.time()
    items = _elements(ctx, doc)
    if isinstance(items, str):
        return Outcome(doc.ref, "failed", message=items)
    children: dict[str, Outcome] = {}
    for element in items:
        manifest = _element_manifest(doc, element)
        name = manifest["metadata"]["name"]
        if name not in children:
            children[name] = _resolve_and_run(ctx, doc, manifest, (doc.ref[0], name))
    for index, element in enumerate(items):
        child = children[_element_name(doc, element)]
        if not child.ok:
            return Outcome(doc.ref, "failed", message=f"spec.map: element {index} ({child.ref[1]}): {child.message}")
        if child.value_kind != "json":   # as the operator's mapper says
            return Outcome(doc.ref, "failed", message=f"spec.map: element {index}: ComputeJob '{child.ref[1]}' "
                                                      f"returned {child.value_kind}, not JSON: a map's values must be JSON")
    names = [_element_name(doc, e) for e in items]
    outcome = _map_result(ctx, doc, names, children)
    computed = sum(c.state == "computed" for c in children.values())
    outcome.map = {"total": len(items), "computed": computed, "cached": len(children) - computed}
    outcome.run_id = _map_record(ctx, doc, outcome, names, children, started)
    return outcome


def element_job_name(parent: str, element: Any) -> str:
    """A sub-task's name in this apply's output and history: the parent's and the element's digest."""
    return f"{parent}-{digest_value(element)[3:13]}"


def _element_name(doc: JobDoc, element: Any) -> str:
    return element_job_name(doc.ref[1], element)


def _element_manifest(doc: JobDoc, element: Any) -> dict[str, Any]:
    """The sub-task of one element as a plain job (memoplane.cluster.mapping.child_spec: the key is
    the one the operator derives for that element)."""
    return {"apiVersion": doc.obj.get("apiVersion"), "kind": "ComputeJob",
            "metadata": {"name": _element_name(doc, element), "namespace": doc.ref[0]},
            "spec": mp.child_spec(doc.obj, element)}


def _map_result(ctx: Context, doc: JobDoc, names: list[str], children: Mapping[str, Outcome]) -> Outcome:
    """The list of the children's values under the map key: the stored one if trusted, else a new one
    signed by this user's key (as the operator signs its own)."""
    over = mp.over_of(doc.obj)
    keys = [str(children[n].key) for n in names]
    key = mp.map_key(over, keys)
    values = [children[n].value for n in names]
    hit = trusted_hit(ctx.store, key, ctx.trust).hit if doc.job.spec.cache.policy == "Use" else None
    if hit is not None:
        digest, state = hit.digest, "cached"
    else:
        now = time.time()
        empty = ctx.store.put_bytes(b"")
        result = ResultManifest(ctx.store.put_value(values), BlobRef(empty.digest, 0), BlobRef(empty.digest, 0),
                                Provenance(key, {f"{over}[{i}]": k for i, k in enumerate(keys)}, "", NODE,
                                           now, now, 0.0),
                                meta={"map": {"over": over, "children": names}})
        digest, state = ctx.store.put_result(result), "computed"
        commit_signed(ctx.store, mp.map_manifest(over, keys), result, digest, ctx.signer)
    value_digest = ctx.lookups(doc.ref[0]).result_input(digest, None).digest
    return Outcome(doc.ref, state, key=key, result=digest, value=values, value_digest=value_digest)


def _map_record(ctx: Context, doc: JobDoc, outcome: Outcome, names: list[str], children: Mapping[str, Outcome],
                started: float) -> str:
    """The parent's run record: its inputs are the children's runs, one per element."""
    inputs = tuple(InputRecord(f"{mp.over_of(doc.obj)}[{i}]", str(children[n].key), source="fromJob",
                               upstream_job=f"{doc.ref[0]}/{n}", upstream_result=children[n].result,
                               upstream_run=children[n].run_id or None) for i, n in enumerate(names))
    record = RunRecord(run_id=new_run_id(), job=JobIdentity(*doc.ref), key=str(outcome.key), result=outcome.result,
                       inputs=inputs, code="", runtime="", env={}, node=NODE, signer=ctx.signer.keyid,
                       started=started, ended=time.time(), cached=outcome.state == "cached", compute_seconds=0.0,
                       policy=doc.job.spec.cache.policy, result_size=None,
                       components=mp.map_manifest(mp.over_of(doc.obj), [str(children[n].key) for n in names]))
    return record.run_id if records.append(ctx.store, record) else ""
