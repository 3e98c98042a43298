"""Integration tests run against the real local control plane (hack/cluster, DESIGN.md §8).

The control plane is brought up once per test session and stopped at the end, unless it was
already running (`hack/cluster up` in a shell): then it is reused and left running. If it
cannot be built or started, every test that needs it errors with the reason: never a skip.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from memoplane.cluster.stores import Stores, StoreSettings
from memoplane.testing import build, cluster, node_chart, node_release

_HERE = Path(__file__).parent


def _is_integration(item: pytest.Item) -> bool:
    return _HERE in Path(str(item.fspath)).parents


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything under tests/integration needs the control plane: mark it so `-m` selects it.
    for item in items:
        if _is_integration(item):
            item.add_marker(pytest.mark.integration)


_build_error: list[build.BuildError] = []
_node_build_error: list[build.BuildError] = []  # only the node's tests need these binaries


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build (or reuse) the binaries before any test runs, outside the per-test timeout.

    A cold build takes minutes; inside the fixture it would count against the first
    test's timeout. A failure is kept and reported by the fixture, so the tests error.
    """
    if not any(_is_integration(item) for item in session.items):
        return
    capture = session.config.pluginmanager.getplugin("capturemanager")
    # Let the build's progress lines through: a cold build is minutes of otherwise silence.
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        try:
            build.ensure_all(build.CONTROL_PLANE_COMPONENTS)
        except build.BuildError as exc:
            _build_error.append(exc)
        try:
            build.ensure_all(build.NODE_COMPONENTS)
        except build.BuildError as exc:
            _node_build_error.append(exc)


@pytest.fixture(scope="session")
def control_plane() -> Iterator[cluster.ClusterInfo]:
    if _build_error:
        pytest.fail(f"the local control plane cannot be built: {_build_error[0]}", pytrace=False)
    directory = cluster.state_dir()
    try:
        result = cluster.up(directory, owner=f"pytest:{os.getpid()}")
    except (build.BuildError, cluster.ClusterError) as exc:
        pytest.fail(f"the local control plane cannot start: {exc}", pytrace=False)
    # Stop what this session started, or what an earlier session started and left behind
    # when it died; leave a set started from a shell (`hack/cluster up`) running.
    owned = not result.already_running or cluster.orphaned_by_test_session(result.info)
    saved = {k: os.environ.get(k) for k in result.info.env()}
    os.environ.update(result.info.env())  # kubectl and clients in tests find it like a user would
    try:
        yield result.info
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if owned:
            cluster.down(directory)


@pytest.fixture(scope="session")
def node_binaries() -> None:
    """The node's binaries were built at collection; fails (never skips) with the build's error."""
    if _node_build_error:
        pytest.fail(f"the node's binaries cannot be built: {_node_build_error[0]}", pytrace=False)


@pytest.fixture(scope="module")
def memoplane_on_node(control_plane: cluster.ClusterInfo, node_binaries: None) -> Iterator[node_release.Release]:
    """The node with the chart installed as `hack/cluster up --with-node --with-memoplane` installs it
    (node_chart.install), as its own set sharing the session's MinIO. One per module, not per
    session: only one node may run on a machine, and other modules bring up their own."""
    directory = Path(f"{cluster.state_dir()}-onnode")
    try:
        info = cluster.up(directory, owner=f"pytest:{os.getpid()}", store=control_plane, with_node=True).info
        node_chart.install(info)
        release = node_release.find_release(info)
    except cluster.ClusterError as exc:  # NodeError, ChartError and ReleaseError are ones
        cluster.down(directory)
        pytest.fail(f"memoplane cannot be installed on the node: {exc}", pytrace=False)
    try:
        yield release
    finally:
        cluster.down(directory)


@pytest.fixture(scope="module")
def node_jobs(memoplane_on_node: node_release.Release) -> node_release.Jobs:
    return node_release.Jobs.connect(memoplane_on_node.info)


@pytest.fixture(scope="module")
def node_stores(memoplane_on_node: node_release.Release) -> Iterator[Stores]:
    """The node set's object stores, with its root keys (to read results and run records)."""
    stores = Stores(StoreSettings.from_env(memoplane_on_node.info.env()))
    yield stores
    stores.close()


@pytest.fixture
def node_ns(node_jobs: node_release.Jobs, memoplane_on_node: node_release.Release) -> Iterator[str]:
    """A new namespace for the test's jobs, once the release's pods are Ready (a test before may
    have replaced them)."""
    for component in (node_release.OPERATOR, node_release.AGENT):
        memoplane_on_node.wait_ready(component)
    name = f"onnode-{uuid.uuid4().hex[:6]}"
    node_jobs.kube.ensure_namespace(name)
    yield name
    node_jobs.kube.core.delete_namespace(name)


Kubectl = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def kubectl(control_plane: cluster.ClusterInfo) -> Kubectl:
    """Run kubectl against the control plane; fails the test with kubectl's stderr."""

    def run(*args: str, stdin: str | None = None, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        argv = ["kubectl", f"--kubeconfig={control_plane.kubeconfig}", *args]
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            pytest.fail(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr}")
        return proc

    return run
