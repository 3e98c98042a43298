"""The audit of API calls: one record per call in the store's audit log (memoplane.cas.audit), the
same append-only, hash-chained log as ref writes and attestations, so `memoplane audit verify`
and signed checkpoints cover it too. A record names the key, team, verb, method, path (never its
query: file paths are the caller's data), sandbox, status, sizes, the body's SHA-256 and the
seconds taken: never a body, a header or a secret.

Records are appended in call order by one writer thread: a call does not wait for the store's
sync of its record (a keep-alive connection would wait with it), but a full queue holds new calls
back, so no call goes unrecorded; `close` writes what is queued.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import asdict, dataclass

from ..cas import Store
from ..cas.audit import API_CALL, START

log = logging.getLogger("memoplane.server")
QUEUED_CALLS = 10_000   # records waiting for the writer at most


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
        self._queue: queue.Queue[Call | None] = queue.Queue(QUEUED_CALLS)
        self._writer = threading.Thread(target=self._write, name="memoplane-audit-writer", daemon=True)
        self._writer.start()

    async def record(self, call: Call) -> None:
        try:
            self._queue.put_nowait(call)
        except queue.Full:
            await asyncio.to_thread(self._queue.put, call)

    def close(self) -> None:
        """Write every queued record, then stop the writer."""
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join()

    def _write(self) -> None:
        while (call := self._queue.get()) is not None:
            try:
                self.log.append(API_CALL, asdict(call))
            except Exception:  # the call is done: losing its record is logged, never silent
                log.exception("could not record an API call in the audit log: %s", call)
