"""A job once its inputs are resolved to content: the pure description that
the key is derived from and that a sandbox runs.

Both the embedded runner and the cluster (operator resolves, agent runs) build
a `Job`; resolution of the user's spec into it is the only place where mutable
names (a file path, an upstream job, an object key) become content digests.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .canonical import canonical_json, json_depth_exceeds, too_deep
from .inputs import env_problem
from .keys import KeyParts, code_digest, command_digest, digest_value, runtime_identity
from .sandbox.types import DELIVERIES, CommandTask, Delivery, Limits, PythonTask

Policy = Literal["Use", "Refresh", "Bypass"]
POLICIES: tuple[Policy, ...] = ("Use", "Refresh", "Bypass")


@dataclass(frozen=True)
class JsonInput:
    """A JSON value; the entrypoint receives it as a keyword argument."""

    value: Any

    @property
    def digest(self) -> str:
        return digest_value(self.value)

    @property
    def key_entry(self) -> str:
        return "json:" + self.digest


@dataclass(frozen=True)
class BlobInput:
    """Bytes held in the store under `digest`; a Python entrypoint receives them as
    `delivery` says and commands a file."""

    digest: str
    size: int
    delivery: Delivery = "bytes"

    @property
    def key_entry(self) -> str:
        # The kind is part of the entry: a file holding the text "[1,2]" and the
        # JSON value [1,2] have one digest but reach the code as different types.
        # So is the delivery (bytes, a path or an open file are different values);
        # "bytes" keeps the entry it always had, so existing keys stay valid.
        if self.delivery == "bytes":
            return "blob:" + self.digest
        return f"blob-{self.delivery}:{self.digest}"


@dataclass(frozen=True)
class SeedInput:
    """`count` values of a GMemSeed from `offset`, generated where the job runs: only the
    parameters and the overlay (a small blob of written overrides, None when empty) travel.

    `seed_digest` covers parameters and overlay (memoplane.gmem.seed_digest), so a write
    to the seed changes the key; the agent checks the overlay against it before running."""

    params: Mapping[str, Any]          # memoplane.gmem.GMemParams.to_json()
    seed_digest: str
    offset: int
    count: int
    overlay: BlobInput | None = None   # memoplane.gmem.transfer.overlay_npy bytes in the job's store

    @property
    def digest(self) -> str:
        return self.seed_digest

    @property
    def key_entry(self) -> str:
        return f"seed:{self.seed_digest}:{self.offset}:{self.count}"


Input = JsonInput | BlobInput | SeedInput


@dataclass(frozen=True)
class PythonCode:
    source: str
    entrypoint: str = "main"
    filename: str = "<job>"


@dataclass(frozen=True)
class CommandCode:
    argv: tuple[str, ...]


@dataclass(frozen=True)
class Job:
    code: PythonCode | CommandCode
    inputs: Mapping[str, Input] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    salt: str = ""
    profile: str = "python"
    limits: Limits = field(default_factory=Limits)
    # The identity digest of the runtime the job runs on. None: this process's
    # runtime for `profile` (embedded mode). The operator sets the digest the
    # agents advertise, since it does not run jobs itself.
    runtime: str | None = None

    @property
    def runtime_digest(self) -> str:
        return self.runtime or runtime_identity(self.profile).digest

    def key_parts(self) -> KeyParts:
        if isinstance(self.code, PythonCode):
            code, entrypoint = code_digest(self.code.source), self.code.entrypoint
        else:
            code, entrypoint = command_digest(self.code.argv), None
        return KeyParts(
            code=code,
            entrypoint=entrypoint,
            runtime=self.runtime_digest,
            inputs={name: value.key_entry for name, value in self.inputs.items()},
            env=dict(self.env),
            salt=self.salt,
        )

    @property
    def key(self) -> str:
        return self.key_parts().key


def input_file_name(name: str) -> str:
    """Where an input appears under $MEMOPLANE_IN (a flat directory of names)."""
    return name


def seed_overlay_file_name(name: str) -> str:
    """Where a seed input's overlay appears for a Python job (input names have no dots)."""
    return f"{name}.overlay.npy"


def sandbox_task(job: Job) -> PythonTask | CommandTask:
    """The sandbox's view of a job: JSON inputs as keyword arguments, blobs as files,
    seeds as what to generate (commands find seeds generated into files by the agent)."""
    if isinstance(job.code, CommandCode):
        return CommandTask(argv=job.code.argv)
    return PythonTask(
        source=job.code.source,
        entrypoint=job.code.entrypoint,
        filename=job.code.filename,
        inputs={n: v.value for n, v in job.inputs.items() if isinstance(v, JsonInput)},
        file_inputs={n: input_file_name(n) for n, v in job.inputs.items() if isinstance(v, BlobInput)},
        file_deliveries={n: v.delivery for n, v in job.inputs.items()
                         if isinstance(v, BlobInput) and v.delivery != "bytes"},
        seed_inputs={n: {"params": dict(v.params), "offset": v.offset, "count": v.count,
                         "overlay": seed_overlay_file_name(n) if v.overlay is not None else None}
                     for n, v in job.inputs.items() if isinstance(v, SeedInput)},
    )


