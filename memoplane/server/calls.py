"""The audit of API calls: one record per call in the store's audit log (memoplane.cas.audit), the
same append-only, hash-chained log as ref writes and attestations, so `memoplane audit verify`
and signed checkpoints cover it too. A record names the key, team, verb, method, path (never its
query: file paths are the caller's data), sandbox, status, sizes, the body's SHA-256 and the
seconds taken: never a body, a header or a secret.

Records are appended in call order by one writer thread, and a call is answered only once its
record is in the store (the store's create syncs it): a crash never loses the record of a call
whose caller heard its end. A full queue holds new calls back; `close` writes what is queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
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
        self._queue: queue.Queue[tuple[Call, Callable[[], None]] | None] = queue.Queue(QUEUED_CALLS)
        self._writer = threading.Thread(target=self._write, name="memoplane-audit-writer", daemon=True)
        self._writer.start()

    async def record(self, call: Call) -> None:
        """Returns once `call`'s record is in the store (or its failure to get there is logged)."""
        loop = asyncio.get_running_loop()
        written: asyncio.Future[None] = loop.create_future()

        def resolve() -> None:
            if not written.done():   # cancelled meanwhile (the client went away)
                written.set_result(None)

        def wake() -> None:   # in the writer thread
            with contextlib.suppress(RuntimeError):   # the loop is closed: no one waits any more
                loop.call_soon_threadsafe(resolve)
        try:
            self._queue.put_nowait((call, wake))
        except queue.Full:
            await asyncio.to_thread(self._queue.put, (call, wake))
        await written

    def close(self) -> None:
        """Write every queued record, then stop the writer."""
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join()

    def _write(self) -> None:
        while (item := self._queue.get()) is not None:
            call, wake = item
            try:
                self.log.append(API_CALL, asdict(call))
            except Exception:  # the call is done: losing its record is logged, never silent
                log.exception("could not record an API call in the audit log: %s", call)
            finally:
                wake()
