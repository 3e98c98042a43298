"""What kept history holds alive: every result a run record names, and its code and runtime
blobs. Garbage collection takes these as roots, so an old version stays readable (and `diff`
can show its code) for as long as its record is kept."""

from __future__ import annotations

import logging

from ..cas import Store
from .records import RunRecord

log = logging.getLogger("memoplane.history")


def kept_roots(store: Store) -> tuple[set[str], set[str]]:
    """(result digests, blob digests) named by the store's run records; malformed records are skipped."""
    results: set[str] = set()
    blobs: set[str] = set()
    for run_id in store.run_record_ids():
        data = store.run_record(run_id)
        try:
            record = RunRecord.from_json(data) if data is not None else None
        except ValueError as exc:
            log.warning("run record %s skipped: %s", run_id, exc)
            continue
        if record is None:
            continue
        if record.result:
            results.add(record.result)
        blobs.update(b for b in (record.code_blob, record.runtime_blob) if b)
    return results, blobs
