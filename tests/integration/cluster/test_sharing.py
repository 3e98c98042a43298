"""Ownership of store locations and sharing by policy on the cluster (DESIGN §11, issue 12).
Real API server, MinIO, operator and agents; two namespaces per test: team-a owns its home
(s3://memoplane/<team-a>/), team-b points a ResultCache of its own at it.

The reproduction of issue 12 first: without a grant team-b is not served team-a's value and
does not write into team-a's location; a reader grant gives a hit with no agent run, and its
removal stops the next one; a non-writer's results (also with policy Refresh) go to its own
home; a writer's land in team-a's location and serve team-a.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from memoplane.api.specs import computejob_manifest
from memoplane.cluster import protocol as p

pytestmark = pytest.mark.integration
Stack = Any  # conftest.Stack (fixture `stack`)

# A confidential value: random, so whoever computes it gets their own.
TOKEN = "import os\n\ndef main(tag):\n    return {'token': os.urandom(8).hex(), 'tag': tag}\n"
STOLEN = "steal"   # team-b's cache pointed at team-a's home


@pytest.fixture
def team_b(stack: Stack, ns: str) -> Iterator[str]:
    name = f"{ns}-b"   # ns (team-a) starts with the session's prefix: the operator watches it too
    stack.kube.ensure_namespace(name)
    yield name
    stack.kube.core.delete_namespace(name)


def token_job(name: str, salt: str, cache: str = p.DEFAULT_RESULT_CACHE, policy: str = "Use") -> dict[str, Any]:
    return computejob_manifest(name, None, {"python": {"source": TOKEN, "entrypoint": "main"},
                                            "inputs": [{"name": "tag", "value": "q3-numbers"}],
                                            "cache": {"version": salt, "resultCache": cache, "policy": policy}})


def make_cache(stack: Stack, namespace: str, name: str, home_of: str,
               sharing: dict[str, Any] | None = None) -> None:
    spec: dict[str, Any] = {"store": {"bucket": p.DEFAULT_BUCKET, "prefix": p.default_store_prefix(home_of)}}
    if sharing is not None:
        spec["sharing"] = sharing
    body = {"apiVersion": p.API_VERSION, "kind": "ResultCache", "metadata": {"name": name, "namespace": namespace},
            "spec": spec}
    assert stack.kube.create(p.RESULTCACHES, namespace, body) is not None


def share(stack: Stack, namespace: str, sharing: dict[str, Any] | None) -> None:
    """Set (or, None, remove) team-a's default cache's spec.sharing."""
    op = {"op": "add", "path": "/spec/sharing", "value": sharing} if sharing is not None else \
        {"op": "remove", "path": "/spec/sharing"}
    stack.kube.json_patch(p.RESULTCACHES, namespace, p.DEFAULT_RESULT_CACHE, [op])


def readers(namespace: str) -> dict[str, Any]:
    return {"readers": {"namespaces": [namespace]}}


def condition(stack: Stack, namespace: str, name: str, until: Callable[[dict[str, Any]], bool],
              timeout: float = 30.0) -> dict[str, Any]:
    """The cache's Ready condition once `until` holds for it (for the cache's current generation)."""
    deadline = time.monotonic() + timeout
    while True:
        rc = stack.kube.get(p.RESULTCACHES, namespace, name) or {}
        status = rc.get("status") or {}
        ready = next((c for c in status.get("conditions") or () if c.get("type") == "Ready"), {})
        if status.get("observedGeneration") == rc["metadata"]["generation"] and until(ready):
            return ready
        assert time.monotonic() < deadline, f"ResultCache {namespace}/{name}: {status}"
        time.sleep(0.25)


def stalled(stack: Stack, namespace: str, name: str) -> dict[str, Any]:
    return condition(stack, namespace, name, lambda c: c.get("status") == "False"
                     and c.get("reason") == p.REASON_LOCATION_OWNED)


def ready(stack: Stack, namespace: str, name: str) -> dict[str, Any]:
    return condition(stack, namespace, name, lambda c: c.get("status") == "True")


def run(stack: Stack, namespace: str, manifest: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """The job's final status and how many sandbox runs the agents made meanwhile."""
    before = stack.total_runs()
    stack.apply(namespace, manifest)
    done = stack.wait(namespace, manifest["metadata"]["name"])["status"]
    assert done["phase"] == "Succeeded", done
    return done, stack.total_runs() - before


