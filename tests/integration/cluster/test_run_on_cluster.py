"""/v1/run on the local control plane (the API as `hack/cluster up --with-memoplane` runs it, with API
keys): a miss becomes a ComputeJob in the namespace the caller's key is scoped to, a second call is a
hit of that namespace's ResultCache, and a key reaches no other namespace."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import PREFIX, Stack
from test_trust_cluster import forged

from memoplane.api import computejob_manifest
from memoplane.cluster import protocol as p
from memoplane.server.apikeys import ApiKeys
from memoplane.server.cluster_runs import KEPT_SECONDS, RESULT_CACHE, job_spec
from memoplane.server.memo import RunRequest
from memoplane.testing import processes

SOURCE = "import time\n\ndef main(n):\n    time.sleep(0.3)\n    return n * 2\n"


@pytest.fixture(scope="module")
def namespaces(stack: Stack) -> Iterator[tuple[str, str]]:
    names = (PREFIX + "run-a-" + uuid.uuid4().hex[:4], PREFIX + "run-b-" + uuid.uuid4().hex[:4])
    for name in names:
        stack.kube.ensure_namespace(name)
    yield names
    for name in names:
        stack.kube.core.delete_namespace(name)


@pytest.fixture(scope="module")
def api(stack: Stack, namespaces: tuple[str, str]) -> Iterator[dict[str, Any]]:
    """The API with keys of team alpha: one scoped to namespace A, one to no namespace."""
    keys = ApiKeys(stack.cfg.directory / "run-keys" / "apikeys.json")
    _, scoped = keys.create("alpha", ["run"], namespaces=[namespaces[0]])
    _, unscoped = keys.create("alpha", ["run"])
    stack.ensure()
    try:
        proc = processes.start_api(stack.cfg, api_keys=keys.path)
    except processes.ProcessError as exc:
        pytest.fail(f"the agent API cannot start: {exc}", pytrace=False)
    try:
        yield {"url": proc.url("http", "/v1/run"), "scoped": scoped, "unscoped": unscoped}
    finally:
        processes.stop(stack.cfg.directory, processes.API)


def _run(api: dict[str, Any], token: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(api["url"], json=body, headers={"X-API-KEY": token}, timeout=300)


def _jobs(stack: Stack, namespace: str) -> list[str]:
    items, _ = stack.kube.list(p.COMPUTEJOBS, namespace)
    return sorted(item["metadata"]["name"] for item in items)


def test_a_miss_is_a_computejob_of_the_keys_namespace_and_the_next_call_a_hit(
        stack: Stack, api: dict[str, Any], namespaces: tuple[str, str]) -> None:
    ns = namespaces[0]
    body = {"code": SOURCE, "inputs": {"n": 21}, "salt": uuid.uuid4().hex[:8]}
    miss = _run(api, api["scoped"], body)
    assert miss.status_code == 200, miss.text
    first = miss.json()
    assert (first["cached"], first["result"], first["compute_seconds_saved"]) == (False, 42, 0.0)
    job_ns, _, name = first["computejob"].partition("/")
    assert job_ns == ns and _jobs(stack, ns) == [name]
    job = stack.get(ns, name)
    ready = [c for c in job["status"]["conditions"] if c["type"] == "Ready"]
    assert ready and ready[0]["status"] == "True"
    assert job["status"]["cacheKey"] == first["cache_key"] and job["metadata"]["labels"][
        "memoplane.io/team"] == "alpha"
    # The key is the one embedded `memoplane serve` and `memoplane run` derive for the same call.
    assert RunRequest(**body).job()[0].key == first["cache_key"]

    hit = _run(api, api["scoped"], body)
    assert hit.status_code == 200, hit.text
    second = hit.json()
    assert (second["cached"], second["result"], second["cache_key"]) == (True, 42, first["cache_key"])
    assert second["compute_seconds_saved"] >= 0.3 and second["computejob"] is None
    assert _jobs(stack, ns) == [name]   # served from the namespace's cache: no new object

    # A ComputeJob applied with the same spec is the same computation: a hit.
    job_obj = RunRequest(**body).job()[0]
    stack.apply(ns, computejob_manifest("applied", ns, job_spec(job_obj, "Use")))
    applied = stack.wait(ns, "applied")["status"]
    assert (applied["phase"], applied["cached"], applied["cacheKey"]) == ("Succeeded", True, first["cache_key"])


def test_a_forged_result_in_the_namespaces_store_is_not_served_but_recomputed(
        stack: Stack, api: dict[str, Any], namespaces: tuple[str, str]) -> None:
    ns = namespaces[0]
    body = {"code": SOURCE, "inputs": {"n": 5}, "salt": uuid.uuid4().hex[:8]}
    first = _run(api, api["scoped"], body).json()
    assert (first["cached"], first["result"]) == (False, 10)
    store = stack.store(ns)
    # Whoever can write the store re-points the key at a valid result manifest of 11, unattested.
    store.commit(forged(store, first["cache_key"], 11, at_time=time.time()), [])
    assert store.read_ref(first["cache_key"]) != first["result_digest"]
    again = _run(api, api["scoped"], body)
    assert again.status_code == 200, again.text
    answer = again.json()
    # Refused by the cache's trust policy: computed again as a ComputeJob (the operator refuses it too).
    assert (answer["result"], answer["cached"]) == (10, False) and answer["computejob"] is not None
    assert _run(api, api["scoped"], body).json()["cached"] is True   # the recomputed result is attested


def test_a_failing_computation_answers_422_with_the_jobs_reason(api: dict[str, Any],
                                                                namespaces: tuple[str, str]) -> None:
    failing = _run(api, api["scoped"], {"code": "def main():\n    raise ValueError('no')\n",
                                        "salt": uuid.uuid4().hex[:8]})
    assert failing.status_code == 422, failing.text
    message = failing.json()["message"]
    assert f"ComputeJob {namespaces[0]}/run-" in message and "ValueError" in message


def test_a_key_without_a_namespace_is_refused_in_one_line_and_nothing_is_created(
        stack: Stack, api: dict[str, Any], namespaces: tuple[str, str]) -> None:
    before = [_jobs(stack, ns) for ns in namespaces]
    refused = _run(api, api["unscoped"], {"code": SOURCE, "inputs": {"n": 1}})
    assert refused.status_code == 403
    message = refused.json()["message"]
    assert "has no namespace" in message and "\n" not in message
    assert [_jobs(stack, ns) for ns in namespaces] == before


def test_a_key_scoped_to_namespace_a_makes_no_job_in_b(stack: Stack, api: dict[str, Any],
                                                      namespaces: tuple[str, str]) -> None:
    other = namespaces[1]
    refused = _run(api, api["scoped"], {"code": SOURCE, "inputs": {"n": 2}, "namespace": other})
    assert refused.status_code == 403
    assert f"not scoped to namespace {other!r}" in refused.json()["message"]
    assert _jobs(stack, other) == []


def test_a_stricter_trust_policy_refuses_the_next_hit_after_the_stated_bound(
        stack: Stack, api: dict[str, Any], namespaces: tuple[str, str]) -> None:
    """The API reuses a cache's trust policy for hits up to KEPT_SECONDS (the README says): once that
    passed after a change, a result the new policy does not trust is no longer served."""
    ns = namespaces[0]
    body = {"code": SOURCE, "inputs": {"n": 8}, "salt": uuid.uuid4().hex[:8]}
    assert _run(api, api["scoped"], body).json()["cached"] is False
    assert _run(api, api["scoped"], body).json()["cached"] is True   # the old policy is kept now
    rc = stack.kube.get(p.RESULTCACHES, ns, RESULT_CACHE)
    assert rc is not None
    trust = rc["spec"].get("trust")
    # One agent's signature no longer suffices (two agents run: the policy is usable).
    stack.kube.json_patch(p.RESULTCACHES, ns, RESULT_CACHE,
                          [{"op": "add", "path": "/spec/trust", "value": {**(trust or {}), "minSignatures": 2}}])
    try:
        time.sleep(KEPT_SECONDS)
        before = _jobs(stack, ns)
        refused = _run(api, api["scoped"], body)
        # Not a hit: a ComputeJob recomputed it on one node, and its one signature is refused too.
        assert refused.status_code == 502, refused.text
        assert "is not trusted by ResultCache" in refused.json()["message"]
        assert len(_jobs(stack, ns)) == len(before) + 1
    finally:
        restore = {"op": "replace", "path": "/spec/trust", "value": trust} if trust is not None else \
            {"op": "remove", "path": "/spec/trust"}
        stack.kube.json_patch(p.RESULTCACHES, ns, RESULT_CACHE, [restore])
