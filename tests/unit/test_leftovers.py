"""Leftovers of crashed processes: which are stale (pure), and a sweep that removes only those."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from memoplane.leftovers import Owner, cgroup_owner, stale, start_time, sweep, temp_owner, temp_prefix
from memoplane.sandbox.removal import remove_tree

# A pid above pid_max: no process can have it, so its leftovers are stale.
GONE = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
ME = os.getpid()


def own_start() -> int:
    started = start_time(ME)
    assert started is not None
    return started


def test_stale_temp_dirs_are_those_whose_owner_is_gone_or_was_replaced() -> None:
    running = {100: 555, 200: 777}
    names = [
        "memoplane-job-100-555-abcd_123",    # owner alive: kept
        "memoplane-gmem-200-777-zz9zz9zz",   # owner alive: kept
        "memoplane-job-100-554-abcd1234",    # pid 100 is another process now: stale
        "memoplane-gmem-300-1-abcd1234",     # owner gone: stale
        "memoplane-job-abcd1234",            # no owner recorded: never ours to judge
        "memoplane-view-300-1-abcd1234",     # not a kind we sweep
        "memoplane-job-300-1-",              # not what tempfile makes
        "memoplane-job-0300-1-abcd1234",
        "memoplane-job-300-1-ab/cd",
        "memoplane-300-7f00",                # a cgroup name
        "memoplane-locks", "other",
    ]
    assert stale(names, temp_owner, running) == ["memoplane-job-100-554-abcd1234", "memoplane-gmem-300-1-abcd1234"]


def test_stale_cgroups_are_those_whose_owner_pid_is_gone() -> None:
    running = {100: 555}
    names = ["memoplane-100-7f0a", "memoplane-300-7f0a", "memoplane-300-xyz", "memoplane-job-300-1-abcd1234",
             "memoplane-300", "system.slice"]
    assert stale(names, cgroup_owner, running) == ["memoplane-300-7f0a"]
    assert cgroup_owner("memoplane-100-7f0a") == Owner(100, None), "a reused pid keeps the group: only the pid is known"


def test_the_temp_prefix_names_this_process(tmp_path: Path) -> None:
    made = Path(tempfile.mkdtemp(prefix=temp_prefix("job"), dir=tmp_path))
    assert temp_owner(made.name) == Owner(ME, own_start())
    assert stale([made.name], temp_owner, {ME: own_start()}) == []


def deep_tree(top: Path, depth: int, outside: Path) -> None:
    """A tree `depth` directories deep with files, links out of it and directories a job chmod'ed to 000."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(depth):
            os.symlink(outside, "out-link", dir_fd=fd)
            if level % 100 == 0:
                os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)
    (top / "locked").mkdir()
    (top / "locked" / "inner").mkdir()
    (top / "locked").chmod(0)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    kept = tmp_path / "outside"
    kept.mkdir()
    (kept / "precious").write_text("not a leftover")
    return kept


def test_sweep_removes_stale_leftovers_and_nothing_else(tmp_path: Path, outside: Path) -> None:
    root, groups = tmp_path / "tmp", tmp_path / "cgroup"
    root.mkdir()
    stale_job = root / f"memoplane-job-{GONE}-1-abcd1234"
    stale_job.mkdir()
    deep_tree(stale_job, 1300, outside)
    stale_gmem = root / f"memoplane-gmem-{GONE}-1-zz_00000"
    (stale_gmem / "ns").mkdir(parents=True)
    replaced = root / f"memoplane-job-{ME}-{own_start() + 1}-abcd1234"
    replaced.mkdir()
    mine = Path(tempfile.mkdtemp(prefix=temp_prefix("job"), dir=root))
    legacy = root / "memoplane-job-abcd1234"
    legacy.mkdir()
    link = root / f"memoplane-job-{GONE}-1-link0000"
    link.symlink_to(outside, target_is_directory=True)
    (root / f"memoplane-job-{GONE}-1-file0000").write_text("a file, not a directory of ours")
    stale_group, live_group = groups / f"memoplane-{GONE}-7f0a", groups / f"memoplane-{ME}-7f0a"
    for group in (stale_group, live_group):
        (group / "c1").mkdir(parents=True)
        (group / "c2").mkdir()

    removed = sweep(root, [groups])

    assert sorted(removed) == sorted([stale_job, stale_gmem, replaced, stale_group])
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [mine.name, legacy.name, link.name, f"memoplane-job-{GONE}-1-file0000"])
    assert [p.name for p in groups.iterdir()] == [live_group.name] and (live_group / "c1").is_dir()
    assert (outside / "precious").read_text() == "not a leftover" and link.is_symlink()
    assert sweep(root, [groups]) == [], "a second sweep finds nothing"


def test_sweep_leaves_directories_of_other_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "tmp"
    (root / f"memoplane-job-{GONE}-1-abcd1234").mkdir(parents=True)
    monkeypatch.setattr(os, "getuid", lambda: os.stat(root).st_uid + 1)
    assert sweep(root, []) == []
    assert (root / f"memoplane-job-{GONE}-1-abcd1234").is_dir()


def test_remove_tree_does_not_follow_a_link_given_as_the_tree(tmp_path: Path, outside: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(OSError):
        remove_tree(link)
    assert (outside / "precious").exists()
