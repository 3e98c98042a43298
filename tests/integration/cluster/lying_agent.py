"""A lying node agent, for tests only: the real agent (memoplane_agent) whose executions
return a wrong value for a fraction of the jobs (LIAR_RATE, default 0.2), chosen by a seeded
hash of the cache key (LIAR_SEED), so a test knows which jobs it lies on. Everything else —
storing, attesting with its key, reporting — is the real agent's: a liar with a trusted key.

Run as `python lying_agent.py` with the agent's environment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import memoplane_agent.agent as agent_module
from memoplane_agent.__main__ import main

from memoplane.cas import Store
from memoplane.execute import Execution, SandboxRunner
from memoplane.execute import execute as honest_execute
from memoplane.jobs import Job
from memoplane.testing import processes
from memoplane.trust import TrustPolicy

HONEST, LIAR = ("node-a", "node-b"), "node-liar"


def lies(key: str, seed: str, rate: float) -> bool:
    """Whether the liar lies about `key` (deterministic: a test computes it too)."""
    draw = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2.0**64
    return draw < rate


def wrong(value: Any) -> Any:
    """A plausible wrong answer: off by one for a number, wrapped otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value + 1
    return {"lie": value}


def lying_execute(job: Job, store: Store, sandbox: SandboxRunner, *, node: str = "local") -> Execution:
    execution = honest_execute(job, store, sandbox, node=node)
    if execution.result is None or not lies(job.key, os.environ.get("LIAR_SEED", "0"),
                                            float(os.environ.get("LIAR_RATE", "0.2"))):
        return execution
    result = dataclasses.replace(execution.result, value=store.put_value(wrong(store.load_value(execution.result.value))))
    return dataclasses.replace(execution, result=result, digest=store.put_result(result))


@contextlib.contextmanager
def with_a_liar(stack: Any, env: dict[str, str], directory: Path, prefix: str, seed: str, rate: float
                ) -> Iterator[tuple[Any, TrustPolicy]]:
    """A stack of its own (operator, two honest agents and this liar, each with its own key) over the
    session's control plane, watching namespaces `prefix*`, and whom its caches trust: every key
    (the liar's too: a liar with a trusted key). Its processes and namespaces go at the end."""
    cfg = processes.StackConfig(
        directory=directory, env=env, watch_namespaces=prefix + "*", lease_namespace=prefix + "system", capacity=3,
        extra_env={"MEMOPLANE_BACKOFF_BASE": "0.2", "MEMOPLANE_RESYNC_SECONDS": "1",
                   "LIAR_SEED": seed, "LIAR_RATE": str(rate)})
    try:
        processes.apply_crds(cfg.env)
        processes.start_operator(cfg)
        for node in HONEST:
            processes.start_agent(cfg, node)
        processes.start_agent(cfg, LIAR, argv=[sys.executable, __file__])
        yield type(stack)(cfg, stack.kube, stack.stores), TrustPolicy.of(processes.cluster_keys(directory).all)
    finally:
        processes.down(directory)
        for ns in stack.kube.core.list_namespace().items:
            if ns.metadata.name.startswith(prefix):
                stack.kube.core.delete_namespace(ns.metadata.name)


if __name__ == "__main__":
    setattr(agent_module, "execute", lying_execute)  # noqa: B010 - the one thing that differs
    sys.exit(main())
