"""ComputeJob spec -> a resolved `memoplane.jobs.Job`, or why not yet / why never.

Resolution is where mutable names (an upstream job, a ConfigMap, an object key) become
content digests, so the cache key never depends on a name. The decisions are pure; the
reads go through `Lookups`, which the operator implements over the API server and the
store, and tests implement with dicts.

Missing things (an upstream job, a ConfigMap, an object) are waited for during
MISSING_GRACE_SECONDS after the job was created — `kubectl apply -f dag.yaml` creates the
jobs one by one and the operator may see a downstream job first — and then fail clearly.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from ..api.computejob import ComputeJob, SeedRef
from ..api.computejob import Input as SpecInput
from ..api.specs import SpecError, parse_computejob
from ..canonical import json_depth_exceeds, too_deep
from ..jobs import BlobInput, CommandCode, Input, Job, JsonInput, PythonCode, SeedInput
from ..quantity import parse_quantity
from ..sandbox.types import Limits
from ..settings import MISSING_GRACE_SECONDS
from . import protocol as p
from . import seeds
from .lineage import upstream_runs
from .propagate import from_job_inputs
from .views import job, section

MAX_CHAIN = 64  # fromJob edges followed when looking for a cycle


@dataclass(frozen=True)
class Resolved:
    job: Job
    input_digests: dict[str, str] = field(default_factory=dict)
    upstreams: list[dict[str, Any]] = field(default_factory=list)  # status.upstreams (memoplane.cluster.lineage)


@dataclass(frozen=True)
class Waiting:
    reason: str
    message: str


@dataclass(frozen=True)
class Failed:
    reason: str
    message: str


Resolution = Resolved | Waiting | Failed


class LookupError_(Exception):
    """A lookup failed for a reason worth reporting (store unreachable, damaged result)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Lookups(Protocol):
    """What resolution reads. Objects are plain dicts as the API server returns them."""

    def get_job(self, name: str) -> Mapping[str, Any] | None: ...

    def foreign_job(self, namespace: str, name: str) -> tuple[Mapping[str, Any] | None, str]:
        """A ComputeJob of another namespace and why this namespace may not read its result
        ("": it may, as its ResultCache's spec.sharing.readers says)."""
        ...

    def get_config_map(self, name: str) -> Mapping[str, Any] | None: ...

    def result_input(self, result_digest: str, store_url: str | None) -> Input:
        """The return value of a stored result (in the store at `store_url`, None: the
        job's own) as an input: a JSON value, or a blob in the job's store.
        Raises LookupError_ when the result cannot be read."""
        ...

    def object_refusal(self, bucket: str, key: str) -> str | None:
        """Why the job's namespace may not read the object as an input (None: it may;
        memoplane.cluster.objectinputs decides)."""
        ...

    def object_input(self, bucket: str, key: str) -> BlobInput | None:
        """The object's content hashed into the store; None if it does not exist."""
        ...

    def put_bytes(self, data: bytes) -> BlobInput: ...

    def stored_blob(self, digest: str) -> BlobInput | None:
        """A blob already stored for the job's namespace (fromBlob), as a blob in the job's store;
        None if it is not there. Raises LookupError_ when it cannot be read."""
        ...

    def get_seed(self, name: str) -> Mapping[str, Any] | None: ...

    def seed_overlay(self, digest: str, store_url: str) -> BlobInput:
        """A seed's overlay blob (in the store at `store_url`) as a blob in the job's store.
        Raises LookupError_ when it cannot be read."""
        ...