def home_url(namespace: str) -> str:
    return p.store_url(p.DEFAULT_BUCKET, p.default_store_prefix(namespace))


def test_a_foreign_location_is_not_served_until_granted_and_not_after_revoked(
        stack: Stack, ns: str, team_b: str) -> None:
    team_a, salt = ns, uuid.uuid4().hex[:8]
    make_cache(stack, team_a, p.DEFAULT_RESULT_CACHE, team_a)
    secret, runs = run(stack, team_a, token_job("secret", salt))
    assert (secret["cached"], runs) == (False, 1)

    # a) the reproduction: team-b's cache at team-a's home, no grant
    make_cache(stack, team_b, STOLEN, team_a)
    owner = f"ResultCache {team_a}/default"
    assert owner in stalled(stack, team_b, STOLEN)["message"]
    denied, runs = run(stack, team_b, token_job("try", salt, STOLEN))
    assert denied["cacheKey"] == secret["cacheKey"]
    assert (denied["cached"], runs) == (False, 1), "computed by an agent, not served"
    assert denied["result"]["value"]["token"] != secret["result"]["value"]["token"]
    assert denied["result"]["store"] == home_url(team_b)
    [why] = stack.eventually_events(team_b, "try", p.REASON_SHARING_DENIED)
    assert owner in why and f"list {team_b} in {owner} spec.sharing.readers" in why
    # the status message said so while the job waited for its node (the Scheduled Event repeats it)
    assert any(owner in m for m in stack.events(team_b, "try", p.REASON_SCHEDULED))
    assert stack.store(team_a).read_ref(secret["cacheKey"]) == secret["result"]["digest"], "team-a's ref untouched"

    # b) team-a lists team-b as a reader: a hit, no agent run
    share(stack, team_a, readers(team_b))
    ready(stack, team_b, STOLEN)
    hit, runs = run(stack, team_b, token_job("granted", salt, STOLEN))
    assert (hit["cached"], runs) == (True, 0)
    assert hit["result"]["value"] == secret["result"]["value"]
    assert hit["result"]["store"] == home_url(team_a)

    # c) team-a removes the grant: team-b's next job misses
    share(stack, team_a, None)
    stalled(stack, team_b, STOLEN)
    revoked, runs = run(stack, team_b, token_job("revoked", salt, STOLEN))
    assert (revoked["cached"], runs) == (False, 1)
    assert revoked["result"]["value"]["token"] != secret["result"]["value"]["token"]


def test_a_reader_that_is_not_a_writer_computes_into_its_own_home(stack: Stack, ns: str, team_b: str) -> None:
    team_a, salt = ns, uuid.uuid4().hex[:8]
    make_cache(stack, team_a, p.DEFAULT_RESULT_CACHE, team_a, sharing=readers(team_b))
    make_cache(stack, team_b, STOLEN, team_a)
    ready(stack, team_b, STOLEN)

    # d) a miss in team-a's location: computed, stored in team-b's home only
    fresh, runs = run(stack, team_b, token_job("fresh", salt + "-b", STOLEN))
    assert (fresh["cached"], runs) == (False, 1)
    assert fresh["result"]["store"] == home_url(team_b)
    assert stack.store(team_a).read_ref(fresh["cacheKey"]) is None, "nothing written into team-a's location"
    assert stack.store(team_b).read_ref(fresh["cacheKey"]) == fresh["result"]["digest"]
    assert any("may not write" in m for m in stack.eventually_events(team_b, "fresh", p.REASON_SHARING_DENIED))

    # policy Refresh through the non-writer's cache leaves team-a's entry as it was
    owned, _ = run(stack, team_a, token_job("owned", salt))
    refreshed, runs = run(stack, team_b, token_job("refresh", salt, STOLEN, policy="Refresh"))
    assert (refreshed["cached"], runs, refreshed["cacheKey"]) == (False, 1, owned["cacheKey"])
    assert refreshed["result"]["store"] == home_url(team_b)
    assert stack.store(team_a).read_ref(owned["cacheKey"]) == owned["result"]["digest"]
    again, runs = run(stack, team_a, token_job("owned-again", salt))
    assert (again["cached"], runs, again["result"]["value"]) == (True, 0, owned["result"]["value"])


