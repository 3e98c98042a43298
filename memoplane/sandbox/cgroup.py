"""Per-child cgroups (memory and pids), used when the host lets us write them.

Supports cgroup v1 (separate memory/ and pids/ hierarchies) and v2 (one
unified hierarchy). Each pooled child gets its own group, created before it
receives work and removed after it exits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Layout:
    memory: Path | None     # parent directory for memory groups
    pids: Path | None       # parent directory for pids groups
    v2: bool
    reason: str             # why something is missing, "" when both work


def _try_parent(base: Path, name: str) -> Path | None:
    d = base / name
    try:
        d.mkdir(exist_ok=True)
        return d
    except OSError:
        return None


def detect(name: str) -> Layout:
    """Create `name` under the writable hierarchies; report what is missing."""
    if (ROOT / "cgroup.controllers").exists():  # pure v2
        d = _try_parent(ROOT, name)
        if d is None:
            return Layout(None, None, True, f"{ROOT} is not writable")
        ctrls = (ROOT / "cgroup.subtree_control").read_text()
        try:
            (d / "cgroup.subtree_control").write_text("+memory +pids")
        except OSError:
            pass
        ok = (d / "cgroup.subtree_control").read_text()
        mem = d if "memory" in ok else None
        pids = d if "pids" in ok else None
        reason = "" if mem and pids else f"controllers not delegated ({ctrls.strip()})"
        return Layout(mem, pids, True, reason)
    mem = _try_parent(ROOT / "memory", name) if (ROOT / "memory").is_dir() else None
    pids = _try_parent(ROOT / "pids", name) if (ROOT / "pids").is_dir() else None
    missing = [n for n, d in (("memory", mem), ("pids", pids)) if d is None]
    reason = f"cgroup v1 {'/'.join(missing)} hierarchy missing or not writable" if missing else ""
    return Layout(mem, pids, False, reason)


class Group:
    """The cgroup(s) of one child."""

    def __init__(self, layout: Layout, name: str) -> None:
        self.layout = layout
        self.dirs: dict[str, Path] = {}
        self.applied: dict[str, Any] = {}   # limit values already written
        for kind, parent in (("memory", layout.memory), ("pids", layout.pids)):
            if parent is None:
                continue
            d = parent / name
            try:
                d.mkdir()
                self.dirs[kind] = d
            except OSError:
                pass
        if layout.v2 and "memory" in self.dirs:  # one directory serves both
            self.dirs["pids"] = self.dirs["memory"]

    def add(self, pid: int) -> None:
        for d in set(self.dirs.values()):
            _write(d / "cgroup.procs", str(pid))

    def set_limits(self, memory_bytes: int, max_pids: int,
                   current: dict[str, Any] | None = None) -> dict[str, bool]:
        """Write the limits (skipping values already in place); report what holds."""
        current = current or {}
        mem_file = "memory.max" if self.layout.v2 else "memory.limit_in_bytes"
        out = {}
        for key, kind, name, value in (("cgroup_memory", "memory", mem_file, memory_bytes),
                                       ("cgroup_pids", "pids", "pids.max", max_pids)):
            if current.get(key) == value:
                out[key] = True
                continue
            out[key] = self._write(kind, name, str(value))
            self.applied[key] = value if out[key] else None
        return out

    def _write(self, kind: str, name: str, value: str) -> bool:
        d = self.dirs.get(kind)
        if d is None:
            return False
        try:
            _write(d / name, value)
            return True
        except OSError:
            return False

    def oom_killed(self) -> bool:
        d = self.dirs.get("memory")
        if d is None:
            return False
        name = "memory.events" if self.layout.v2 else "memory.oom_control"
        return _counter(d / name, "oom_kill") > 0

    def pids_exhausted(self) -> bool:
        d = self.dirs.get("pids")
        return d is not None and _counter(d / "pids.events", "max") > 0

    def empty(self) -> bool:
        """No process left in the group (or no group to ask)."""
        for d in set(self.dirs.values()):
            try:
                if (d / "cgroup.procs").read_text().strip():
                    return False
            except OSError:
                pass
        return True

    def remove(self) -> None:
        for d in set(self.dirs.values()):
            try:
                os.rmdir(d)
            except OSError:
                pass


def _write(path: Path, value: str) -> None:
    """One write(2), without a Python file object (the pool does this per child)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _counter(path: Path, key: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            text = os.read(fd, 4096).decode()
        finally:
            os.close(fd)
        for line in text.splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v)
    except (OSError, ValueError):
        pass
    return 0
