"""/v1/run on Kubernetes, its pure parts: which namespace a caller's job goes to, and that the
ComputeJob it makes has the key of the same call served embedded (as the operator resolves it)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest

from memoplane.api import computejob_manifest
from memoplane.cluster.resolve import Resolved, resolve
from memoplane.server.auth import Caller
from memoplane.server.cluster_runs import job_spec, namespace_for
from memoplane.server.errors import ApiError
from memoplane.server.memo import RunRequest

RUNTIME = "b3:" + "cd" * 32


class NoLookups:
    """A job of JSON inputs reads nothing while it is resolved."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"resolving a /v1/run job looked something up: {name}")


@pytest.mark.parametrize("body", [
    {"code": "def main(n, s):\n    return n * 2\n", "inputs": {"n": 21, "s": {"a": [1, 2]}}, "env": {"MODE": "x"},
     "salt": "v2", "entrypoint": "main", "timeout": 2.5},
    {"command": ["sh", "-c", "echo hi"], "inputs": {"rows": [1, 2, 3]}},
    {"code": "def go():\n    return 1\n", "entrypoint": "go"},
])
def test_the_computejob_of_a_run_has_the_key_the_embedded_run_has(body: dict[str, Any]) -> None:
    job, _ = RunRequest(**body).job()
    obj = computejob_manifest("run-x", "ml", job_spec(job, "Use"))
    obj["metadata"].update(generation=1, uid="u", creationTimestamp="2026-01-02T03:04:05Z")
    resolved = resolve(obj, RUNTIME, NoLookups(), datetime(2026, 1, 2, 3, 5, tzinfo=UTC))  # type: ignore[arg-type]
    assert isinstance(resolved, Resolved), resolved
    assert resolved.job.key == dataclasses.replace(job, runtime=RUNTIME).key
    assert resolved.job.limits.timeout_s == max(1, -(-job.limits.timeout_s // 1))


def test_a_key_with_one_namespace_computes_there_and_nowhere_else() -> None:
    caller = Caller(team="alpha", key_id="mk1", namespaces=("team-a",))
    assert namespace_for(caller, None) == namespace_for(caller, "team-a") == "team-a"
    with pytest.raises(ApiError) as refused:
        namespace_for(caller, "team-b")
    assert refused.value.status == 403 and "not scoped to namespace 'team-b'" in str(refused.value)


def test_a_key_without_namespaces_is_refused_and_one_with_several_must_say_which() -> None:
    with pytest.raises(ApiError) as none:
        namespace_for(Caller(key_id="mk2"), None)
    assert none.value.status == 403 and "API key mk2 has no namespace" in str(none.value)
    with pytest.raises(ApiError) as anonymous:   # serve without keys, on loopback
        namespace_for(Caller(), None)
    assert "a caller without an API key has no namespace" in str(anonymous.value)
    several = Caller(key_id="mk3", namespaces=("a", "b"))
    with pytest.raises(ApiError) as ambiguous:
        namespace_for(several, None)
    assert ambiguous.value.status == 400 and "must say which" in str(ambiguous.value)
    assert namespace_for(several, "b") == "b"
