"""Settings of the operator, the agents and their stores: each field documented once."""

from __future__ import annotations

from dataclasses import dataclass, field

from .resolve import MISSING_GRACE_SECONDS


@dataclass(frozen=True)
class OperatorSettings:
    patterns: list[str] = field(default_factory=list)
    lease_namespace: str = "memoplane-system"
    resync_seconds: float = 2.0
    stats_seconds: float = 30.0
    full_resync_seconds: float = 30.0   # how often every job is listed (the index's safety net)
    resolvers: int = 4                  # threads resolving jobs and serving hits (0: on the worker)
    missing_grace_seconds: float = MISSING_GRACE_SECONDS
    backoff_base: float = 1.0
