"""A call is answered only once its audit record is in the store (calls.py): while the audit log
cannot take the record, the caller does not hear the end of the response; once it can, the
record is there when the response is."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import httpx

from memoplane.cas import open_store
from memoplane.cas.audit import API_CALL, parse_record
from memoplane.server.app import build_app
from memoplane.server.calls import CallLog
from memoplane.settings import ServeSettings

_DEADLINE = 60.0


def test_the_response_ends_only_once_its_call_is_recorded(tmp_path: Path) -> None:
    with open_store(str(tmp_path / "store")) as store:
        calls = CallLog(store)
        appending, release = threading.Event(), threading.Event()
        append = calls.log.append

        def held_append(kind: str, fields: Any) -> Any:
            appending.set()
            assert release.wait(_DEADLINE)
            return append(kind, fields)
        calls.log.append = held_append  # type: ignore[method-assign]
        app = build_app(ServeSettings(warm=0), str(tmp_path / "store"), calls=calls)

        async def call() -> None:
            transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                answer = asyncio.create_task(client.get("/health"))
                assert await asyncio.to_thread(appending.wait, _DEADLINE), "the call was never recorded"
                await asyncio.sleep(0.05)   # room for a response that did not wait to get through
                assert not answer.done(), "the caller heard the end before the call was recorded"
                release.set()
                assert (await answer).status_code == 204
                recorded = [parse_record(data) for _, data in calls.log.read()]
                assert [(r["kind"], r["path"], r["status"]) for r in recorded if r["kind"] == API_CALL] == \
                    [(API_CALL, "/health", 204)]
        asyncio.run(call())
        calls.close()
