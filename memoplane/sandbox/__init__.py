"""The sandbox: a zygote per runtime profile, a warm pool of isolated children.

    with SandboxPool(profile="python", size=4) as pool:
        outcome = pool.run(SandboxRequest(PythonTask(source, "main", {"x": 1}), in_dir, out_dir))

Every outcome records the isolation its child actually had (`outcome.isolation`).
"""

from __future__ import annotations

from memoplane.sandbox.pool import REQUIRED, SandboxPool
from memoplane.sandbox.profiles import PROFILES, Profile
from memoplane.sandbox.types import (
    CommandTask,
    Failure,
    FailureReason,
    Limits,
    PythonTask,
    SandboxOutcome,
    SandboxRequest,
)

__all__ = [
    "PROFILES",
    "REQUIRED",
    "CommandTask",
    "Failure",
    "FailureReason",
    "Limits",
    "Profile",
    "PythonTask",
    "SandboxOutcome",
    "SandboxPool",
    "SandboxRequest",
    "probe_isolation",
    "run_once",
]


def run_once(request: SandboxRequest, profile: str = "python",
             require_isolation: bool = True) -> SandboxOutcome:
    """Start a pool of one, run one job, stop. For scripts and tests; agents keep a pool."""
    with SandboxPool(profile=profile, size=0, require_isolation=require_isolation) as pool:
        return pool.run(request)


def probe_isolation(profile: str = "minimal") -> dict[str, bool | str]:
    """What this host lets a sandbox child have: True, or why not (a string)."""
    with SandboxPool(profile=profile, size=0, require_isolation=False) as pool:
        return dict(pool.isolation)
