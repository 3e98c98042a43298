"""At its cache's quota the agent computes the job and reports its result, but sets no ref:
the result is not cached (the assignment's cache-result annotation, written by the operator)."""

from __future__ import annotations

from typing import Any

import pytest
from test_agent_failures import run, scheduled_job, setup, status, tmp_dir  # noqa: F401  (setup and the fixture it uses)

from memoplane.cluster import protocol as p
from memoplane.sandbox.types import SandboxOutcome, SandboxRequest


class ValueRunner:
    """A SandboxRunner whose job returns a JSON value."""

    def __init__(self, value: Any) -> None:
        self.value, self.runs = value, 0

    def run(self, request: SandboxRequest) -> SandboxOutcome:
        self.runs += 1
        return SandboxOutcome(ok=True, value=self.value, value_kind="json", exit_code=0)


@pytest.mark.parametrize("cache_result", [None, "false"], ids=["under-quota", "at-quota"])
def test_a_job_at_quota_is_computed_and_not_cached(setup: Any, cache_result: str | None) -> None:  # noqa: F811
    agent, kube, store = setup
    obj = scheduled_job(kube, store, backoff_limit=0)
    if cache_result is not None:
        for body in (obj, kube.objects[(p.COMPUTEJOBS, "ml", "deep")]):
            body["metadata"]["annotations"][p.CACHE_RESULT_ANNOTATION] = cache_result
    runner = ValueRunner({"sum": 7})
    agent.pools["python"] = runner
    run(agent, obj)
    assert runner.runs == 1 and status(kube)["phase"] == p.SUCCEEDED, status(kube)
    digest = status(kube)["result"]["digest"]
    assert store.load_value(store.get_result(digest).value) == {"sum": 7}, "the result is stored for the status"
    ref = store.read_ref(obj["status"]["cacheKey"])
    if cache_result is None:
        assert ref is not None, "under quota the result is cached"
    else:
        assert ref is None, "at quota no ref is set"
