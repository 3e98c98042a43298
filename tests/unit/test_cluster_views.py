"""Typed views read raw bodies: missing sections are empty, missing fields take the API models' defaults."""

from __future__ import annotations

from typing import Any

import pytest

from memoplane.api.computejob import CacheSpec, ComputeJobSpec
from memoplane.cluster import protocol as p
from memoplane.cluster import views as v


def test_an_empty_job_reads_the_models_defaults() -> None:
    job = v.job({})
    assert job.spec.policy == CacheSpec().policy == "Use"
    assert job.spec.result_cache == CacheSpec().result_cache == p.DEFAULT_RESULT_CACHE
    assert job.spec.backoff_limit == ComputeJobSpec.model_fields["backoff_limit"].default
    assert job.spec.profile == "python"
    assert job.spec.map_over is None and job.spec.inputs == []
    assert (job.meta.name, job.meta.namespace, job.meta.generation, job.meta.resource_version) == ("", "", 0, None)
    assert job.status.phase is None and job.status.attempts == 0 and job.status.cache_key is None
    assert job.assigned.node is None and job.assigned.store_url is None
    assert not job.settled and not job.meta.deleting


@pytest.mark.parametrize("body", [{"metadata": None, "spec": None, "status": None},
                                  {"spec": {"cache": None, "runtime": None, "map": None}}])
def test_null_sections_read_as_empty(body: dict[str, Any]) -> None:
    job = v.job(body)
    assert job.spec.policy == "Use" and job.spec.profile == "python" and job.meta.labels == {}


def test_a_job_reads_its_fields() -> None:
    body = {"metadata": {"name": "a", "namespace": "ml", "uid": "u1", "generation": 3, "resourceVersion": "7",
                         "labels": {p.NODE_LABEL: "node-a"},
                         "annotations": {p.STORE_ANNOTATION: "s3://memoplane/ml", p.JOB_GENERATION_ANNOTATION: "3",
                                         p.JOB_DIGEST_ANNOTATION: "b3:d"}},
            "spec": {"cache": {"policy": "Bypass", "resultCache": "shared"}, "backoffLimit": 0,
                     "map": {"over": "xs"}, "inputs": [{"name": "xs", "value": [1]}, "junk"]},
            "status": {"phase": "Failed", "observedGeneration": 3, "attempts": "2", "cacheKey": "b3:k",
                       "failure": {"reason": "oom"}, "message": "died"}}
    job = v.job(body)
    assert job.ref == ("ml", "a") and job.meta.generation == 3 and job.meta.resource_version == "7"
    assert (job.spec.policy, job.spec.result_cache, job.spec.backoff_limit) == ("Bypass", "shared", 0)
    assert job.spec.map_over == "xs" and job.spec.inputs == [{"name": "xs", "value": [1]}]
    assert job.status.attempts == 2 and job.status.cache_key == "b3:k"
    assert job.status.failure_summary() == ("oom", "died")
    assert job.assigned.node == "node-a" and job.assigned.job_digest == "b3:d"
    assert job.resolved_for_current_generation and job.settled


def test_a_cache_reads_its_store_with_the_default_bucket() -> None:
    assert v.cache({}).bucket == p.DEFAULT_BUCKET and v.cache({}).prefix == ""
    rc = v.cache({"spec": {"store": {"bucket": "b", "prefix": "ml/"}}})
    assert rc.store_url == "s3://b/ml"
