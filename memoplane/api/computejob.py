"""ComputeJob: code plus inputs whose result is computed once and remembered.

Field names are the contract in DESIGN §2. Every cross-field rule exists twice:
as a pydantic validator (CLI and operator reject early) and in the CRD schema (the
API server rejects `kubectl apply`): a CEL rule with the same message, or oneOf where
CEL cannot see the field. tests/unit/test_api_validation.py checks that they agree.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from ..canonical import json_depth_exceeds, too_deep
from ..keys import DIGEST_PATTERN
from ..sandbox.types import Delivery
from .common import (
    AGE_COLUMN,
    API_VERSION,
    CONFIGMAP_KEY_PATTERN,
    DNS_LABEL_PATTERN,
    BucketName,
    Conditions,
    Digest,
    EnvMap,
    Identifier,
    JsonValue,
    K8sModel,
    KindInfo,
    Name,
    NamespaceName,
    ObjectMetaLite,
    PrinterColumn,
    Quantity,
    StatusModel,
    Timestamp,
    cel,
    list_map,
    validations,
)

MAX_INPUTS = 128
SOURCES = ("value", "fromJob", "fromSeed", "fromObject", "fromConfigMap", "fromBlob")

BOTH_PROGRAMS = "spec.python and spec.command are both set: keep exactly one"
NO_PROGRAM = "spec.python or spec.command is required: set exactly one"


FILE_SOURCES = ("fromJob", "fromObject", "fromConfigMap", "fromBlob")
AS_WITH_COMMAND = ("as applies to Python jobs: a command reads every input as a file under $MEMOPLANE_IN; "
                   "remove as from spec.inputs")
AS_NEEDS_FILE = "as applies to file inputs (fromJob, fromObject, fromConfigMap, fromBlob): remove it from this input"


def sources_message(name: str, count: int) -> str:
    return f"input '{name}' has {count} sources: set exactly one of {', '.join(SOURCES)}"


def map_over_message(over: str) -> str:
    return f"'{over}' is not the name of an input: use one of the names in spec.inputs"


class PythonSpec(K8sModel):
    """A Python function run in a sandbox; it receives the inputs as keyword arguments."""

    source: str = Field(min_length=1, description="Python source defining the entrypoint.")
    entrypoint: Identifier = Field(default="main", description="Function to call (default: main).")
    combine: Identifier | None = Field(default=None, description=(
        "With spec.map.overChunks: an associative function of the source, combine(a, b), that merges two "
        "partial results."))


class JobRef(K8sModel):
    """The result of another ComputeJob (a DAG edge), in this namespace unless `namespace` names another."""

    name: Name
    namespace: NamespaceName | None = Field(
        default=None, description="Another namespace's ComputeJob: used only while the ResultCache of that job "
                                  "lists this namespace in spec.sharing.readers (the job waits otherwise).")


class SeedRef(K8sModel):
    """A range of a GMemSeed in the same namespace: `count` values from `offset`."""

    name: Name
    offset: int = Field(default=0, ge=0, description="First address (default: 0).")
    count: int = Field(ge=1, description="Number of values.")


class ObjectRef(K8sModel):
    """An object the cluster's objectInputs allowlist lets this namespace read, hashed once read."""

    bucket: BucketName
    key: str = Field(min_length=1, max_length=1024)


class BlobRef(K8sModel):
    """A blob uploaded to the namespace's store (`memoplane submit --input NAME=@FILE` over 900 KiB)."""

    digest: str = Field(pattern=DIGEST_PATTERN, description=(
        "The blob's digest (b3: and the blake3 of its bytes, 64 hex digits), in the job's ResultCache store or "
        "the namespace's home store; every chunk is verified when it is read."))


class ConfigMapKeyRef(K8sModel):
    """One key of a ConfigMap in the same namespace."""

    name: Name
    key: str = Field(pattern=CONFIGMAP_KEY_PATTERN, min_length=1, max_length=253)


