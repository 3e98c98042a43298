"""Sharing results between teams by policy: a grant in the keys file lets a reader team's /v1/run be
served the granting team's hit (judged by the reader's trust policy, audited); no grant, a
withdrawn grant, or a grant to someone else: not visible. Sandboxes and snapshots are never shared."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from memoplane.cas import open_namespace, open_store
from memoplane.cas.audit import SHARED_READ, parse_record
from memoplane.cli import main
from memoplane.embedded import Shared, run_job
from memoplane.errors import InputError
from memoplane.jobs import Job, JsonInput, PythonCode
from memoplane.sandbox import SandboxPool
from memoplane.server.access import KeyAuthenticator
from memoplane.server.apikeys import ApiKeys
from memoplane.server.app import build_app
from memoplane.server.calls import CallLog
from memoplane.server.limits import Limiter
from memoplane.settings import DEFAULT_TIERS, ServeSettings
from memoplane.trust.local import Keyring
from memoplane.trust.policy import TrustPolicy

VERBS = ["exec", "files", "run", "snapshot"]


def _code(n: int) -> dict[str, Any]:
    return {"code": f"def main(x):\n    return x * {n}\n", "inputs": {"x": 21}}


class Server:
    def __init__(self, url: str, keys: ApiKeys, store: Path) -> None:
        self.url, self.keys, self.store = url, keys, store
        self.tokens = {team: keys.create(team, VERBS)[1] for team in ("owner", "reader", "stranger")}

    def client(self, team: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-KEY": self.tokens[team]}, timeout=120)

    def run(self, team: str, body: dict[str, Any]) -> dict[str, Any]:
        with self.client(team) as client:
            answer = client.post("/v1/run", json=body)
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    def shared_reads(self) -> list[dict[str, Any]]:
        with open_store(self.store) as store:
            return [b for b in (parse_record(data) for _, data in store.audit_log.read()) if b["kind"] == SHARED_READ]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("sharing")
    keys, store_dir = ApiKeys(root / "apikeys.json"), root / "store"
    with open_store(store_dir) as store:
        app = build_app(ServeSettings(warm=1), str(store_dir), KeyAuthenticator(keys, 300),
                        Limiter(dict(DEFAULT_TIERS)), CallLog(store))
        sock = socket.create_server(("127.0.0.1", 0))
        uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not uv.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        yield Server(f"http://127.0.0.1:{sock.getsockname()[1]}", keys, store_dir)
        uv.should_exit = True
        thread.join(timeout=60)


def test_a_grant_serves_the_owners_hits_to_the_reader_only_while_it_stands(server: Server) -> None:
    owned = {n: server.run("owner", _code(n)) for n in (2, 3, 4)}
    assert not any(o["cached"] for o in owned.values())
    before = server.run("reader", _code(2))   # no grant: the owner's result is not visible
    assert (before["cached"], before["shared_by"], before["result"]) == (False, None, 42), before

    assert server.keys.grant("owner", "reader") and not server.keys.grant("owner", "reader")
    served = server.run("reader", _code(3))
    assert (served["cached"], served["shared_by"], served["result"]) == (True, "owner", 63), served
    assert served["result_digest"] == owned[3]["result_digest"]
    assert served["compute_seconds_saved"] == owned[3]["compute_seconds"]
    stranger = server.run("stranger", _code(3))   # the grant names the reader, no one else
    assert (stranger["cached"], stranger["shared_by"]) == (False, None), stranger
    reads = server.shared_reads()
    assert [(r["reader"], r["cache"], r["result"]) for r in reads] == [("reader", "owner", owned[3]["result_digest"])]
    with server.client("owner") as owner:   # the other way round needs the reader's own grant
        assert owner.post("/v1/run", json=_code(2)).json()["shared_by"] is None

    assert server.keys.ungrant("owner", "reader") and not server.keys.ungrant("owner", "reader")
    after = server.run("reader", _code(4))   # withdrawn: from the next request on
    assert (after["cached"], after["shared_by"]) == (False, None), after
    assert len(server.shared_reads()) == 1


def test_an_admin_key_grants_its_own_teams_results_through_the_api(server: Server) -> None:
    admin = server.keys.create("owner", ["admin"])[1]
    with httpx.Client(base_url=server.url, headers={"X-API-KEY": admin}, timeout=60) as owner_admin, \
            server.client("owner") as owner_runner:
        assert owner_runner.put("/v1/grants/reader").status_code == 403   # a key without admin
        granted = owner_admin.put("/v1/grants/reader")
        assert granted.status_code == 200 and granted.json()["granted"] is True, granted.text
        assert owner_admin.get("/v1/grants").json() == {"team": "owner", "readers": ["reader"], "readsFrom": []}
        with server.client("reader") as reader:
            assert reader.get("/v1/grants").status_code == 403   # reading grants is admin's too
        assert server.keys.load().readable_by("reader") == ("owner",)
        owned = server.run("owner", _code(5))
        served = server.run("reader", _code(5))
        assert (served["cached"], served["shared_by"], served["result_digest"]) == \
            (True, "owner", owned["result_digest"])
        bad = owner_admin.put("/v1/grants/owner")
        assert bad.status_code == 400 and "already reads its own" in bad.json()["message"], bad.text
        assert owner_admin.delete("/v1/grants/reader").status_code == 204
        assert owner_admin.delete("/v1/grants/reader").status_code == 404
    assert server.keys.load().readable_by("reader") == ()


def test_sandboxes_and_snapshots_are_never_shared(server: Server) -> None:
    server.keys.grant("owner", "reader")
    try:
        with server.client("owner") as owner, server.client("reader") as reader:
            created = owner.post("/v2/sandboxes", json={"templateID": "base"})
            assert created.status_code == 201, created.text
            sandbox = created.json()["sandboxID"]
            try:
                digest = owner.post(f"/v1/sandboxes/{sandbox}/snapshot").json()["snapshotID"]
                assert reader.get(f"/sandboxes/{sandbox}").status_code == 404
                assert sandbox not in [s["sandboxID"] for s in reader.get("/v2/sandboxes").json()]
                assert digest not in [s["snapshotID"] for s in reader.get("/snapshots").json()]
                from_snapshot = reader.post("/v2/sandboxes", json={"templateID": digest})
                assert from_snapshot.status_code == 404, from_snapshot.text
                assert reader.delete(f"/v1/snapshots/{digest}").status_code == 404
            finally:
                owner.delete(f"/sandboxes/{sandbox}")
    finally:
        server.keys.ungrant("owner", "reader")


def test_a_shared_hit_is_judged_by_the_readers_trust_policy(tmp_path: Path) -> None:
    """A hit in a granting store that the reader's policy does not trust is no hit: it computes."""
    job = Job(PythonCode("def main(n):\n    return n + 1\n"), {"n": JsonInput(1)})
    owner_keys, reader_keys = Keyring(tmp_path / "owner-keys"), Keyring(tmp_path / "reader-keys")
    with open_namespace(tmp_path / "store", "team-o") as owner, open_namespace(tmp_path / "store", "team-r") as reader, \
            open_store(tmp_path / "store") as log, SandboxPool(profile="python", size=0,
                                                              require_isolation=False) as pool:
        computed = run_job(job, owner, lambda: pool, identity="inc", trust=owner_keys.policy(),
                           signer=owner_keys.signer())
        shared = Shared({"o": owner}, "r", log)
        untrusted = run_job(job, reader, lambda: pool, identity="inc", trust=TrustPolicy({}), shared=shared,
                            signer=reader_keys.signer())
        assert (untrusted.cached, untrusted.shared_by) == (False, "")
        assert not list(log.audit_log.read())   # nothing was read across
        trusting = TrustPolicy.of([owner_keys.signer().public])
        other = Job(PythonCode("def main(n):\n    return n + 1\n"), {"n": JsonInput(1)}, salt="again")
        run_job(other, owner, lambda: pool, identity="inc2", trust=owner_keys.policy(), signer=owner_keys.signer())
        served = run_job(other, reader, lambda: pool, identity="inc2", trust=trusting, shared=shared,
                         signer=reader_keys.signer())
        assert (served.cached, served.shared_by, served.value) == (True, "o", 2)
        assert computed.value == 2


