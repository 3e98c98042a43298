"""`memoplane apikey create | list | revoke` and `memoplane audit show --team`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memoplane.cas import open_store
from memoplane.cas.audit import API_CALL
from memoplane.cli import main
from memoplane.server.apikeys import ApiKeys, split_token


def test_create_prints_the_token_once_list_never_shows_it_revoke_refuses_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys_file = str(tmp_path / "apikeys.json")
    assert main(["apikey", "create", "--keys-file", keys_file, "--team", "team-a", "--verb", "exec",
                 "--verb", "files", "--tier", "large", "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    keyid, secret = split_token(created["token"])
    assert (created["keyid"], created["team"], created["verbs"]) == (keyid, "team-a", ["exec", "files"])
    assert main(["apikey", "list", "--keys-file", keys_file]) == 0
    listed = capsys.readouterr().out
    assert keyid in listed and "tier=large" in listed and "active" in listed and secret not in listed
    assert main(["apikey", "revoke", "--keys-file", keys_file, keyid]) == 0
    capsys.readouterr()
    assert main(["apikey", "list", "--keys-file", keys_file, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["revoked"] is not None
    assert ApiKeys(Path(keys_file)).load().keys[keyid].revoked is not None


@pytest.mark.parametrize(("flags", "message"), [
    (["--team", "Team A", "--verb", "exec"], "team 'Team A' is not valid"),
    (["--team", "a", "--verb", "fly"], "verb 'fly' is not a verb"),
    (["--team", "a", "--verb", "run", "--namespace", "Team_NS"], "--namespace 'Team_NS' is not a Kubernetes namespace"),
    (["--team", "a", "--verb", "exec", "--tier", "gold"], "--tier 'gold' is not a configured tier"),
])
def test_bad_keys_are_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str],
                                          message: str) -> None:
    assert main(["apikey", "create", "--keys-file", str(tmp_path / "k.json"), *flags]) != 0
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "k.json").exists()


def test_a_keys_namespaces_are_kept_and_listed_and_an_older_file_without_them_still_loads(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys_file = tmp_path / "apikeys.json"
    assert main(["apikey", "create", "--keys-file", str(keys_file), "--team", "team-a", "--verb", "run",
                 "--namespace", "ns-b", "--namespace", "ns-a", "--json"]) == 0
    keyid = json.loads(capsys.readouterr().out)["keyid"]
    assert ApiKeys(keys_file).load().keys[keyid].namespaces == ["ns-a", "ns-b"]
    assert main(["apikey", "list", "--keys-file", str(keys_file)]) == 0
    assert "namespaces=ns-a,ns-b" in capsys.readouterr().out
    body = json.loads(keys_file.read_text())
    del body["keys"][keyid]["namespaces"]   # as a file written before keys had namespaces
    keys_file.write_text(json.dumps(body))
    assert ApiKeys(keys_file).load().keys[keyid].namespaces == []


def test_audit_show_team_prints_only_that_teams_calls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    where = str(tmp_path / "store")
    with open_store(where) as store:
        for team, path in (("team-a", "/v1/run"), ("team-b", "/files"), ("team-a", "/v2/sandboxes")):
            store.audit_log.append(API_CALL, {"team": team, "path": path, "key": "mk1", "status": 200})
    assert main(["audit", "show", "--store", where, "--team", "team-a", "--json"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["team"], r["path"]) for r in shown] == [("team-a", "/v1/run"), ("team-a", "/v2/sandboxes")]
