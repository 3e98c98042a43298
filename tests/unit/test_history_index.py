"""The history index: sync and rebuild from a store's run records (late and malformed ones
included), the roots it keeps, pruning, and where its file lives."""

from __future__ import annotations

from pathlib import Path

from fakes import history_record

from memoplane.cas import open_store
from memoplane.history import InputRecord
from memoplane.history.index import HistoryIndex, open_index, prune
from memoplane.settings import history_index_path

S = 1_000_000_000  # ns per second


def _fill(store: object, records: list[object]) -> None:
    for record in records:
        assert store.put_run_record(record.run_id, record.to_json())  # type: ignore[attr-defined]


def test_a_live_index_synced_step_by_step_equals_a_rebuilt_one(tmp_path: Path) -> None:
    up = history_record("ml/up", 10 * S, "b3:r1", code_blob="b3:code1")
    down = history_record("ml/down", 11 * S, "b3:d1",
                          (InputRecord("x", "b3:i", 3, "fromJob", "ml/up", "b3:r1", up.run_id),))
    late = history_record("ml/up", 9 * S, "b3:r0")   # an id older than what was already indexed
    with open_store(tmp_path / "store") as store, HistoryIndex(tmp_path / "live.sqlite") as live, \
            HistoryIndex(tmp_path / "rebuilt.sqlite") as rebuilt:
        _fill(store, [up])
        assert live.sync(store).added == 1
        _fill(store, [down, late])
        store.backend.put("history/runs/r00000000000000000001-deadbeef", b"{not json")
        report = live.sync(store)
        assert (report.added, report.skipped, report.total) == (2, 1, 4)
        assert live.sync(store).added == 0                      # nothing twice
        rebuilt.rebuild(store)
        assert live.table_rows() == rebuilt.table_rows()
        assert [r.run_id for r in live.runs_of("ml/up")] == [late.run_id, up.run_id]
        assert live.record(down.run_id) == down
        store.delete_run_record(late.run_id)                      # pruned by another process
        assert live.sync(store).total == 3 and [r.run_id for r in live.runs_of("ml/up")] == [up.run_id]


def test_roots_are_the_results_and_blobs_records_name_and_pruning_drops_them(tmp_path: Path) -> None:
    old = history_record("a", 10 * S, "b3:old", code_blob="b3:c-old")
    new = history_record("a", 100 * S, "b3:new", runtime_blob="b3:rt-new")
    failed = history_record("a", 101 * S, None, failure="exit 1")
    with open_store(tmp_path / "store") as store, HistoryIndex(":memory:") as index:
        _fill(store, [old, new, failed])
        index.sync(store)
        assert index.roots() == ({"b3:old", "b3:new"}, {"b3:c-old", "b3:rt-new"})
        dropped = prune(store, index, older_than=50, now=101.0)
        assert dropped == [old.run_id]
        assert list(store.run_record_ids()) == [new.run_id, failed.run_id]
        assert index.roots() == ({"b3:new"}, {"b3:rt-new"})
        rebuilt = HistoryIndex(":memory:")
        rebuilt.rebuild(store)
        assert rebuilt.table_rows() == index.table_rows()


def test_the_index_lives_next_to_a_local_store_else_in_the_user_cache(tmp_path: Path) -> None:
    with open_store(tmp_path / "store") as store:
        with open_index(store) as index:
            assert Path(index.path) == tmp_path / "store" / "history-index.sqlite"
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    a = history_index_path(None, "s3://bucket/a", env)
    assert a.parent == tmp_path / "cache" / "memoplane" / "history"
    assert a != history_index_path(None, "s3://bucket/b", env)


def test_an_index_of_another_schema_is_started_afresh(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    with HistoryIndex(path) as index:
        index.add([history_record("a", S, "b3:r")])
        index._db.execute("UPDATE meta SET value = '0' WHERE name = 'schema'")
        index._db.commit()
    with HistoryIndex(path) as index:
        assert index.table_rows()["runs"] == []


def test_a_damaged_index_file_is_started_afresh(tmp_path: Path) -> None:
    record = history_record("a", S, "b3:r")
    with open_store(tmp_path / "store") as store:
        store.put_run_record(record.run_id, record.to_json())
        (tmp_path / "store" / "history-index.sqlite").write_bytes(b"not a database at all" * 100)
        with open_index(store) as index:
            assert [r.run_id for r in index.runs_of("a")] == [record.run_id]
