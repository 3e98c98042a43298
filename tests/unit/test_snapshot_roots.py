"""Kept snapshots are GC roots: a kept one's tree, blobs and chunks survive every GC; a dropped
one's go after the grace period (unless a kept one shares them); each team namespace is collected
by `memoplane gc` like a store of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memoplane.cas import Store, namespaces, open_namespace, open_store
from memoplane.cas.digests import object_name
from memoplane.cas.gc import live_chunks
from memoplane.errors import NotFound


def _tree(store: Store, root: Path, files: dict[str, bytes]) -> str:
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    return store.put_tree(root).digest


def _readable(store: Store, digest: str, dest: Path) -> bool:
    try:
        store.materialize(digest, dest)
    except NotFound:
        return False
    return True


def _live_chunks(store: Store) -> set[str]:
    """What GC keeps of the packs (repack.py drops or rewrites the rest)."""
    return live_chunks(store.backend)


def test_a_kept_snapshot_survives_gc_and_a_dropped_one_goes_after_the_grace(tmp_path: Path) -> None:
    with open_store(tmp_path / "store") as store:
        kept = _tree(store, tmp_path / "kept", {"shared.bin": os.urandom(200_000), "a.txt": b"kept"})
        shared = (tmp_path / "kept" / "shared.bin").read_bytes()
        dropped = _tree(store, tmp_path / "dropped", {"shared.bin": shared, "only.bin": os.urandom(300_000)})
        store.keep_snapshot(store.put_tree(tmp_path / "kept"), "sbx-1")
        store.keep_snapshot(store.put_tree(tmp_path / "dropped"), "sbx-2")
        assert [e.tree for e in store.snapshots()] == [kept, dropped]
        only = {c for c, _ in store.blob_manifest(store.get_tree(dropped).entries['only.bin'].digest).chunks}
        assert only <= _live_chunks(store)

        report = store.gc(grace_seconds=0)
        assert report.deleted == 0
        assert _readable(store, kept, tmp_path / "out1") and _readable(store, dropped, tmp_path / "out2")

        assert store.drop_snapshot(dropped) and not store.drop_snapshot(dropped)
        assert store.snapshot(dropped) is None and [e.tree for e in store.snapshots()] == [kept]
        young = store.gc(grace_seconds=3600)   # within the grace period: nothing of it goes yet
        assert young.deleted == 0 and young.kept_young > 0
        assert store.backend.exists(object_name("trees", dropped))

        store.gc(grace_seconds=0)
        assert not store.backend.exists(object_name("trees", dropped))
        assert not _readable(store, dropped, tmp_path / "out3")
        assert not only & _live_chunks(store)   # only.bin's chunks are no longer kept
        assert _readable(store, kept, tmp_path / "out4")   # shared.bin too: the kept one reaches it
        assert (tmp_path / "out4" / "shared.bin").read_bytes() == shared


def test_a_damaged_or_misnamed_snapshot_record_keeps_nothing(tmp_path: Path) -> None:
    with open_store(tmp_path / "store") as store:
        one = _tree(store, tmp_path / "one", {"f": b"one"})
        other = _tree(store, tmp_path / "other", {"f": b"other"})
        entry = store.keep_snapshot(store.put_tree(tmp_path / "one"), "sbx")
        record = store.backend.get(object_name("snapshots", one))
        store.backend.put(object_name("snapshots", other), record)   # names `one`'s tree under `other`
        assert store.snapshot(other) is None and store.snapshots() == [entry]
        store.backend.put(object_name("snapshots", one), record[:-3])
        assert store.snapshot(one) is None and store.snapshots() == []
        store.gc(grace_seconds=0)
        assert not store.backend.exists(object_name("trees", one))
        assert not store.backend.exists(object_name("trees", other))


def test_gc_collects_each_team_namespace_like_a_store(tmp_path: Path) -> None:
    location = tmp_path / "store"
    with open_namespace(location, "team-a") as a, open_namespace(location, "team-b") as b:
        kept = _tree(a, tmp_path / "kept", {"f": b"a keeps this"})
        a.keep_snapshot(a.put_tree(tmp_path / "kept"), "sbx")
        gone = _tree(b, tmp_path / "gone", {"f": b"b drops this"})
        b.keep_snapshot(b.put_tree(tmp_path / "gone"), "sbx")
        assert b.drop_snapshot(gone)
    with open_store(location) as root:
        assert namespaces(root) == ["team-a", "team-b"]
    env = {**os.environ, "MEMOPLANE_STORE": str(location)}
    proc = subprocess.run([sys.executable, "-m", "memoplane.cli", "gc", "--grace", "0", "--json"],
                          capture_output=True, text=True, env=env, timeout=300, check=True)
    out = json.loads(proc.stdout)
    assert set(out["namespaces"]) == {"team-a", "team-b"}
    with open_namespace(location, "team-a") as a, open_namespace(location, "team-b") as b:
        assert a.backend.exists(object_name("trees", kept)) and _readable(a, kept, tmp_path / "a")
        assert not b.backend.exists(object_name("trees", gone))
    text = subprocess.run([sys.executable, "-m", "memoplane.cli", "gc"], capture_output=True, text=True, env=env,
                          timeout=300, check=True).stdout
    assert "namespace team-a:" in text and "namespace team-b:" in text


@pytest.mark.parametrize("digest", ["latest", "b3:" + "0" * 63])
def test_dropping_names_the_bad_digest(tmp_path: Path, digest: str) -> None:
    with open_store(tmp_path) as store, pytest.raises(Exception, match="snapshot"):
        store.drop_snapshot(digest)
