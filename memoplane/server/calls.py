"""The audit of API calls: one record per call in the store's audit log (memoplane.cas.audit), the
same append-only, hash-chained log as ref writes and attestations, so `memoplane audit verify`
and signed checkpoints cover it too. A record names the key, team, verb, method, path (never its
query: file paths are the caller's data), sandbox, status, sizes, the body's SHA-256 and the
seconds taken: never a body, a header or a secret."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass

from ..cas import Store
from ..cas.audit import API_CALL, START

log = logging.getLogger("memoplane.server")


@dataclass(frozen=True)
class Call:
    key: str
    team: str
    verb: str
    method: str
    path: str
    sandbox: str
    status: int
    request_bytes: int
    response_bytes: int
    body_sha256: str
    seconds: float


class CallLog:
    """Appends calls to `store`'s audit log, which it starts if it was not."""

    def __init__(self, store: Store) -> None:
        self.log = store.audit_log
        if not self.log.started():
            self.log.append(START, {})

    async def record(self, call: Call) -> None:
        try:
            await asyncio.to_thread(self.log.append, API_CALL, asdict(call))
        except Exception:  # the call is done: losing its record is logged, never silent
            log.exception("could not record an API call in the audit log: %s", call)
