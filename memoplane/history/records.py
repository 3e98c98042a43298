"""Run records: what one run of a job was (computed or served from the cache).

A record is immutable once written and names everything by content digest, so lineage is
exact by construction: a `fromJob` input names the upstream's result digest and the run id
that produced it, never "latest". Records are canonical JSON; `from_dict` refuses anything
malformed with ValueError (whoever can write the store can write records: a record only
ever informs a query, never what is served).

Run ids sort by time: `r<ns since the epoch, 20 digits>-<8 hex>`.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..canonical import canonical_json

VERSION = 1
RUN_ID = re.compile(r"^r[0-9]{20}-[0-9a-f]{8}$")


def new_run_id(at_ns: int | None = None) -> str:
    return f"r{(time.time_ns() if at_ns is None else at_ns):020d}-{secrets.token_hex(4)}"


def valid_run_id(text: str) -> bool:
    return bool(RUN_ID.match(text))


@dataclass(frozen=True)
class JobIdentity:
    """Which job ran. On a cluster: the ComputeJob's namespace, name, uid and generation.
    Embedded: namespace "" and the job's identity (a script and entrypoint, or a command,
    or a manifest's name under `memoplane apply`), uid "" and generation 0."""

    namespace: str
    name: str
    uid: str = ""
    generation: int = 0

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    def to_dict(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "name": self.name, "uid": self.uid, "generation": self.generation}

    @staticmethod
    def from_dict(raw: Mapping[str, Any]) -> JobIdentity:
        return JobIdentity(_str(raw, "namespace"), _str(raw, "name"), _str(raw, "uid"), _int(raw, "generation"))


@dataclass(frozen=True)
class InputRecord:
    """One input as the run saw it. `digest` is the digest that went into the key;
    `source` is value | fromJob | fromConfigMap | fromObject | fromBlob | fromSeed | file | arg | mapElement.
    For fromJob: the upstream job ("ns/name"), its result digest and the run that produced it;
    for mapElement (a spec.map parent's list): the sub-task's job, result and run, its key as digest."""

    name: str
    digest: str
    size: int | None = None
    source: str = "value"
    upstream_job: str | None = None
    upstream_result: str | None = None
    upstream_run: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "digest": self.digest, "size": self.size, "source": self.source,
                "upstreamJob": self.upstream_job, "upstreamResult": self.upstream_result,
                "upstreamRun": self.upstream_run}

    @staticmethod
    def from_dict(raw: Mapping[str, Any]) -> InputRecord:
        size = raw.get("size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
            raise ValueError("input size is not an integer")
        return InputRecord(_str(raw, "name"), _str(raw, "digest"), size, _str(raw, "source"),
                           _opt(raw, "upstreamJob"), _opt(raw, "upstreamResult"), _opt(raw, "upstreamRun"))


@dataclass(frozen=True)
class RunRecord:
    """One run. `result` is None for a failed run (then `failure` says why).
    `code` and `runtime` are the key's component digests; `code_blob` and `runtime_blob`
    (optional) are store blobs holding the source text and the runtime's components
    (interpreter, distributions), so `diff` can show lines and distributions.
    `components` are the key's components as `memoplane.keys.KeyParts.components()` gives them
    (what `explain` compares)."""

    run_id: str
    job: JobIdentity
    key: str
    result: str | None
    inputs: tuple[InputRecord, ...]
    code: str
    runtime: str
    env: dict[str, str]
    node: str
    signer: str | None
    started: float            # seconds since the epoch
    ended: float
    cached: bool
    compute_seconds: float    # computed: the run's compute time; cached: the time the hit saved
    cache: str = ""           # the ResultCache ("ns/name"), or "" embedded
    policy: str = "Use"
    failure: str | None = None
    code_blob: str | None = None
    runtime_blob: str | None = None
    result_size: int | None = None
    components: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"v": VERSION, "runId": self.run_id, "job": self.job.to_dict(), "key": self.key,
                "result": self.result, "resultSize": self.result_size,
                "inputs": [i.to_dict() for i in self.inputs], "code": self.code, "runtime": self.runtime,
                "codeBlob": self.code_blob, "runtimeBlob": self.runtime_blob, "env": dict(self.env),
                "node": self.node, "signer": self.signer, "started": self.started, "ended": self.ended,
                "cached": self.cached, "computeSeconds": self.compute_seconds, "cache": self.cache,
                "policy": self.policy, "failure": self.failure, "components": self.components}

    def to_json(self) -> bytes:
        return canonical_json(self.to_dict())

    @staticmethod
    def from_dict(raw: Mapping[str, Any]) -> RunRecord:
        if not isinstance(raw, Mapping) or raw.get("v") != VERSION:
            raise ValueError("not a run record of this version")
        run_id = _str(raw, "runId")
        if not valid_run_id(run_id):
            raise ValueError(f"bad run id {run_id!r}")
        inputs = raw.get("inputs")
        env = raw.get("env")
        components = raw.get("components") or {}
        job = raw.get("job")
        if not isinstance(inputs, list) or not isinstance(env, Mapping) or not isinstance(components, Mapping) \
                or not isinstance(job, Mapping):
            raise ValueError("malformed run record")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ValueError("env is not a map of strings")
        return RunRecord(
            run_id=run_id, job=JobIdentity.from_dict(job), key=_str(raw, "key"), result=_opt(raw, "result"),
            inputs=tuple(InputRecord.from_dict(i) for i in inputs), code=_str(raw, "code"),
            runtime=_str(raw, "runtime"), env=dict(env), node=_str(raw, "node"), signer=_opt(raw, "signer"),
            started=_float(raw, "started"), ended=_float(raw, "ended"), cached=_bool(raw, "cached"),
            compute_seconds=_float(raw, "computeSeconds"), cache=_str(raw, "cache"), policy=_str(raw, "policy"),
            failure=_opt(raw, "failure"), code_blob=_opt(raw, "codeBlob"), runtime_blob=_opt(raw, "runtimeBlob"),
            result_size=_opt_int(raw, "resultSize"), components=dict(components))

    @staticmethod
    def from_json(data: bytes) -> RunRecord:
        import json
        try:
            raw = json.loads(data)
        except ValueError as exc:
            raise ValueError(f"run record is not JSON: {exc}") from None
        return RunRecord.from_dict(raw)


def _str(raw: Mapping[str, Any], name: str) -> str:
    value = raw.get(name, "")
    if not isinstance(value, str):
        raise ValueError(f"run record field {name!r} is not a string")
    return value


def _opt(raw: Mapping[str, Any], name: str) -> str | None:
    value = raw.get(name)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"run record field {name!r} is not a string")
    return value


def _int(raw: Mapping[str, Any], name: str) -> int:
    value = raw.get(name, 0)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"run record field {name!r} is not an integer")
    return value


def _opt_int(raw: Mapping[str, Any], name: str) -> int | None:
    return None if raw.get(name) is None else _int(raw, name)


def _float(raw: Mapping[str, Any], name: str) -> float:
    value = raw.get(name, 0.0)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"run record field {name!r} is not a number")
    return float(value)


def _bool(raw: Mapping[str, Any], name: str) -> bool:
    value = raw.get(name, False)
    if not isinstance(value, bool):
        raise ValueError(f"run record field {name!r} is not a boolean")
    return value
