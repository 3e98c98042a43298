"""Whether and where runs are announced as OpenLineage events: $MEMOPLANE_OPENLINEAGE_URL, or what
the operator's and the agents' settings configure. Loads memoplane.history.openlineage (and
openlineage-python, ~0.4 s to import) only when an endpoint is set, so runs without one pay nothing."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..settings import OPENLINEAGE_URL_ENV
from .records import JobIdentity, RunRecord

if TYPE_CHECKING:
    from openlineage.client.event_v2 import RunEvent

    from .openlineage import Emitter

log = logging.getLogger("memoplane.history.openlineage")
_emitter: Emitter | None = None
_configured = False
_lock = threading.Lock()


def configure(url: str, count: Callable[[str], None] | None = None) -> Emitter | None:
    """This process's emitter, to `url` ("": none), counting outcomes with `count` (sent, dropped,
    failed). Without it, the first run reads $MEMOPLANE_OPENLINEAGE_URL."""
    global _emitter, _configured
    with _lock:
        _configured = True
        if not url:
            _emitter = None
        else:
            from .openlineage import Emitter
            _emitter = Emitter(url, count)
        return _emitter


def emitter() -> Emitter | None:
    if not _configured:
        configure(os.environ.get(OPENLINEAGE_URL_ENV, ""))
    return _emitter


def run_started(identity: JobIdentity, run_id: str, key: str, cache: str) -> None:
    """START of a run that computes (its COMPLETE or FAIL follows from `run_settled`)."""
    target = emitter()
    if target is not None:
        from . import openlineage as ol
        _send(target, lambda: [ol.start_event(identity, run_id, key, cache)])


def run_settled(record: RunRecord, *, start: bool = False) -> None:
    """COMPLETE (FAIL) of the run `record` describes, after its START when `start` (a hit, whose
    START and COMPLETE are one moment; or a run announced by nobody before)."""
    target = emitter()
    if target is not None:
        from . import openlineage as ol
        _send(target, lambda: ([ol.start_event(record.job, record.run_id, record.key, record.cache, record.started)]
                               if start else []) + [ol.settled_event(record)])


def _send(target: Emitter, build: Callable[[], list[RunEvent]]) -> None:
    try:
        events = build()
    except Exception as exc:  # noqa: BLE001 - lineage events never fail a run
        log.warning("OpenLineage event not built: %s", exc)
        return
    target.emit(*events)
