"""Run a resolved job in a sandbox and store what it produced.

Shared by the embedded runner and the node agent. Storing follows DESIGN §4's
order — chunks, manifests, result — and setting the ref is left to the caller,
whose cache policy decides (Bypass stores the result but no ref).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from .cas import Provenance, ResultManifest, Store, StoredValue
from .jobs import (
    BlobInput,
    CommandCode,
    Job,
    JsonInput,
    SeedInput,
    input_file_name,
    json_input_file,
    sandbox_task,
    seed_overlay_file_name,
)
from .leftovers import temp_prefix
from .sandbox.types import VALUE_FILE_NAMES, Failure, SandboxOutcome, SandboxRequest


class SandboxRunner(Protocol):
    def run(self, request: SandboxRequest) -> SandboxOutcome: ...


@dataclass(frozen=True)
class Execution:
    key: str
    outcome: SandboxOutcome
    result: ResultManifest | None = None   # None when the job failed: nothing is stored
    digest: str | None = None

    @property
    def failure(self) -> Failure | None:
        return self.outcome.failure


def materialize_inputs(job: Job, store: Store, in_dir: Path) -> None:
    """Every input as a file under $MEMOPLANE_IN (JSON as canonical text, blobs as bytes)."""
    in_dir.mkdir(parents=True, exist_ok=True)
    for name, value in job.inputs.items():
        target = in_dir / input_file_name(name)
        if isinstance(value, JsonInput):
            target.write_bytes(json_input_file(value.value))
        elif isinstance(value, BlobInput):
            store.write_blob(value.digest, target)
            if value.delivery != "bytes":
                target.chmod(0o444)  # handed to the code by name: read-only even without the sandbox's view
        elif isinstance(value, SeedInput):
            _materialize_seed(job, name, value, store, in_dir)


def _materialize_seed(job: Job, name: str, seed: SeedInput, store: Store, in_dir: Path) -> None:
    """The overlay for a Python job to generate from (checked against the key's seed digest),
    or, for a command, the values themselves generated here as NAME (.npy): never fetched."""
    import numpy as np

    from .gmem import transfer

    data = store.get_bytes(seed.overlay.digest) if seed.overlay is not None else None
    overlay = transfer.verified_overlay(seed.params, data, seed.seed_digest)
    if not isinstance(job.code, CommandCode):
        if data is not None:
            (in_dir / seed_overlay_file_name(name)).write_bytes(data)
        return
    values = transfer.generate(seed.params, seed.offset, seed.count, overlay)
    with open(in_dir / input_file_name(name), "wb") as f:
        np.save(f, values, allow_pickle=False)


def execute(job: Job, store: Store, sandbox: SandboxRunner, *, node: str = "local") -> Execution:
    key = job.key
    with tempfile.TemporaryDirectory(prefix=temp_prefix("job")) as tmp:
        in_dir, out_dir = Path(tmp) / "in", Path(tmp) / "out"
        materialize_inputs(job, store, in_dir)
        out_dir.mkdir()
        started = time.time()
        outcome = sandbox.run(SandboxRequest(
            task=sandbox_task(job), in_dir=in_dir, out_dir=out_dir, env=dict(job.env), limits=job.limits,
        ))
        ended = time.time()
        if not outcome.ok:
            return Execution(key, _name_loaded_input(job, outcome))
        result = ResultManifest(
            value=_stored_value(outcome, out_dir, store),
            stdout=store.put_bytes(outcome.stdout),
            stderr=store.put_bytes(outcome.stderr),
            provenance=Provenance(
                cache_key=key,
                inputs={name: value.digest for name, value in job.inputs.items()},
                runtime=job.runtime_digest,
                node=node,
                started_at=started,
                ended_at=ended,
                duration_s=outcome.duration_s,
            ),
            output_tree=store.put_tree(out_dir) if any(out_dir.iterdir()) else None,
            meta=_meta(job, outcome),
        )
        return Execution(key, outcome, result, store.put_result(result))


def _name_loaded_input(job: Job, outcome: SandboxOutcome) -> SandboxOutcome:
    """A Python job out of memory with a file input loaded as bytes that takes half its limit or
    more: say which input, and that declaring it as a path or a file streams it."""
    failure = outcome.failure
    if failure is None or failure.reason != "memory" or isinstance(job.code, CommandCode):
        return outcome
    loaded = [(v.size, n) for n, v in job.inputs.items() if isinstance(v, BlobInput) and v.delivery == "bytes"]
    if not loaded or max(loaded)[0] * 2 < job.limits.memory_bytes:
        return outcome
    size, name = max(loaded)
    hint = (f"; file input {name!r} ({size} bytes) is loaded whole as bytes: declare it as: path, file or mmap "
            f"(--as {name}=path; --as {name}=mmap maps it read-only, a .npy as an array) to stream it")
    return replace(outcome, failure=replace(failure, message=failure.message + hint))


def _stored_value(outcome: SandboxOutcome, out_dir: Path, store: Store) -> StoredValue:
    if outcome.value_kind != "file":
        return store.put_value(outcome.value, outcome.value_kind)
    array_file = out_dir / VALUE_FILE_NAMES["file"]
    value = store.put_value(array_file, "file")
    array_file.unlink()  # the return value is not also an output file
    return value


def _meta(job: Job, outcome: SandboxOutcome) -> dict[str, Any]:
    return {
        "exit_code": outcome.exit_code,
        "isolation": dict(outcome.isolation),
        "entrypoint": getattr(job.code, "entrypoint", None),
        "env": dict(job.env),
        "salt": job.salt,
    }
