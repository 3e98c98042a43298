"""Two memoplane installs sharing one bucket (DESIGN §11, issue 12 item 4): two control planes
(the session's, and a second one with its own etcd and kube-apiserver using the same MinIO),
each with its operator and one agent, each writing with MinIO credentials limited to its own
prefix (memoplane.testing.tenants) and keeping its namespaces' homes there (MEMOPLANE_HOME);
both have a namespace of the same name. Cluster 2 is served cluster 1's results only through a
ResultCache that trusts cluster 1's agents' keys.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import SESSION, Stack
from minio.error import S3Error

from memoplane.api.specs import computejob_manifest
from memoplane.cas.s3 import make_client
from memoplane.cluster import protocol as p
from memoplane.cluster.kube import Kube, load_config
from memoplane.cluster.stores import Stores, StoreSettings
from memoplane.settings import HOME_ENV, KEY_ENVS
from memoplane.testing import cluster, processes, tenants

pytestmark = pytest.mark.integration

BUCKET = f"mpx-{SESSION}-shared"
NS = f"mpx-{SESSION}-ml"          # the same namespace name in both clusters
ADD = 'def main(a, b):\n    return {"sum": a + b}\n'


@dataclass
class Install:
    name: str              # also its prefix in the shared bucket
    node: str
    stack: Stack
    keys: tuple[str, str]  # its MinIO user's (access key, secret key)

    def runs(self) -> float:
        return self.stack.agent_runs(self.node)


def install(name: str, plane: cluster.ClusterInfo, directory: Path) -> Install:
    """One install: its MinIO user (writes under <name>/ only), operator and one agent."""
    keys = tenants.scoped_user(plane, f"mpx-{SESSION}-{name}", BUCKET, f"{name}/")
    env = {**plane.env(), **dict(zip(KEY_ENVS, keys, strict=True))}
    cfg = processes.StackConfig(
        directory=directory, env=env, watch_namespaces=NS, lease_namespace=f"mpx-{SESSION}-system",
        extra_env={HOME_ENV: f"s3://{BUCKET}/{name}", "MEMOPLANE_BACKOFF_BASE": "0.2",
                   "MEMOPLANE_RESYNC_SECONDS": "1", "MEMOPLANE_STATS_SECONDS": "3"})
    kube = Kube(load_config(plane.kubeconfig))
    kube.ensure_namespace(NS)
    node = f"{name}-node"
    try:
        processes.up(cfg, (node,))
    except processes.ProcessError as exc:
        pytest.fail(f"install {name} cannot start: {exc}", pytrace=False)
    return Install(name, node, Stack(cfg, kube, Stores(StoreSettings.from_env(env))), keys)


@pytest.fixture(scope="module")
def second_plane(control_plane: cluster.ClusterInfo) -> Iterator[cluster.ClusterInfo]:
    """etcd and kube-apiserver of their own, the session's MinIO."""
    directory = Path(f"{cluster.state_dir()}2")
    try:
        result = cluster.up(directory, owner=f"pytest:{SESSION}", store=control_plane)
    except cluster.ClusterError as exc:
        pytest.fail(f"the second control plane cannot start: {exc}", pytrace=False)
    try:
        yield result.info
    finally:
        if not result.already_running:
            cluster.down(directory)


@pytest.fixture(scope="module")
def installs(control_plane: cluster.ClusterInfo, second_plane: cluster.ClusterInfo,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Install, Install]]:
    made: list[Install] = []
    try:
        for name, plane in (("c1", control_plane), ("c2", second_plane)):
            made.append(install(name, plane, Path(tmp_path_factory.mktemp(f"install-{name}"))))
        yield made[0], made[1]
    finally:
        for done in made:
            processes.down(done.stack.cfg.directory)
            done.stack.stores.close()
            done.stack.kube.core.delete_namespace(NS)


def add_job(name: str, cache: str, salt: str) -> dict[str, Any]:
    return computejob_manifest(name, None, {"python": {"source": ADD, "entrypoint": "main"},
                                            "inputs": [{"name": "a", "value": 2}, {"name": "b", "value": 3}],
                                            "cache": {"version": salt, "resultCache": cache}})


def reading_cache(name: str, prefix: str, trust: dict[str, Any] | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"store": {"bucket": BUCKET, "prefix": prefix, "readOnly": True}}
    if trust is not None:
        spec["trust"] = trust
    return {"apiVersion": p.API_VERSION, "kind": "ResultCache", "metadata": {"name": name, "namespace": NS},
            "spec": spec}