def test_a_writer_stores_in_the_owners_location_and_the_owner_is_served(stack: Stack, ns: str, team_b: str) -> None:
    team_a, salt = ns, uuid.uuid4().hex[:8]
    both = {**readers(team_b), "writers": {"namespaces": [team_b]}}
    make_cache(stack, team_a, p.DEFAULT_RESULT_CACHE, team_a, sharing=both)
    make_cache(stack, team_b, STOLEN, team_a)
    ready(stack, team_b, STOLEN)

    # e) team-b computes into team-a's location; team-a's job of the same key is a hit
    written, runs = run(stack, team_b, token_job("write", salt, STOLEN))
    assert (written["cached"], runs) == (False, 1)
    assert written["result"]["store"] == home_url(team_a)
    assert stack.store(team_a).read_ref(written["cacheKey"]) == written["result"]["digest"]
    assert not stack.events(team_b, "write", p.REASON_SHARING_DENIED)
    served, runs = run(stack, team_a, token_job("read", salt))
    assert (served["cached"], runs, served["result"]["value"]) == (True, 0, written["result"]["value"])


def test_an_upstream_of_another_namespace_is_an_input_only_when_its_cache_grants_reading(
        stack: Stack, ns: str, team_b: str) -> None:
    team_a, salt = ns, uuid.uuid4().hex[:8]
    make_cache(stack, team_a, p.DEFAULT_RESULT_CACHE, team_a)
    up, _ = run(stack, team_a, token_job("up", salt))
    down = computejob_manifest("down", None, {
        "python": {"source": "def main(secret):\n    return secret['token']\n", "entrypoint": "main"},
        "inputs": [{"name": "secret", "fromJob": {"name": "up", "namespace": team_a}}],
        "cache": {"version": salt}})
    stack.apply(team_b, down)
    waiting = stack.wait(team_b, "down", until=lambda o: (o.get("status") or {}).get("reason")
                         == p.REASON_SHARING_DENIED)["status"]
    assert waiting["phase"] == "Waiting"
    assert waiting["message"].startswith("spec.inputs[0].fromJob.namespace: ")
    assert f"ResultCache {team_a}/default, which does not list {team_b}" in waiting["message"]

    share(stack, team_a, readers(team_b))   # seen at the waiting job's next resync visit
    done = stack.wait(team_b, "down")["status"]
    assert (done["phase"], done["result"]["value"]) == ("Succeeded", up["result"]["value"]["token"])


def test_readers_chosen_by_namespace_labels(stack: Stack, ns: str, team_b: str) -> None:
    team_a, salt, org = ns, uuid.uuid4().hex[:8], uuid.uuid4().hex[:8]
    stack.kube.core.patch_namespace(team_b, {"metadata": {"labels": {"memoplane-test/org": org}}})
    selector = {"readers": {"namespaceSelector": {"matchLabels": {"memoplane-test/org": org}}}}
    make_cache(stack, team_a, p.DEFAULT_RESULT_CACHE, team_a, sharing=selector)
    secret, _ = run(stack, team_a, token_job("secret", salt))
    make_cache(stack, team_b, STOLEN, team_a)
    ready(stack, team_b, STOLEN)
    hit, runs = run(stack, team_b, token_job("selected", salt, STOLEN))
    assert (hit["cached"], runs, hit["result"]["value"]) == (True, 0, secret["result"]["value"])
