"""An over-chunks map in embedded mode: every leaf and combine node through embedded.run_job.

Each node is an ordinary memoized run (trusted hits, single flight, signing, a run record in
the store's history), under the identity of the whole map plus its role, so `memoplane
history` shows the leaves and combines of a script apart from its plain runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..cas import Store
from ..embedded import run_job
from ..execute import SandboxRunner
from ..history.records import JobIdentity
from ..jobs import BlobInput, Job, Policy
from ..settings import CHUNK_TASK_BYTES
from ..trust import SigningKey, TrustPolicy
from .plan import ChunkMapReport, PutChunk, Role, RunNode, over_blob, run_over_chunks


def run_chunk_map(job: Job, over: str, combine: str, store: Store, sandbox: Callable[[], SandboxRunner], *,
                  policy: Policy = "Use", identity: str, trust: TrustPolicy, signer: SigningKey,
                  target: int = CHUNK_TASK_BYTES, workers: int = 1) -> ChunkMapReport:
    """Run `job` over the content-defined chunks of its blob input `over`, combined with `combine`;
    up to `workers` nodes at once (one sandbox pool serves them all)."""
    data = store.get_bytes(over_blob(job, over).digest)
    put, run = node_runner(store, sandbox, policy=policy, identity=identity, trust=trust, signer=signer)
    return run_over_chunks(job, over, combine, data, put, run, target, workers=workers)


def node_runner(store: Store, sandbox: Callable[[], SandboxRunner], *, policy: Policy, identity: str,
                trust: TrustPolicy, signer: SigningKey) -> tuple[PutChunk, RunNode]:
    """How chunks are stored and nodes run in embedded mode."""

    def put(chunk: bytes) -> BlobInput:
        blob = store.put_bytes(chunk)
        return BlobInput(blob.digest, blob.size)

    def run(node: Job, role: Role) -> tuple[Any, bool]:
        name = f"{identity}#{role}"
        report = run_job(node, store, sandbox, policy=policy, identity=name, trust=trust, signer=signer,
                         job_identity=JobIdentity("", name))
        return report.value, report.cached

    return put, run