def status(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("status") or {}


def events(stack: Stack, job: str) -> list[str]:
    items = stack.kube.core.list_namespaced_event(NS, field_selector=f"involvedObject.name={job}").items
    return [str(e.reason) for e in items]


def test_each_install_writes_only_under_its_own_prefix(installs: tuple[Install, Install]) -> None:
    one, two = installs
    endpoint = two.stack.cfg.env["MEMOPLANE_S3_ENDPOINT"]
    first, second = make_client(endpoint, *one.keys), make_client(endpoint, *two.keys)
    first.put_object(BUCKET, "c1/probe", io.BytesIO(b"one"), 3)
    second.put_object(BUCKET, "c2/probe", io.BytesIO(b"two"), 3)
    for attempt in (lambda: second.put_object(BUCKET, "c1/probe", io.BytesIO(b"forged"), 6),
                    lambda: second.remove_object(BUCKET, "c1/probe"),
                    lambda: first.put_object(BUCKET, "c2/probe", io.BytesIO(b"forged"), 6)):
        with pytest.raises(S3Error) as caught:
            attempt()
        assert caught.value.code == "AccessDenied"
    # Each reads everything: whose results are served is the trust policy's decision.
    assert second.get_object(BUCKET, "c1/probe").read() == b"one"
    assert first.get_object(BUCKET, "c2/probe").read() == b"two"


def test_results_are_shared_only_with_trust_in_the_other_installs_keys(installs: tuple[Install, Install]) -> None:
    one, two = installs
    salt = uuid.uuid4().hex
    # Cluster 1 computes in its namespace's home, under its prefix.
    one.stack.apply(NS, add_job("total", p.DEFAULT_RESULT_CACHE, salt))
    done = one.stack.wait(NS, "total")
    assert status(done)["phase"] == p.SUCCEEDED and status(done)["result"]["value"] == {"sum": 5}
    assert one.runs() == 1
    home = f"c1/{NS}/"
    assert any(o.object_name.startswith(home) for o in one.stack.stores.client().list_objects(
        BUCKET, prefix=home, recursive=True))

    # Cluster 2 reads cluster 1's home trusting its agents' keys (their ConfigMap, copied): a hit,
    # no agent run in cluster 2.
    agent_keys = one.stack.kube.get_config_map(one.stack.cfg.lease_namespace, p.AGENT_KEYS_CONFIG_MAP)
    assert agent_keys is not None and agent_keys.get("data")
    two.stack.kube.core.create_namespaced_config_map(NS, {"metadata": {"name": "c1-agents"},
                                                          "data": dict(agent_keys["data"])})
    trust = {"keys": [{"configMapRef": {"name": "c1-agents"}}]}
    assert two.stack.kube.create(p.RESULTCACHES, NS, reading_cache("trusting-c1", home, trust)) is not None
    before = two.runs()
    two.stack.apply(NS, add_job("trusting", "trusting-c1", salt))
    done = two.stack.wait(NS, "trusting")
    assert status(done)["phase"] == p.SUCCEEDED and status(done)["result"]["value"] == {"sum": 5}
    assert status(done).get("cached") is True and two.runs() == before
    assert status(done)["result"]["store"] == p.store_url(BUCKET, home)

    # Without that trust: a miss, computed in cluster 2 (and written to its own home).
    before = two.runs()
    assert two.stack.kube.create(p.RESULTCACHES, NS, reading_cache("from-c1", home, None)) is not None
    two.stack.apply(NS, add_job("untrusting", "from-c1", salt))
    done = two.stack.wait(NS, "untrusting")
    assert status(done)["phase"] == p.SUCCEEDED and status(done)["result"]["value"] == {"sum": 5}
    assert not status(done).get("cached") and two.runs() == before + 1
    assert p.REASON_UNTRUSTED in events(two.stack, "untrusting")
    mine = f"c2/{NS}/"
    assert any(o.object_name.startswith(mine) for o in two.stack.stores.client().list_objects(
        BUCKET, prefix=mine, recursive=True))


def test_hack_cluster_user_makes_keys_that_write_only_under_their_prefix(control_plane: cluster.ClusterInfo) -> None:
    proc = subprocess.run([sys.executable, "-m", "memoplane.testing.cluster_cli", "user", f"mpx-{SESSION}-c3", BUCKET,
                           "c3/"], capture_output=True, text=True, timeout=60, check=True)
    exports = dict(re.findall(r"^export (\w+)='([^']*)'$", proc.stdout, re.M))
    assert exports[HOME_ENV] == f"s3://{BUCKET}/c3"
    client = make_client(control_plane.s3_endpoint, *(exports[name] for name in KEY_ENVS))
    client.put_object(BUCKET, "c3/probe", io.BytesIO(b"ok"), 2)
    with pytest.raises(S3Error) as caught:
        client.put_object(BUCKET, "c1/probe", io.BytesIO(b"no"), 2)
    assert caught.value.code == "AccessDenied"