class Input(K8sModel):
    """A named input: exactly one of value, fromJob, fromSeed, fromObject, fromConfigMap, fromBlob."""

    # Enforced with oneOf/required, not CEL: CEL cannot see `value` (a field with
    # preserve-unknown-fields and no type is invisible to CEL; kube-apiserver refuses
    # `has(self.value)` at CRD creation).
    # `as` is a CEL keyword: the API server names the field __as__ in rules.
    model_config = ConfigDict(json_schema_extra={
        "oneOf": [{"required": [s]} for s in SOURCES],
        **validations(cel("!has(self.__as__) || " + " || ".join(f"has(self.{s})" for s in FILE_SOURCES),
                          AS_NEEDS_FILE)),
    })
    _keep_null: ClassVar[tuple[str, ...]] = ("value",)

    name: Identifier = Field(description="Keyword argument / file name under $MEMOPLANE_IN.")
    value: JsonValue = Field(default=None, description="Any JSON value.")
    from_job: JobRef | None = None
    from_seed: SeedRef | None = None
    from_object: ObjectRef | None = None
    from_config_map: ConfigMapKeyRef | None = None
    from_blob: BlobRef | None = None
    as_: Delivery | None = Field(default=None, alias="as", description=(
        "How a Python entrypoint receives this file input: bytes (the default; a numpy array for a .npy "
        "input), path (the path of the read-only file under $MEMOPLANE_IN, a str), file (that file opened "
        "for binary reading) or mmap (the file mapped read-only: a numpy array for a .npy input, else an "
        "mmap.mmap; the mapping does not count against resources.memory). path, file and mmap never load "
        "the input into the job's memory. Part of the cache key. Commands always read the file under "
        "$MEMOPLANE_IN."))

    def sources(self) -> list[str]:
        """The wire names of the sources this input sets (an explicit `value: null` counts)."""
        found = ["value"] if "value" in self.model_fields_set else []
        refs = (self.from_job, self.from_seed, self.from_object, self.from_config_map, self.from_blob)
        return found + [s for s, ref in zip(SOURCES[1:], refs, strict=True) if ref is not None]

    @field_validator("value")
    @classmethod
    def _not_too_deep(cls, value: Any) -> Any:
        # Deeper values would crash recursive encoders later (the key, the agent's decode).
        if json_depth_exceeds(value):
            error = too_deep("the value")
            raise ValueError(f"{error.cause}: {error.fix}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> Input:
        count = len(self.sources())
        if count != 1:
            raise ValueError(sources_message(self.name, count))
        if self.as_ is not None and not any(s in FILE_SOURCES for s in self.sources()):
            raise ValueError(AS_NEEDS_FILE)
        return self


MAP_ONE_OF_MESSAGE = "set exactly one of over or overChunks"
COMBINE_NEEDED_MESSAGE = "spec.map.overChunks needs a combine function: set spec.python.combine to its name"
COMBINE_UNUSED_MESSAGE = "combine is used only with spec.map.overChunks: remove it, or map with overChunks"


class MapSpec(K8sModel):
    """Run one cached sub-task per element of a list input (over), or per content-defined chunk of one large
    input combined by a memoized tree of spec.python.combine (overChunks)."""

    model_config = ConfigDict(json_schema_extra=validations(
        cel("has(self.over) != has(self.overChunks)", MAP_ONE_OF_MESSAGE),
    ))

    over: Identifier | None = Field(default=None, description="Name of a list input.")
    over_chunks: Identifier | None = Field(default=None, description=(
        "Name of a large file input (fromObject, fromConfigMap, fromBlob or fromJob): one sub-task per record-aligned "
        "content-defined "
        "chunk, combined by a memoized tree of spec.python.combine."))

    @model_validator(mode="after")
    def _one_of(self) -> MapSpec:
        if (self.over is None) == (self.over_chunks is None):
            raise ValueError(MAP_ONE_OF_MESSAGE)
        return self


MAX_REPLICAS = 5
MAX_MAP_BATCH = 1024   # elements a spec.map batch (one child ComputeJob) runs at most
VERIFY_WITH_MAP = "replicas > 1 with spec.map is not supported yet: verify a job without map"


class VerifySpec(K8sModel):
    """Verification by re-execution: run on `replicas` distinct nodes; the result counts only if all agree."""

    replicas: int = Field(default=1, ge=1, le=MAX_REPLICAS, description=(
        f"Distinct nodes that compute the job (1-{MAX_REPLICAS}, default 1: no re-execution). The result is cached"
        " and Ready only if every replica returns the same result; otherwise the job is Disputed. A cache hit"
        " needs that many distinct nodes attesting the stored result."))


class RuntimeSpec(K8sModel):
    """Interpreter and installed distributions; their identity is part of the key."""

    profile: str = Field(
        default="python", pattern=DNS_LABEL_PATTERN, max_length=63,
        description="A runtime profile advertised by the agents (default: python).",
    )


Policy = Literal["Use", "Refresh", "Bypass"]


class CacheSpec(K8sModel):
    """Which ResultCache to use and how."""

    result_cache: Name = Field(default="default", description="ResultCache in this namespace.")
    policy: Policy = Field(
        default="Use",
        description="Use: reuse a stored result; Refresh: recompute and overwrite; Bypass: neither read nor write.",
    )
    version: str = Field(default="", max_length=63, description="Salt: change it to force new keys.")


class Resources(K8sModel):
    """Limits of one attempt; not part of the key."""

    cpu: Quantity | None = None
    memory: Quantity | None = None
    timeout_seconds: int | None = Field(default=None, ge=1, description="Wall-clock limit per attempt.")
    max_output_bytes: Quantity | None = None


InputList = Annotated[
    list[Input],
    Field(max_length=MAX_INPUTS, json_schema_extra=list_map("name")),
]


class ComputeJobSpec(K8sModel):
    """What to compute. Exactly one of python | command."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "has(self.python) != has(self.command)",
                "set exactly one of spec.python or spec.command",
                message_expression=f"has(self.python) ? '{BOTH_PROGRAMS}' : '{NO_PROGRAM}'",
            ),
            cel(
                "!has(self.map) || !has(self.verify) || !has(self.verify.replicas) || self.verify.replicas == 1",
                VERIFY_WITH_MAP,
                field_path=".verify",
            ),
            cel(
                "!has(self.map) || !has(self.map.overChunks) || (has(self.python) && has(self.python.combine))",
                COMBINE_NEEDED_MESSAGE,
                field_path=".python.combine",
            ),
            cel(
                "!has(self.python) || !has(self.python.combine) || (has(self.map) && has(self.map.overChunks))",
                COMBINE_UNUSED_MESSAGE,
                field_path=".python.combine",
            ),
            cel(
                "!has(self.map) || !has(self.map.over) || "
                "(has(self.inputs) && self.inputs.exists(i, i.name == self.map.over))",
                "must be the name of an input in spec.inputs",
                message_expression=(
                    "\"'\" + self.map.over + \"' is not the name of an input: use one of the names in spec.inputs\""
                ),
                field_path=".map.over",
            ),
            cel(
                "!has(self.map) || !has(self.map.overChunks) || "
                "(has(self.inputs) && self.inputs.exists(i, i.name == self.map.overChunks))",
                "must be the name of an input in spec.inputs",
                message_expression=(
                    "\"'\" + self.map.overChunks + \"' is not the name of an input: use one of the names in "
                    "spec.inputs\""
                ),
                field_path=".map.overChunks",
            ),
            cel(
                "!has(self.command) || !has(self.inputs) || self.inputs.all(i, !has(i.__as__))",
                AS_WITH_COMMAND,
                field_path=".inputs",
            ),
        )
    )

    python: PythonSpec | None = None
    command: list[str] | None = Field(default=None, min_length=1, description="argv, run with fork+exec.")
    inputs: InputList = Field(default_factory=list)
    map: MapSpec | None = None
    env: EnvMap = Field(default_factory=dict, description=(
        "Environment variables; part of the key. Names match [-._a-zA-Z][-._a-zA-Z0-9]* and do not start"
        " with MEMOPLANE_; values hold no NUL."))
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    cache: CacheSpec = Field(default_factory=CacheSpec)
    resources: Resources = Field(default_factory=Resources)
    backoff_limit: int = Field(default=2, ge=0, le=100, description="Retries after a failed attempt.")
    verify: VerifySpec | None = None

    @field_validator("inputs")
    @classmethod
    def _unique_names(cls, inputs: list[Input]) -> list[Input]:
        first: dict[str, int] = {}
        for index, item in enumerate(inputs):
            if item.name in first:
                raise ValueError(
                    f"duplicate input name '{item.name}' at spec.inputs[{first[item.name]}]"
                    f" and spec.inputs[{index}]: names must be unique"
                )
            first[item.name] = index
        return inputs

    @model_validator(mode="after")
    def _cross_field(self) -> ComputeJobSpec:
        if self.python is not None and self.command is not None:
            raise ValueError(BOTH_PROGRAMS)
        if self.python is None and self.command is None:
            raise ValueError(NO_PROGRAM)
        if self.map is not None and self.map.over is not None and self.map.over not in {i.name for i in self.inputs}:
            raise ValueError("spec.map.over: " + map_over_message(self.map.over))
        chunks_over = self.map.over_chunks if self.map is not None else None
        if chunks_over is not None and chunks_over not in {i.name for i in self.inputs}:
            raise ValueError("spec.map.overChunks: " + map_over_message(chunks_over))
        self._combine_fits()
        if self.command is not None and any(i.as_ is not None for i in self.inputs):
            raise ValueError("spec.inputs: " + AS_WITH_COMMAND)
        if self.map is not None and self.verify is not None and self.verify.replicas > 1:
            raise ValueError("spec.verify: " + VERIFY_WITH_MAP)
        return self

    def _combine_fits(self) -> None:
        chunked = self.map is not None and self.map.over_chunks is not None
        combine = self.python is not None and self.python.combine is not None
        if chunked and not combine:
            raise ValueError("spec.python.combine: " + COMBINE_NEEDED_MESSAGE)
        if combine and not chunked:
            raise ValueError("spec.python.combine: " + COMBINE_UNUSED_MESSAGE)


Phase = Literal["Pending", "Waiting", "Scheduled", "Running", "Succeeded", "Failed"]


class ResultRef(StatusModel):
    """The stored result: its manifest digest and, when small, its JSON value."""

    _keep_null: ClassVar[tuple[str, ...]] = ("value",)

    digest: Digest | None = None
    size: int | None = Field(default=None, ge=0)
    value: JsonValue = Field(default=None, description="Small JSON results, inline.")
    store: str | None = Field(default=None, max_length=2048,
                              description="The store that holds it: s3://<bucket>/<prefix> of the ResultCache.")


class Failure(StatusModel):
    """Why the last attempt failed."""

    reason: str = Field(max_length=128)
    message: str = Field(default="", max_length=32768)
    stderr_tail: str | None = Field(default=None, max_length=16384)


class ChunkNodeCounts(StatusModel):
    """spec.map.overChunks: the distinct leaves (or combine nodes) of the tree walked so far."""

    total: int = Field(default=0, ge=0)
    cached: int = Field(default=0, ge=0, description="Served from the cache.")
    computed: int = Field(default=0, ge=0, description="Run by this map's batches.")


class MapStatus(StatusModel):
    """Progress of a spec.map job (counts per element; equal elements count once each), and
    of a map's batch (a child ComputeJob running several elements): their results."""

    total: int = Field(default=0, ge=0, description="Elements in the list.")
    distinct: int | None = Field(default=None, ge=0, description="Distinct elements (one sub-task each).")
    succeeded: int = Field(default=0, ge=0, description="Elements whose sub-task succeeded.")
    cached: int = Field(default=0, ge=0, description="Of those, served from the cache.")
    computed: int | None = Field(default=None, ge=0, description="Of those, computed by this map's batches.")
    running: int | None = Field(default=None, ge=0, description="Elements not finished yet.")
    failed: int = Field(default=0, ge=0, description="Elements whose sub-task failed.")
    batches: int | None = Field(default=None, ge=0, description="Child ComputeJobs (batches of missed elements).")
    results: list[Digest] | None = Field(default=None, max_length=MAX_MAP_BATCH,
                                         description="A batch: its elements' result digests, in order.")
    failed_element: int | None = Field(default=None, ge=0, description="A batch: the index of the element that "
                                                                        "failed.")
    sizes: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None, max_length=MAX_MAP_BATCH,
        description="A batch: its elements' result sizes (logical bytes), in order, for the usage index.")
    chunks: int | None = Field(default=None, ge=0, description="spec.map.overChunks: chunks of the input.")
    leaves: ChunkNodeCounts | None = Field(default=None, description="spec.map.overChunks: leaf tasks (one per "
                                                                     "distinct chunk).")
    combines: ChunkNodeCounts | None = Field(default=None, description="spec.map.overChunks: combine nodes.")