class SeenJobs:
    """`Lookups` that remembers every ComputeJob object it returned, by (namespace, name)."""

    def __init__(self, lookups: Lookups, namespace: str) -> None:
        self.lookups, self.namespace = lookups, namespace
        self.seen: dict[tuple[str, str], Mapping[str, Any]] = {}

    def get_job(self, name: str) -> Mapping[str, Any] | None:
        found = self.lookups.get_job(name)
        if found is not None:
            self.seen[(self.namespace, name)] = found
        return found

    def foreign_job(self, namespace: str, name: str) -> tuple[Mapping[str, Any] | None, str]:
        found, denied = self.lookups.foreign_job(namespace, name)
        if found is not None:
            self.seen[(namespace, name)] = found
        return found, denied

    def get_config_map(self, name: str) -> Mapping[str, Any] | None:
        return self.lookups.get_config_map(name)

    def result_input(self, result_digest: str, store_url: str | None) -> Input:
        return self.lookups.result_input(result_digest, store_url)

    def object_refusal(self, bucket: str, key: str) -> str | None:
        return self.lookups.object_refusal(bucket, key)

    def object_input(self, bucket: str, key: str) -> BlobInput | None:
        return self.lookups.object_input(bucket, key)

    def put_bytes(self, data: bytes) -> BlobInput:
        return self.lookups.put_bytes(data)

    def stored_blob(self, digest: str) -> BlobInput | None:
        return self.lookups.stored_blob(digest)

    def get_seed(self, name: str) -> Mapping[str, Any] | None:
        return self.lookups.get_seed(name)

    def seed_overlay(self, digest: str, store_url: str) -> BlobInput:
        return self.lookups.seed_overlay(digest, store_url)


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def _missing(what: str, created: datetime | None, now: datetime, grace: float) -> Waiting | Failed:
    age = (now - created).total_seconds() if created else grace + 1
    if age < grace:
        return Waiting(p.REASON_NOT_FOUND, f"{what} does not exist (yet): waiting up to {grace:.0f}s")
    return Failed(p.REASON_NOT_FOUND, f"{what} does not exist: create it, or fix the name")


def limits_of(job: ComputeJob) -> Limits:
    """spec.resources -> sandbox limits (cpu is a scheduling hint, not a limit here)."""
    res = job.spec.resources
    kwargs: dict[str, Any] = {}
    if res.timeout_seconds is not None:
        kwargs["timeout_s"] = float(res.timeout_seconds)
    if res.memory is not None:
        kwargs["memory_bytes"] = int(parse_quantity(res.memory))
    if res.max_output_bytes is not None:
        kwargs["max_output_bytes"] = int(parse_quantity(res.max_output_bytes))
    return Limits(**kwargs)


def upstream_state(obj: Mapping[str, Any]) -> tuple[str | None, bool]:
    """(phase, current): current = the status describes the latest spec."""
    view = job(obj)
    generation = view.meta.raw.get("generation")
    current = generation is None or view.status.raw.get("observedGeneration") == generation
    return view.status.phase, current