@pytest.mark.parametrize(("team", "reader", "message"), [
    ("owner", "owner", "already reads its own"),
    ("local", "reader", "team 'local' is not a team of API keys"),
    ("owner", "bad name!", "reader team 'bad name!' is not a team"),
])
def test_bad_grants_name_the_flag(tmp_path: Path, team: str, reader: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        ApiKeys(tmp_path / "apikeys.json").grant(team, reader)


def test_the_grant_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys_file = str(tmp_path / "apikeys.json")
    ApiKeys(tmp_path / "apikeys.json").create("owner", ["run"])
    assert main(["apikey", "grant", "--keys-file", keys_file, "--team", "owner", "--reader", "reader"]) == 0
    assert "team reader may now read team owner's results" in capsys.readouterr().out
    assert ApiKeys(tmp_path / "apikeys.json").load().readable_by("reader") == ("owner",)
    assert main(["apikey", "list", "--keys-file", keys_file]) == 0
    assert "grant  team=owner  results read by reader" in capsys.readouterr().out
    assert main(["apikey", "ungrant", "--keys-file", keys_file, "--team", "owner", "--reader", "reader"]) == 0
    assert "no longer reads" in capsys.readouterr().out
    assert ApiKeys(tmp_path / "apikeys.json").load().readable_by("reader") == ()
