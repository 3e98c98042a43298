"""The API's one authentication hook reaches every route: REST, envd's HTTP routes and its
Connect services. A hook that tells teams apart (a stand-in for the API keys of a later round)
keeps one team's sandbox invisible and unreachable to another."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from memoplane.server.app import build_app
from memoplane.server.auth import Caller, Incoming
from memoplane.server.errors import ApiError
from memoplane.settings import ServeSettings

CALLS: list[str] = []   # the paths the hook was asked about, in order


def team_from_header(incoming: Incoming) -> Caller:
    CALLS.append(incoming.headers.get("x-test-path", ""))
    team = incoming.headers.get("x-test-team")
    if not team:
        raise ApiError(401, "no team", "send X-Test-Team")
    return Caller(team=team)


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_app(ServeSettings(warm=1), authenticate=team_from_header),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=60)


def test_a_request_the_hook_refuses_reaches_nothing(url: str) -> None:
    refused = httpx.post(url + "/v2/sandboxes", json={"templateID": "base"})
    assert refused.status_code == 401 and "X-Test-Team" in refused.json()["message"]
    connect = httpx.post(url + "/filesystem.Filesystem/ListDir", json={"path": "/tmp"},
                         headers={"content-type": "application/json"})
    assert connect.status_code == 401


def test_one_teams_sandbox_is_invisible_to_another(url: str) -> None:
    a, b = {"x-test-team": "a"}, {"x-test-team": "b"}
    created = httpx.post(url + "/v2/sandboxes", json={"templateID": "base"}, headers=a, timeout=60)
    assert created.status_code == 201
    sandbox_id = created.json()["sandboxID"]
    try:
        assert [s["sandboxID"] for s in httpx.get(url + "/v2/sandboxes", headers=a).json()] == [sandbox_id]
        assert httpx.get(url + "/v2/sandboxes", headers=b).json() == []
        assert httpx.get(f"{url}/sandboxes/{sandbox_id}", headers=b).status_code == 404
        assert httpx.delete(f"{url}/sandboxes/{sandbox_id}", headers=b).status_code == 404
        envd_a, envd_b = {**a, "e2b-sandbox-id": sandbox_id}, {**b, "e2b-sandbox-id": sandbox_id}
        upload = httpx.post(url + "/files", params={"path": "/tmp/secret"}, content=b"team a's",
                            headers={**envd_a, "content-type": "application/octet-stream"})
        assert upload.status_code == 200, upload.text
        assert httpx.get(url + "/files", params={"path": "/tmp/secret"}, headers=envd_a).content == b"team a's"
        assert httpx.get(url + "/files", params={"path": "/tmp/secret"}, headers=envd_b).status_code == 404
        listing = {"content-type": "application/json"}
        own = httpx.post(url + "/filesystem.Filesystem/ListDir", json={"path": "/tmp"}, headers={**envd_a, **listing})
        assert own.status_code == 200 and "secret" in own.text
        other = httpx.post(url + "/filesystem.Filesystem/ListDir", json={"path": "/tmp"}, headers={**envd_b, **listing})
        assert other.status_code == 404 and other.json()["code"] == "not_found"
    finally:
        assert httpx.delete(f"{url}/sandboxes/{sandbox_id}", headers=a).status_code == 204


def test_each_request_is_authenticated_exactly_once(url: str) -> None:
    """A signed request's replay check (a later round) must see each request once, Connect ones too."""
    a = {"x-test-team": "a"}
    created = httpx.post(url + "/v2/sandboxes", json={"templateID": "base"}, headers=a, timeout=60).json()
    envd = {**a, "e2b-sandbox-id": created["sandboxID"], "content-type": "application/json"}
    try:
        CALLS.clear()
        for path in ("stat", "list", "files"):
            if path == "files":
                httpx.get(url + "/files", params={"path": "/tmp"}, headers={**envd, "x-test-path": path})
            else:
                method = "Stat" if path == "stat" else "ListDir"
                httpx.post(f"{url}/filesystem.Filesystem/{method}", json={"path": "/tmp"},
                           headers={**envd, "x-test-path": path})
        assert CALLS == ["stat", "list", "files"]
    finally:
        httpx.delete(f"{url}/sandboxes/{created['sandboxID']}", headers=a)
