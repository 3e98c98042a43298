"""What crashed memoplane processes leave behind (temp dirs, cgroups), found and removed.

A process that dies without running its `finally` (SIGKILL, OOM, a power cut) leaves its
job directories under the temp dir and its sandbox cgroups behind. Every such entry names
its owner, so a later process can tell whether the owner is gone:

- temp dirs:  memoplane-<kind>-<pid>-<start>-<random>  (kind: job, gmem), made with
  `temp_prefix(kind)`; <start> is the owner's start time (clock ticks after boot,
  /proc/<pid>/stat field 22), so a reused pid is not taken for the owner.
- cgroups:    memoplane-<pid>-<hex> under each writable hierarchy (memoplane.sandbox.pool),
  its children c<pid>. Only the pid is recorded: such a group is stale only when no
  process has that pid at all (a reused pid keeps it, which errs on the side of keeping).

`stale` decides (pure); `sweep` applies it at agent and embedded start: stale temp dirs
are removed (as the owner's uid only, never through a symlink), stale cgroups are rmdir'ed
children first, which the kernel refuses while a process is in one. Names that do not
match exactly are never touched.

Assumption: processes that share a temp dir share a pid namespace (host processes; one
agent container and its emptyDir /tmp in the chart), so a pid seen here is the pid recorded.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .sandbox import cgroup
from .sandbox.removal import remove_tree

log = logging.getLogger("memoplane.leftovers")

TEMP_KINDS = ("job", "gmem")
_TEMP_NAME = re.compile(rf"memoplane-(?:{'|'.join(TEMP_KINDS)})-([1-9][0-9]*)-([0-9]+)-[a-z0-9_]+")
_CGROUP_NAME = re.compile(r"memoplane-([1-9][0-9]*)-[0-9a-f]+")
_PROC = Path("/proc")


@dataclass(frozen=True)
class Owner:
    pid: int
    start: int | None   # None: only the pid was recorded


# -- naming ----------------------------------------------------------------------------


def start_time(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks after boot; None if there is none."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()   # the command name, in parentheses, may hold spaces
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


_own: tuple[int, int] | None = None   # (pid, start time) of this process, computed once per pid


def temp_prefix(kind: str) -> str:
    """tempfile's `prefix` for a directory owned by this process (kind: one of TEMP_KINDS)."""
    global _own
    assert kind in TEMP_KINDS, kind
    pid = os.getpid()
    if _own is None or _own[0] != pid:   # a forked child is another owner
        _own = (pid, start_time(pid) or 0)
    return f"memoplane-{kind}-{pid}-{_own[1]}-"


def temp_owner(name: str) -> Owner | None:
    m = _TEMP_NAME.fullmatch(name)
    return Owner(int(m.group(1)), int(m.group(2))) if m else None


def cgroup_owner(name: str) -> Owner | None:
    m = _CGROUP_NAME.fullmatch(name)
    return Owner(int(m.group(1)), None) if m else None


# -- the decision (pure) ---------------------------------------------------------------


def stale(names: Iterable[str], owner_of: Callable[[str], Owner | None], running: Mapping[int, int]) -> list[str]:
    """The names that are ours (`owner_of` parses them) and whose owner is gone. `running`:
    pid -> start time of the processes alive now (pids absent from it are not running)."""
    out = []
    for name in names:
        owner = owner_of(name)
        if owner is None:
            continue
        alive = owner.pid in running and owner.start in (None, running[owner.pid])
        if not alive:
            out.append(name)
    return out


def _running(owners: Iterable[Owner]) -> dict[int, int]:
    return {o.pid: t for o in owners if (t := start_time(o.pid)) is not None}


# -- applying it -------------------------------------------------------------------------


def sweep(temp_root: Path | None = None, cgroup_parents: Iterable[Path] | None = None) -> list[Path]:
    """Remove stale temp dirs and stale empty cgroups; return what was removed. Never raises:
    a leftover that cannot go is logged and left."""
    if not (_PROC / "self").exists():   # no /proc: no way to tell who is alive
        log.warning("/proc is not mounted: leftovers of crashed memoplane processes are not swept")
        return []
    root = Path(temp_root or tempfile.gettempdir())
    removed = [p for p in _stale_entries(root, temp_owner) if _try(remove_tree, p)]
    for parent in cgroup_hierarchies() if cgroup_parents is None else cgroup_parents:
        removed += [p for p in _stale_entries(parent, cgroup_owner) if _try(_remove_cgroup, p)]
    if removed:
        log.info("removed %d leftovers of crashed memoplane processes: %s", len(removed),
                 " ".join(str(p) for p in removed))
    return removed


def _stale_entries(parent: Path, owner_of: Callable[[str], Owner | None]) -> list[Path]:
    """Directories (not links) under `parent` owned by our uid whose owner process is gone."""
    try:
        with os.scandir(parent) as it:
            names = [e.name for e in it if owner_of(e.name) and _our_directory(e)]
    except OSError as exc:
        log.debug("cannot list %s: %s", parent, exc)
        return []
    owners = [o for o in map(owner_of, names) if o is not None]
    return [parent / name for name in stale(names, owner_of, _running(owners))]


def _our_directory(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_uid == os.getuid()
    except OSError:   # gone meanwhile
        return False


def _try(remove: Callable[[Path], None], path: Path) -> bool:
    try:
        remove(path)
        return True
    except FileNotFoundError:   # another process is sweeping it too
        return False
    except Exception as exc:  # noqa: BLE001 - cleanup must never stop the process that starts
        log.warning("could not remove the leftover %s: %s", path, exc)
        return False


def cgroup_hierarchies() -> list[Path]:
    """Where memoplane.sandbox.cgroup.detect makes a pool's groups."""
    if (cgroup.ROOT / "cgroup.controllers").exists():   # v2: one hierarchy
        return [cgroup.ROOT]
    return [d for d in (cgroup.ROOT / "memory", cgroup.ROOT / "pids") if d.is_dir()]


def _remove_cgroup(group: Path) -> None:
    """rmdir a pool's group, its children first; the kernel refuses groups with processes."""
    for child in group.iterdir():
        if child.is_dir() and not child.is_symlink():
            os.rmdir(child)
    os.rmdir(group)