class ReplicaOutcome(StatusModel):
    """What one replica of a spec.verify job returned."""

    job: str = Field(max_length=253, description="The replica's ComputeJob.")
    node: str | None = Field(default=None, max_length=253)
    digest: Digest | None = Field(default=None, description="Its result manifest's digest.")


class VerifyStatus(StatusModel):
    """spec.verify jobs: the replicas' results, whether they agree and, if not, what differs."""

    replicas: list[ReplicaOutcome] = Field(default_factory=list, max_length=MAX_REPLICAS)
    agreed: bool | None = None
    difference: str | None = Field(default=None, max_length=4096,
                                   description="The first difference between the replicas' results.")


class UpstreamRun(StatusModel):
    """A fromJob input as its key was resolved: the upstream job, the result used and the run that produced it."""

    input: Identifier
    job: str = Field(max_length=317, description="The upstream ComputeJob, namespace/name.")
    result: Digest | None = Field(default=None, description="The upstream's result digest that went into the key.")
    run_id: str | None = Field(default=None, max_length=64, description="The upstream run that produced it.")


class ComputeJobStatus(StatusModel):
    """Written by the operator and the node agents."""

    phase: Phase | None = Field(default=None, description="A summary for humans; conditions are the API.")
    reason: str | None = None
    message: str | None = None
    cache_key: Digest | None = None
    short_key: str | None = Field(default=None, max_length=16, description="First 12 hex digits of cacheKey.")
    cached: bool | None = None
    node: str | None = None
    result: ResultRef | None = None
    input_digests: dict[str, Digest] | None = Field(default=None, description="Input name -> content digest.")
    cold_tier: str | None = Field(default=None, max_length=1024, description=(
        "Where content moved out of the job's store is read back from, '<seconds> s3://bucket/prefix' (its "
        "ResultCache's spec.tiers[0]); set when the job is resolved, for the node agent."))
    duration_ms: int | None = Field(default=None, ge=0)
    duration: str | None = Field(default=None, description="durationMs for humans, e.g. 1.2s.")
    compute_seconds_saved: float | None = Field(default=None, ge=0)
    attempts: int | None = Field(default=None, ge=0)
    start_time: Timestamp | None = None
    completion_time: Timestamp | None = None
    failure: Failure | None = None
    map: MapStatus | None = Field(default=None, description="spec.map jobs: progress of the sub-tasks.")
    verify: VerifyStatus | None = Field(default=None, description="spec.verify jobs: the replicas' results.")
    run_id: str | None = Field(default=None, max_length=64, description=(
        "The run that produced what this status shows (its record is in the ResultCache's store history)."))
    upstreams: list[UpstreamRun] | None = Field(default=None, max_length=MAX_INPUTS, description=(
        "fromJob inputs as resolved: the exact upstream result and run this job's key used."))
    conditions: Conditions = Field(default_factory=list)
    observed_generation: int | None = Field(default=None, ge=0)


