"""Placement of the API's sandboxes on the node agents (memoplane.server.placement): the session
endpoint's handshake (only a holder of the secret starts anything) and the choice of agent."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from memoplane.cluster import protocol as p
from memoplane.errors import InputError
from memoplane.server.auth import Caller
from memoplane.server.errors import ApiError
from memoplane.server.placement import Placement, Refused, challenge, open_remote, read_secret, send
from memoplane.server.sessions import SessionManager
from memoplane.settings import ServeSettings

SECRET = b"s" * 32


async def _endpoint(secret: bytes, seen: list[Any]) -> asyncio.Server:
    """An agent's side of the handshake: what it was asked, or how it refused."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            seen.append(await challenge(reader, writer, secret))
            await send(writer, {"created": {"id": "x"}})
        except Refused as e:
            seen.append(e)
        writer.close()
    return await asyncio.start_server(serve, "127.0.0.1", 0)


def _run(secret: bytes) -> tuple[Any, list[Any]]:
    async def go() -> tuple[Any, list[Any]]:
        seen: list[Any] = []
        server = await _endpoint(SECRET, seen)
        port = server.sockets[0].getsockname()[1]
        try:
            placed = await open_remote("node-a", f"127.0.0.1:{port}", secret, {"profile": "python"}, 1 << 16)
            placed.writer.close()
            return placed, seen
        except ApiError as e:
            return e, seen
        finally:
            server.close()
    return asyncio.run(go())


def test_the_secrets_holder_starts_a_sandbox() -> None:
    placed, seen = _run(SECRET)
    assert placed.node == "node-a" and seen == [{"profile": "python"}]


def test_a_caller_without_the_secret_is_refused_before_anything_starts() -> None:
    error, seen = _run(b"not the secret")
    assert isinstance(error, ApiError) and error.status == 503 and "did not start the sandbox" in error.message
    assert len(seen) == 1 and isinstance(seen[0], Refused) and "does not hold the session secret" in str(seen[0])


def test_an_unreachable_agent_is_a_503_naming_it() -> None:
    async def go() -> ApiError:
        with pytest.raises(ApiError) as e:
            await open_remote("node-b", "127.0.0.1:1", SECRET, {}, 1 << 16)
        return e.value
    error = asyncio.run(go())
    assert error.status == 503 and "node node-b's agent is unreachable at 127.0.0.1:1" in error.message


def test_the_secret_file_must_be_private(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("abc\n")
    path.chmod(0o644)
    with pytest.raises(InputError, match=r"MEMOPLANE_SESSION_SECRET_FILE: .* readable or writable by group or others"):
        read_secret(str(path))
    path.chmod(0o600)
    assert read_secret(str(path)) == b"abc"


def _lease(node: str, sessions: str, profiles: str = "python") -> dict[str, Any]:
    annotations = {p.PROFILES_ANNOTATION: profiles, p.runtime_annotation("python"): "b3:" + "1" * 64}
    if sessions:
        annotations[p.SESSIONS_ANNOTATION] = sessions
    return {"metadata": {"name": p.lease_name(node), "resourceVersion": "1", "annotations": annotations},
            "spec": {"renewTime": datetime.now(UTC).isoformat(), "leaseDurationSeconds": 10}}


class _Leases:
    """The one Kube call Placement makes."""

    def __init__(self, leases: list[dict[str, Any]]) -> None:
        self.leases = leases

    def list_leases(self, namespace: str) -> list[dict[str, Any]]:
        return self.leases


def test_sandboxes_go_to_the_agent_with_fewest_of_ours_and_only_to_session_serving_ones() -> None:
    leases = [_lease("node-a", "10.0.0.1:8091"), _lease("node-b", "10.0.0.2:8091"), _lease("node-c", "")]
    placement = Placement(_Leases(leases), "memoplane-system", SECRET)  # type: ignore[arg-type]
    picks = [placement.pick("python") for _ in range(3)]
    assert picks == [("node-a", "10.0.0.1:8091"), ("node-b", "10.0.0.2:8091"), ("node-a", "10.0.0.1:8091")]
    placement.release("node-a")
    placement.release("node-a")
    assert placement.pick("python") == ("node-a", "10.0.0.1:8091")


def test_no_agent_for_the_profile_is_a_503_naming_the_namespace() -> None:
    placement = Placement(_Leases([_lease("node-a", "")]), "ns1", SECRET)  # type: ignore[arg-type]
    with pytest.raises(ApiError, match="no live node agent in namespace ns1 serves 'python' sandboxes") as e:
        placement.pick("python")
    assert e.value.status == 503


def test_the_api_on_kubernetes_starts_no_sandbox_pool_of_its_own() -> None:
    placement = Placement(_Leases([]), "ns1", SECRET)  # type: ignore[arg-type]
    with pytest.raises(ApiError, match="no sandbox pools of its own") as e:
        SessionManager(ServeSettings(), placement=placement).pool("python")
    assert e.value.status == 500


def test_the_runtime_of_a_profile_is_the_one_the_live_agents_advertise() -> None:
    """What /v1/run keys a job with on Kubernetes (server/cluster_runs.py), as the operator does."""
    placement = Placement(_Leases([_lease("node-a", ""), _lease("node-b", "10.0.0.2:8091")]), "ns1",  # type: ignore[arg-type]
                          SECRET)
    assert placement.runtime("python") == "b3:" + "1" * 64
    assert placement.runtime("gpu") is None


def test_excluded_agents_are_not_picked() -> None:
    leases = [_lease("node-a", "10.0.0.1:8091"), _lease("node-b", "10.0.0.2:8091")]
    placement = Placement(_Leases(leases), "ns1", SECRET)  # type: ignore[arg-type]
    assert placement.pick("python", frozenset({"node-a"})) == ("node-b", "10.0.0.2:8091")
    with pytest.raises(ApiError, match=r"unreachable: node-a, node-b"):
        placement.pick("python", frozenset({"node-a", "node-b"}))


def test_a_create_skips_an_unreachable_agent_and_ends_when_the_agent_closes() -> None:
    """SessionManager against a stand-in agent endpoint (this module's): node-a's announced endpoint
    refuses connections, node-b takes the sandbox; the agent closing the connection ends it."""
    async def go() -> None:
        seen: list[Any] = []
        server = await _endpoint(SECRET, seen)
        port = server.sockets[0].getsockname()[1]
        leases = [_lease("node-a", "127.0.0.1:1"), _lease("node-b", f"127.0.0.1:{port}")]
        placement = Placement(_Leases(leases), "ns1", SECRET)  # type: ignore[arg-type]
        manager = SessionManager(ServeSettings(), placement=placement)
        session = await manager.create(Caller(team="t"), "base", 60, {"A": "1"}, {})
        assert session.node == "node-b"  # type: ignore[attr-defined]
        assert seen[0]["team"] == "t" and seen[0]["profile"] == "python" and seen[0]["env"] == {"A": "1"}
        await asyncio.wait_for(session.ended.wait(), 10)   # the stand-in closes after `created`
        assert manager.sessions == {} and placement.placed == {}
        server.close()
    asyncio.run(go())
