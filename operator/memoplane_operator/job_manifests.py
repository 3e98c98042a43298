"""Job manifests in the store: the parsed ones (immutable: safe to keep) and when this
process last put each (a job that waited long re-puts its manifest before it is scheduled,
so that the store's GC cannot have collected it)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from memoplane.canonical import canonical_json
from memoplane.cas import Store
from memoplane.cluster import protocol as p
from memoplane.jobs import Job, job_from_dict, job_to_dict

REFRESH_SECONDS = 60.0   # a job manifest put longer ago than this is put again before scheduling


def digest_of(obj: Mapping[str, Any]) -> str:
    return str(((obj.get("metadata") or {}).get("annotations") or {})[p.JOB_DIGEST_ANNOTATION])


class JobManifests:
    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}       # job manifest digest -> Job
        self._put_at: dict[str, float] = {}   # job manifest digest -> when this process last put it

    def remember(self, digest: str, job: Job) -> None:
        self._jobs[digest] = job

    def put(self, store: Store, manifest: bytes) -> None:
        digest = store.put_bytes(manifest).digest
        self._put_at[digest] = time.monotonic()

    def job_of(self, obj: Mapping[str, Any], store: Store) -> Job:
        """The job a resolved ComputeJob names by its digest annotation."""
        digest = digest_of(obj)
        job = self._jobs.get(digest)
        if job is None:
            job = job_from_dict(json.loads(store.get_bytes(digest)))
            self._jobs[digest] = job
        return job

    def refresh(self, store: Store, obj: Mapping[str, Any], job: Job) -> None:
        if time.monotonic() - self._put_at.get(digest_of(obj), float("-inf")) > REFRESH_SECONDS:
            self.put(store, canonical_json(job_to_dict(job)))