def upstream_refs(obj: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The (namespace, name) of the jobs named by the spec's fromJob inputs."""
    return [upstream for _, upstream in from_job_inputs(obj)]


def _get_job(lookups: Lookups, namespace: str, ref: tuple[str, str]) -> Mapping[str, Any] | None:
    """`ref` as read from a job in `namespace`."""
    return lookups.get_job(ref[1]) if ref[0] == namespace else lookups.foreign_job(*ref)[0]


def find_cycle(obj: Mapping[str, Any], lookups: Lookups) -> list[str] | None:
    """A fromJob path from `obj` back to itself through unfinished jobs, if any (names; namespace/name
    for another namespace's jobs)."""
    here = job(obj).ref
    stack: list[tuple[tuple[str, str], list[str]]] = [(here, [here[1]])]
    seen: set[tuple[str, str]] = set()
    while stack:
        current, path = stack.pop()
        if current in seen or len(path) > MAX_CHAIN:
            continue
        seen.add(current)
        found = _get_job(lookups, here[0], current)
        if found is None:
            continue
        if current != here and upstream_state(found)[0] in p.TERMINAL:
            continue  # a finished job's inputs are settled: no wait goes through it
        for up in upstream_refs(found):
            step = up[1] if up[0] == here[0] else f"{up[0]}/{up[1]}"
            if up == here:
                return [*path, step]
            stack.append((up, [*path, step]))
    return None


def resolve_input(item: SpecInput, name: str, lookups: Lookups, created: datetime | None,
                   now: datetime, grace: float, field: str = "") -> Input | Waiting | Failed:
    """`field`: where the input is in the spec (spec.inputs[i]), for messages that name a field."""
    got = _resolve_source(item, name, lookups, created, now, grace, field)
    if item.as_ is None or isinstance(got, (Waiting, Failed)):
        return got
    if not isinstance(got, BlobInput):
        # An upstream that returned JSON: its value has no file to hand over by path.
        return Failed(p.REASON_INVALID, f"{field or repr(item.name)}.as: {item.as_} for an input that resolved to a "
                      "JSON value is not supported yet: remove as, or have the upstream return bytes or a file")
    return replace(got, delivery=item.as_)


def _resolve_source(item: SpecInput, name: str, lookups: Lookups, created: datetime | None,
                    now: datetime, grace: float, field: str) -> Input | Waiting | Failed:
    label = f"input '{item.name}'"
    if "value" in item.sources():
        return JsonInput(item.value)
    if item.from_job is not None and item.from_job.namespace is not None:
        return _foreign_upstream(item, lookups, created, now, grace, field or label)
    if item.from_job is not None:
        upstream = item.from_job.name
        if upstream == name:
            return Failed(p.REASON_INVALID, f"{label}: a job cannot take its own result as input")
        obj = lookups.get_job(upstream)
        if obj is None:
            return _missing(f"{label}: ComputeJob '{upstream}'", created, now, grace)
        return _upstream_result(label, upstream, obj, lookups)
    if item.from_config_map is not None:
        ref = item.from_config_map
        cm = lookups.get_config_map(ref.name)
        data, binary = section(cm, "data"), section(cm, "binaryData")
        if ref.key in data:
            return lookups.put_bytes(str(data[ref.key]).encode("utf-8"))
        if ref.key in binary:
            return lookups.put_bytes(base64.b64decode(binary[ref.key]))
        what = f"{label}: ConfigMap '{ref.name}'" if cm is None else \
            f"{label}: key '{ref.key}' of ConfigMap '{ref.name}'"
        return _missing(what, created, now, grace)
    if item.from_object is not None:
        ref_o = item.from_object
        # A refusal fails the job rather than waiting: the allowlist changes only with the
        # operator's configuration, and the reason says whom to ask.
        refused = lookups.object_refusal(ref_o.bucket, ref_o.key)
        if refused:
            return Failed(p.REASON_OBJECT_NOT_ALLOWED, f"{field or label}.fromObject: {refused}")
        try:
            blob = lookups.object_input(ref_o.bucket, ref_o.key)
        except LookupError_ as exc:
            return Waiting(exc.reason, f"{label}: {exc.message}")
        if blob is None:
            return _missing(f"{label}: object s3://{ref_o.bucket}/{ref_o.key}", created, now, grace)
        return blob
    if item.from_blob is not None:
        return _stored_blob(item, label, lookups, created, now, grace)
    if item.from_seed is not None:
        return _seed_input(item.from_seed, label, lookups, created, now, grace)
    return Failed(p.REASON_INVALID, f"{label} has no source")


def _stored_blob(item: SpecInput, label: str, lookups: Lookups, created: datetime | None, now: datetime,
                 grace: float) -> Input | Waiting | Failed:
    assert item.from_blob is not None
    digest = item.from_blob.digest
    try:
        blob = lookups.stored_blob(digest)
    except LookupError_ as exc:
        return Waiting(exc.reason, f"{label}: blob {digest}: {exc.message}")
    if blob is None:
        return _missing(f"{label}: blob {digest} (upload it with `memoplane submit --input {item.name}=@FILE`)",
                        created, now, grace)
    return blob


def _foreign_upstream(item: SpecInput, lookups: Lookups, created: datetime | None, now: datetime, grace: float,
                      field: str) -> Input | Waiting | Failed:
    """An upstream in another namespace: used only while its ResultCache lets this namespace read."""
    assert item.from_job is not None and item.from_job.namespace is not None
    upstream = f"{item.from_job.namespace}/{item.from_job.name}"
    obj, denied = lookups.foreign_job(item.from_job.namespace, item.from_job.name)
    if obj is None:
        return _missing(f"{field}.fromJob: ComputeJob '{upstream}'", created, now, grace)
    if denied:
        return Waiting(p.REASON_SHARING_DENIED, f"{field}.fromJob.namespace: {denied}")
    return _upstream_result(f"input '{item.name}'", upstream, obj, lookups)


def _upstream_result(label: str, upstream: str, obj: Mapping[str, Any], lookups: Lookups) -> Input | Waiting | Failed:
    """The upstream's result once it succeeded for its current spec; why not otherwise."""
    phase, current = upstream_state(obj)
    status = job(obj).status
    if current and phase == p.FAILED:
        why, detail = status.failure_summary()
        return Failed(p.REASON_UPSTREAM_FAILED,
                      f"{label}: upstream ComputeJob '{upstream}' failed ({why})" + (f": {detail}" if detail else ""))
    digest = status.result_digest
    if current and phase == p.SUCCEEDED and digest:
        try:
            result = lookups.result_input(digest, job(obj).result_store_url)
        except LookupError_ as exc:
            return Failed(exc.reason, f"{label}: result of ComputeJob '{upstream}': {exc.message}")
        if isinstance(result, JsonInput) and json_depth_exceeds(result.value):
            error = too_deep(f"the result of ComputeJob '{upstream}'")
            return Failed(p.REASON_INVALID, f"{label}: {error.cause}: {error.fix}")
        return result
    return Waiting(p.REASON_UPSTREAM, f"{label}: waiting for ComputeJob '{upstream}' (phase {phase or 'new'})")


def _seed_input(ref: SeedRef, label: str, lookups: Lookups, created: datetime | None, now: datetime,
                grace: float) -> Input | Waiting | Failed:
    """A GMemSeed's range: its status digest (covering the overlay) goes into the key; the
    values are generated where the job runs (memoplane.jobs.SeedInput)."""
    problem = seeds.range_problem(ref.offset, ref.count)
    if problem:
        return Failed(p.REASON_INVALID, f"{label}: {problem}")
    obj = lookups.get_seed(ref.name)
    if obj is None:
        return _missing(f"{label}: GMemSeed '{ref.name}'", created, now, grace)
    view = seeds.seed_view(obj)
    if isinstance(view, str):
        return Waiting(seeds.REASON_SEED_NOT_READY, f"{label}: {view}")
    overlay = None
    if view.overlay_blob is not None:
        try:
            overlay = lookups.seed_overlay(view.overlay_blob[0], view.store_url)
        except LookupError_ as exc:
            return Waiting(exc.reason, f"{label}: overlay of GMemSeed '{ref.name}': {exc.message}")
    return SeedInput(view.params, view.digest, ref.offset, ref.count, overlay)


def _reads_data(item: SpecInput) -> bool:
    """An input whose resolution may read and store a whole file (an object, an uploaded blob
    in the namespace's home): resolved last, and not while the job waits for something else."""
    return item.from_object is not None or item.from_blob is not None


def resolve(obj: Mapping[str, Any], runtime: str | None, lookups: Lookups, now: datetime,
            grace: float = MISSING_GRACE_SECONDS) -> Resolution:
    """Resolve a ComputeJob object (as the API server returns it).

    `runtime`: the runtime identity digest the live agents advertise for the job's
    profile (None: no agent serves it, so no key can be derived yet)."""
    try:
        job = parse_computejob(obj)
    except SpecError as exc:
        return Failed(p.REASON_INVALID, str(exc))
    spec = job.spec
    if spec.map is not None:
        # A map job has no key of its own: its sub-tasks do (memoplane.cluster.mapping).
        return Failed(p.REASON_INVALID, "spec.map jobs are resolved per element, as sub-tasks")
    if runtime is None:
        return Waiting(p.REASON_NO_AGENT, f"no live agent serves runtime profile '{spec.runtime.profile}'")
    name = job.metadata.name
    created = parse_time(job.metadata.creation_timestamp)
    lookups = seen = SeenJobs(lookups, job.metadata.namespace or "")
    inputs: dict[str, Input] = {}
    # Objects and uploaded blobs are read last, and only when nothing else is awaited: a job
    # waiting for its upstream is revisited often and must not re-hash its objects each time.
    ordered = sorted(spec.inputs, key=_reads_data)
    fields = {item.name: f"spec.inputs[{index}]" for index, item in enumerate(spec.inputs)}
    for item in ordered:
        got = resolve_input(item, name, lookups, created, now, grace, fields[item.name])
        if isinstance(got, Failed):
            return got
        if isinstance(got, Waiting):
            if got.reason == p.REASON_UPSTREAM:
                cycle = find_cycle(obj, lookups)
                if cycle:
                    return Failed(p.REASON_INVALID, "fromJob inputs form a cycle: " + " -> ".join(cycle))
            # Keep checking the other inputs for a failure, but read no objects.
            for rest in ordered:
                if not _reads_data(rest) and rest.name not in inputs and rest is not item:
                    other = resolve_input(rest, name, lookups, created, now, grace, fields[rest.name])
                    if isinstance(other, Failed):
                        return other
            return got
        inputs[item.name] = got
    inputs = {item.name: inputs[item.name] for item in spec.inputs}  # the spec's order
    code: PythonCode | CommandCode
    if spec.python is not None:
        code = PythonCode(spec.python.source, spec.python.entrypoint, filename=f"<{name}>")
    else:
        assert spec.command is not None
        code = CommandCode(tuple(spec.command))
    resolved = Job(code=code, inputs=inputs, env=dict(spec.env), salt=spec.cache.version,
                   profile=spec.runtime.profile, limits=limits_of(job), runtime=runtime)
    digests = {n: v.digest for n, v in inputs.items()}
    return Resolved(resolved, digests, upstream_runs(obj, seen.seen))
