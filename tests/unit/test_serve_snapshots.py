"""Snapshots of sandboxes and teams' separate memories, against a real `memoplane serve` process
with API keys (restarted once: snapshots outlive it), driven by the e2b SDKs and plain HTTP.

Hostile angles: a link, a FIFO or a file outside the sandbox never leaves it through a snapshot
(the host reads the snapshot as it reads a job's outputs), not even when the sandbox's own agent
is subverted; a damaged or forged tree is never restored; another team's digest is not found."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2b import Sandbox, SandboxException
from e2b_code_interpreter import Sandbox as CodeSandbox
from fakes import packed_copy

from memoplane.canonical import canonical_json
from memoplane.cas import NAMESPACES, b3, open_namespace, open_store
from memoplane.cas.digests import object_name
from memoplane.cas.records import BlobRef, seal
from memoplane.errors import InputError, NotFound
from memoplane.server.apikeys import ApiKeys
from memoplane.server.app import SNAPSHOT_METADATA

_START_DEADLINE = 60.0
VERBS = ["exec", "files", "run", "snapshot"]


class Serve:
    """One `memoplane serve` process at a time over one store and keys file."""

    def __init__(self, home: Path) -> None:
        self.home, self.store = home, home / "store"
        keys = ApiKeys(home / "apikeys.json")
        # the large tier: this module creates more sandboxes than the standard tier's burst
        self.tokens = {team: keys.create(team, VERBS, tier="large")[1] for team in ("alpha", "beta")}
        self.tokens["alpha-exec"] = keys.create("alpha", ["exec"])[1]
        self.env = {**os.environ, "MEMOPLANE_STORE": str(self.store), "MEMOPLANE_KEYS_DIR": str(home / "keys"),
                    "MEMOPLANE_SERVE_API_KEYS": str(home / "apikeys.json"), "MEMOPLANE_SERVE_WARM": "1"}
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self) -> None:
        with open(self.home / "serve.log", "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "memoplane.cli", "serve", "--port", "0"],
                                         env=self.env, stdout=subprocess.PIPE, stderr=log, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, (line, (self.home / "serve.log").read_text())
        self.url = line.split("listening on ")[1].split()[0]
        deadline = time.monotonic() + _START_DEADLINE
        while httpx.get(self.url + "/health", headers={"X-API-KEY": self.tokens["alpha"]}).status_code != 204:
            assert time.monotonic() < deadline, "the server did not answer"
            time.sleep(0.05)

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(timeout=60)

    def sdk(self, team: str) -> dict[str, Any]:
        return {"api_key": self.tokens[team], "api_url": self.url, "sandbox_url": self.url, "timeout": 120}

    def api(self, team: str) -> dict[str, Any]:
        """What the SDK's class methods besides create take (no sandbox timeout)."""
        return {"api_key": self.tokens[team], "api_url": self.url}

    def http(self, team: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-KEY": self.tokens[team]}, timeout=120)

    def snapshot(self, team: str, sandbox_id: str) -> httpx.Response:
        with self.http(team) as client:
            return client.post(f"/v1/sandboxes/{sandbox_id}/snapshot")

    def create_from(self, team: str, digest: str) -> httpx.Response:
        with self.http(team) as client:
            return client.post("/v2/sandboxes", json={"templateID": "base", "metadata": {SNAPSHOT_METADATA: digest}})

    def alive(self, team: str) -> list[str]:
        with self.http(team) as client:
            return [s["sandboxID"] for s in client.get("/v2/sandboxes").json()]


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    server = Serve(tmp_path_factory.mktemp("snapshots"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def snapshot(serve: Serve) -> str:
    """A snapshot of team alpha: a text file, a nested executable, an empty file."""
    sandbox = Sandbox.create(**serve.sdk("alpha"))
    try:
        sandbox.files.write("/tmp/work/notes.txt", "first")
        sandbox.commands.run("mkdir -p /tmp/bin && printf 'echo restored\\n' > /tmp/bin/go.sh && "
                             "chmod +x /tmp/bin/go.sh && : > /tmp/empty")
        taken = serve.snapshot("alpha", sandbox.sandbox_id)
        assert taken.status_code == 200, taken.text
        again = serve.snapshot("alpha", sandbox.sandbox_id)
        assert again.json()["snapshotID"] == taken.json()["snapshotID"]   # the same tree, the same digest
        assert sandbox.commands.run('ls -A "$MEMOPLANE_OUT" | wc -l').stdout == "0\n"   # its copy is let go
        return str(taken.json()["snapshotID"])
    finally:
        sandbox.kill()


def test_a_snapshot_restores_into_new_sandboxes_after_a_restart(serve: Serve, snapshot: str) -> None:
    serve.stop()
    serve.start()
    fork = Sandbox.create(metadata={SNAPSHOT_METADATA: snapshot}, **serve.sdk("alpha"))
    other = Sandbox.create(metadata={SNAPSHOT_METADATA: snapshot}, **serve.sdk("alpha"))
    try:
        assert fork.files.read("/tmp/work/notes.txt") == "first"
        assert fork.commands.run("/tmp/bin/go.sh").stdout == "restored\n"   # the exec bit came back
        assert fork.commands.run("stat -c %s /tmp/empty").stdout == "0\n"
        assert "snapshot" not in fork.commands.run('ls "$MEMOPLANE_IN"').stdout   # the host let its copy go
        fork.files.write("/tmp/work/notes.txt", "changed in the fork")
        assert other.files.read("/tmp/work/notes.txt") == "first"           # forks do not share writes
        chunks_before = _chunks(serve)
        changed = serve.snapshot("alpha", fork.sandbox_id).json()["snapshotID"]
        assert changed != snapshot
        assert _chunks(serve) - chunks_before == 1   # only the changed file's bytes are new: the rest deduplicated
    finally:
        fork.kill()
        other.kill()


def test_the_e2b_sdks_own_snapshots(serve: Serve) -> None:
    """create_snapshot(mode="filesystem") and Sandbox.create(snapshot_id): E2B's way, served as is."""
    source = Sandbox.create(**serve.sdk("alpha"))
    try:
        source.files.write("/tmp/state.json", '{"step": 3}')
        info = source.create_snapshot(mode="filesystem")
        assert info.snapshot_id.startswith("b3:") and source.create_snapshot().snapshot_id == info.snapshot_id
        with pytest.raises(SandboxException, match="memory snapshots are not supported yet"):
            source.create_snapshot(mode="full")
    finally:
        source.kill()
    resumed = Sandbox.create(info.snapshot_id, **serve.sdk("alpha"))
    try:
        assert resumed.files.read("/tmp/state.json") == '{"step": 3}'
        assert resumed.get_info().template_id == info.snapshot_id
    finally:
        resumed.kill()
    with pytest.raises(SandboxException, match="not found"):
        Sandbox.create(info.snapshot_id, **serve.sdk("beta"))


def test_snapshots_are_listed_and_deleted_through_the_e2b_sdk(serve: Serve) -> None:
    """list_snapshots (all the team's, or one sandbox's, by pages) and delete_snapshot: a deleted
    snapshot starts nothing, though its tree is still in the store until GC."""
    source = Sandbox.create(**serve.sdk("alpha"))
    try:
        taken = []
        for step in range(3):
            source.files.write("/tmp/step.txt", str(step))
            taken.append(source.create_snapshot().snapshot_id)
        mine = [s.snapshot_id for s in source.list_snapshots().next_items()]
        assert mine == taken
        pages = Sandbox.list_snapshots(limit=2, **serve.api("alpha"))
        listed = []
        while pages.has_next:
            listed += [s.snapshot_id for s in pages.next_items()]
        assert set(taken) <= set(listed) and len(listed) == len(set(listed))
        assert not set(taken) & {s.snapshot_id for s in Sandbox.list_snapshots(**serve.api("beta")).next_items()}
        assert Sandbox.delete_snapshot(taken[0], **serve.api("beta")) is False   # not beta's to delete
        assert Sandbox.delete_snapshot(taken[0], **serve.api("alpha")) is True
        assert Sandbox.delete_snapshot(taken[0], **serve.api("alpha")) is False
    finally:
        source.kill()
    assert [s.snapshot_id for s in Sandbox.list_snapshots(sandbox_id=source.sandbox_id,
                                                          **serve.api("alpha")).next_items()] == taken[1:]
    gone = serve.create_from("alpha", taken[0])
    assert gone.status_code == 404 and "not found" in gone.json()["message"], gone.text
    with open_namespace(serve.store, "team-alpha") as store:
        assert store.backend.exists(object_name("trees", taken[0]))   # until GC, past the grace period
    resumed = Sandbox.create(taken[2], **serve.sdk("alpha"))
    try:
        assert resumed.files.read("/tmp/step.txt") == "2"
    finally:
        resumed.kill()
    with serve.http("alpha-exec") as client:   # listing and deleting need the snapshot verb
        assert client.get("/v1/snapshots").status_code == 403
        assert client.delete(f"/v1/snapshots/{taken[1]}").status_code == 403
    with serve.http("alpha") as client:
        assert client.delete("/v1/snapshots/latest").status_code == 404
        assert client.get("/v1/snapshots", params={"limit": 0}).status_code == 400
        bad_token = client.get("/v1/snapshots", params={"nextToken": "b3:abc"})
        assert bad_token.status_code == 400 and "nextToken" in bad_token.json()["message"], bad_token.text
        mine = {"sandboxID": source.sandbox_id}
        first = client.get("/v1/snapshots", params={**mine, "limit": 1})
        assert [s["snapshotID"] for s in first.json()] == [taken[1]]   # taken[0] was deleted
        assert client.delete(f"/v1/snapshots/{taken[1]}").status_code == 204
        rest = client.get("/v1/snapshots", params={**mine, "nextToken": first.headers["x-next-token"]})
        assert [s["snapshotID"] for s in rest.json()] == [taken[2]]   # the page after it, though it is gone
        assert "x-next-token" not in rest.headers


def _chunks(serve: Serve) -> int:
    with open_namespace(serve.store, "team-alpha") as store:
        store.chunks.refresh()
        return len(store.chunks.index)   # distinct chunks the namespace's packs hold


def test_another_teams_or_an_unknown_digest_is_not_found(serve: Serve, snapshot: str) -> None:
    before = serve.alive("beta")
    with serve.http("alpha") as client:
        twice = client.post("/v2/sandboxes", json={"templateID": snapshot,
                                                   "metadata": {SNAPSHOT_METADATA: "b3:" + "1" * 64}})
    assert twice.status_code == 400 and "two different snapshots" in twice.json()["message"], twice.text
    refused = serve.create_from("beta", snapshot)
    assert refused.status_code == 404 and snapshot in refused.json()["message"], refused.text
    unknown = serve.create_from("alpha", "b3:" + "0" * 64)
    assert unknown.status_code == 404, unknown.text
    unscoped = serve.create_from("alpha-exec", snapshot)   # its team's snapshot, but not its verb
    assert unscoped.status_code == 403 and "'snapshot'" in unscoped.json()["message"], unscoped.text
    with serve.http("alpha-exec") as client:
        as_template = client.post("/v2/sandboxes", json={"templateID": snapshot})
    assert as_template.status_code == 403 and "'snapshot'" in as_template.json()["message"], as_template.text
    malformed = serve.create_from("alpha", "latest")
    assert malformed.status_code == 400 and "snapshot" in malformed.json()["message"], malformed.text
    assert serve.alive("beta") == before


def test_a_damaged_snapshot_is_never_restored(serve: Serve) -> None:
    sandbox = Sandbox.create(**serve.sdk("alpha"))
    try:
        sandbox.files.write("/tmp/secret.txt", "to be damaged " * 1000)
        digest = serve.snapshot("alpha", sandbox.sandbox_id).json()["snapshotID"]
    finally:
        sandbox.kill()
    with open_namespace(serve.store, "team-alpha") as store:
        blob = store.get_tree(digest).entries["secret.txt"].digest
        for chunk, _ in store.blob_manifest(blob).chunks:   # this file's own: no other file holds its bytes
            pack, loc = packed_copy(store, Path(serve.store) / NAMESPACES / "team-alpha", chunk)
            data = bytearray(pack.read_bytes())
            data[loc.offset + loc.length // 2] ^= 0xFF
            pack.write_bytes(bytes(data))
    before = serve.alive("alpha")
    refused = serve.create_from("alpha", digest)
    assert refused.status_code == 422 and "damaged" in refused.json()["message"], refused.text
    assert serve.alive("alpha") == before


def test_a_forged_tree_with_a_link_or_a_way_out_is_never_restored(serve: Serve) -> None:
    with open_namespace(serve.store, "team-alpha") as store:
        file = store.put_bytes(b"planted")
        forged = []
        for entries in ({"escape": {"link": "/etc/passwd"}},
                        {"../../outside": {"digest": file.digest, "size": file.size, "exec": False}}):
            body = {"v": 1, "entries": entries}
            digest = b3(canonical_json(body))
            store.backend.put(object_name("trees", digest), seal(body))
            store.keep_snapshot(BlobRef(digest, 0), "planted")   # whoever writes the store can name it too
            forged.append(digest)
    for digest in forged:
        refused = serve.create_from("alpha", digest)
        assert refused.status_code == 422 and "damaged" in refused.json()["message"], refused.text


def test_a_snapshot_cannot_carry_a_link_or_a_fifo_out(serve: Serve) -> None:
    sandbox = Sandbox.create(**serve.sdk("alpha"))
    try:
        sandbox.commands.run("ln -s /etc/passwd /tmp/passwd")
        linked = serve.snapshot("alpha", sandbox.sandbox_id)
        assert linked.status_code == 422 and "symlink" in linked.json()["message"], linked.text
        sandbox.commands.run("rm /tmp/passwd && mkfifo /tmp/pipe")
        fifo = serve.snapshot("alpha", sandbox.sandbox_id)
        assert fifo.status_code == 400 and "cannot keep" in fifo.json()["message"], fifo.text
    finally:
        sandbox.kill()


SUBVERT = """
import gc, os
agent_class = next(type(o) for o in gc.get_objects() if type(o).__name__ == "Agent")
def planted(self, rid, req):
    out = os.environ["MEMOPLANE_OUT"]
    for name in os.listdir(out):
        os.unlink(os.path.join(out, name))
    os.symlink("/etc", os.path.join(out, "{name}")) if "{kind}" == "link" else os.mkfifo(os.path.join(out, "{name}"))
    return {{}}
agent_class.op_snapshot = planted
"""


def test_a_subverted_agent_cannot_carry_a_link_or_a_fifo_out(serve: Serve) -> None:
    """The agent runs in the sandbox: a cell rewrites its snapshot to plant what the honest one
    refuses. The host's collection refuses it, and stores nothing."""
    sandbox = CodeSandbox.create(**serve.sdk("alpha"))
    try:
        for kind, name in (("link", "etc"), ("fifo", "pipe")):
            cell = sandbox.run_code(SUBVERT.format(kind=kind, name=name))
            assert cell.error is None, cell.error
            refused = serve.snapshot("alpha", sandbox.sandbox_id)
            assert refused.status_code == 422 and name in refused.json()["message"], refused.text
        assert sandbox.run_code("1 + 1").text == "2"   # the sandbox is still usable
    finally:
        sandbox.kill()


RUN = {"code": "def main(x):\n    return x * 2\n", "inputs": {"x": 21}}


def test_teams_do_not_share_results_but_each_team_remembers(serve: Serve) -> None:
    with serve.http("alpha") as alpha, serve.http("beta") as beta:
        first = alpha.post("/v1/run", json=RUN).json()
        assert (first["cached"], first["result"]) == (False, 42), first
        again = alpha.post("/v1/run", json=RUN).json()
        assert (again["cached"], again["cache_key"]) == (True, first["cache_key"])
        other = beta.post("/v1/run", json=RUN).json()   # the same key, in team beta's own store: a miss
        assert (other["cached"], other["result"], other["cache_key"]) == (False, 42, first["cache_key"]), other
        assert beta.post("/v1/run", json=RUN).json()["cached"] is True
    with open_store(serve.store) as shared:   # neither team's result is the local team's (the CLI's)
        assert not list(shared.cache_keys())


def test_the_route_is_documented_and_no_key_belongs_to_the_local_team(serve: Serve, tmp_path: Path) -> None:
    with serve.http("alpha") as alpha:
        paths = alpha.get("/openapi.json").json()["paths"]
    assert {"/v1/sandboxes/{sandbox_id}/snapshot", "/sandboxes/{sandbox_id}/snapshots"} <= set(paths)
    with pytest.raises(InputError, match="'local' is the loopback caller's own"):
        ApiKeys(tmp_path / "apikeys.json").create("local", ["run"])


def test_a_namespace_is_a_store_of_its_own(tmp_path: Path) -> None:
    with open_namespace(tmp_path, "team-x") as x, open_namespace(tmp_path, "team-y") as y:
        stored = x.put_bytes(b"only x's")
        assert x.get_bytes(stored.digest) == b"only x's"
        assert not y.backend.exists(object_name("blobs", stored.digest))
        with pytest.raises(NotFound):
            y.get_bytes(stored.digest)
        with open_store(tmp_path) as shared:
            assert not shared.backend.exists(object_name("blobs", stored.digest))
        assert x.local_root is not None and x.local_root.is_relative_to(tmp_path)
