"""What one run of a job answers (memoplane.embedded.run_job), apart from the machinery that runs
it: `memoplane run` prints it from a daemon's answer too, without importing that machinery."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .cas import ResultManifest


@dataclass
class RunReport:
    cache_key: str
    cached: bool
    result_digest: str
    result: ResultManifest
    value: Any                      # the return value (bytes for bytes/array results)
    duration_ms: float              # this invocation, wall clock
    compute_seconds_saved: float    # on a hit: the compute time the stored result stood for
    explain: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)   # e.g. "a damaged entry was quarantined"
    run_id: str = ""                # this run's record in the store's history
    shared_by: str = ""             # a hit read from a store shared with the reader (its name), else ""

    @property
    def value_kind(self) -> str:
        return self.result.value.kind