class ComputeJob(K8sModel):
    """A whole ComputeJob object as the API server returns it."""

    model_config = ConfigDict(extra="ignore")

    api_version: Literal["memoplane.io/v1alpha1"] = API_VERSION
    kind: Literal["ComputeJob"] = "ComputeJob"
    metadata: ObjectMetaLite
    spec: ComputeJobSpec
    status: ComputeJobStatus = Field(default_factory=ComputeJobStatus)


def short_key(cache_key: str, digits: int = 12) -> str:
    """`b3:9f2c...` -> `9f2c...` (12 hex digits) for the Key printer column."""
    return cache_key.partition(":")[2][:digits] if ":" in cache_key else cache_key[:digits]


def format_duration(ms: int) -> str:
    """Milliseconds for the Duration column: 12ms, 3.4s, 2m5s, 1h2m."""
    if ms < 1000:
        return f"{ms}ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f}s"
    minutes, seconds = divmod(ms // 1000, 60)
    if minutes < 60:
        return f"{minutes}m{seconds}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes}m"


COMPUTEJOB = KindInfo(
    kind="ComputeJob",
    plural="computejobs",
    short_names=("cjob",),
    spec_model=ComputeJobSpec,
    status_model=ComputeJobStatus,
    description="A computation (code + inputs) done once; its result is remembered and shared.",
    columns=(
        PrinterColumn("Phase", ".status.phase", "string"),
        PrinterColumn("Cached", ".status.cached", "boolean", "Served from the result cache."),
        PrinterColumn("Key", ".status.shortKey", "string", "Start of the cache key."),
        PrinterColumn("Node", ".status.node", "string"),
        PrinterColumn("Duration", ".status.duration", "string"),
        AGE_COLUMN,
        PrinterColumn("Reason", ".status.reason", "string", priority=1),
    ),
)