def json_input_file(value: Any) -> bytes:
    """A JSON input as a command sees it in $MEMOPLANE_IN: its canonical text."""
    return canonical_json(value)


# -- the job manifest: a resolved job as the operator hands it to an agent -------------

JOB_MANIFEST_VERSION = 1


def job_to_dict(job: Job) -> dict[str, Any]:
    """A resolved job as plain JSON (stored in the CAS; its digest travels in status)."""
    if isinstance(job.code, PythonCode):
        code: dict[str, Any] = {"python": {"source": job.code.source, "entrypoint": job.code.entrypoint,
                                           "filename": job.code.filename}}
    else:
        code = {"command": list(job.code.argv)}
    inputs = {name: _input_to_dict(value) for name, value in job.inputs.items()}
    limits = job.limits
    return {
        "v": JOB_MANIFEST_VERSION, **code, "inputs": inputs, "env": dict(job.env), "salt": job.salt,
        "profile": job.profile, "runtime": job.runtime_digest,
        "limits": {"timeout_s": limits.timeout_s, "memory_bytes": limits.memory_bytes,
                   "max_output_bytes": limits.max_output_bytes},
    }


def _input_to_dict(value: Input) -> dict[str, Any]:
    if isinstance(value, JsonInput):
        return {"json": value.value}
    if isinstance(value, BlobInput):
        delivery = {} if value.delivery == "bytes" else {"as": value.delivery}  # added within v1
        return {"blob": {"digest": value.digest, "size": value.size, **delivery}}
    overlay = None if value.overlay is None else {"digest": value.overlay.digest, "size": value.overlay.size}
    return {"seed": {"params": dict(value.params), "digest": value.seed_digest, "offset": value.offset,
                     "count": value.count, "overlay": overlay}}


def _input_from_dict(name: str, value: dict[str, Any]) -> Input:
    if "json" in value:
        _check_depth(value["json"], f"input {name!r}")
        return JsonInput(value["json"])
    if "seed" in value:  # added within v1: manifests without seeds read as before
        seed = value["seed"]
        _check_depth(seed["params"], f"input {name!r} (seed parameters)")
        overlay = seed.get("overlay")
        return SeedInput(dict(seed["params"]), str(seed["digest"]), int(seed["offset"]), int(seed["count"]),
                         BlobInput(overlay["digest"], int(overlay["size"])) if overlay else None)
    blob = value["blob"]
    delivery = blob.get("as", "bytes")
    if delivery not in DELIVERIES:
        raise ValueError(f"job manifest: input {name!r} has delivery {delivery!r}, not one of {', '.join(DELIVERIES)}")
    return BlobInput(blob["digest"], int(blob["size"]), delivery)


def job_from_dict(data: dict[str, Any]) -> Job:
    if data.get("v") != JOB_MANIFEST_VERSION:
        raise ValueError(f"job manifest v{data.get('v')!r} is not supported (this memoplane reads v1)")
    code: PythonCode | CommandCode
    if "python" in data:
        python = data["python"]
        code = PythonCode(python["source"], python["entrypoint"], python.get("filename", "<job>"))
    else:
        code = CommandCode(tuple(data["command"]))
    inputs: dict[str, Input] = {name: _input_from_dict(name, value) for name, value in data["inputs"].items()}
    limits = data.get("limits", {})
    return Job(code=code, inputs=inputs, env=_env_from_dict(data.get("env", {})), salt=str(data.get("salt", "")),
               profile=str(data.get("profile", "python")), runtime=data.get("runtime"),
               limits=Limits(timeout_s=float(limits.get("timeout_s", Limits.timeout_s)),
                             memory_bytes=int(limits.get("memory_bytes", Limits.memory_bytes)),
                             max_output_bytes=int(limits.get("max_output_bytes", Limits.max_output_bytes))))


def _check_depth(value: Any, what: str) -> None:
    if json_depth_exceeds(value):
        error = too_deep(what)
        raise ValueError(f"job manifest: {error.cause}; it was not made by memoplane's resolver")


def _env_from_dict(env: Any) -> dict[str, str]:
    """The manifest's env, by the rules the CLI and the CRD apply (memoplane.inputs): a
    tampered or stale manifest is refused here, not at execve as a killed job."""
    if not isinstance(env, dict):
        raise ValueError(f"job manifest: env is not an object of strings ({type(env).__name__})")
    for name, value in env.items():
        if not isinstance(value, str):
            raise ValueError(f"job manifest: env {name!r} is not a string ({type(value).__name__})")
        problem = env_problem(name, value)
        if problem:
            raise ValueError(f"job manifest: env {problem[0]} — {problem[1]}")
    return dict(env)
