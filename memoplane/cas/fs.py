"""The filesystem backend: one file per object under a root directory.

Atomicity: every object is written to a temp file in its final directory and
then published with os.replace, atomic on POSIX, so concurrent writers in
several processes never expose a partial file.

Durability policy (`durability=`):
- "flush" (default): objects are written without fsync; `flush()` (called by the
  store before each ref) fsyncs the files this process wrote since the last
  flush, or, past FSYNC_MAX of them, runs syncfs on the store's filesystem
  (one call instead of thousands of fsyncs; but it also flushes other programs'
  writes, so small results avoid it). Then the ref itself is fsynced with its
  directory. A ref never survives a crash that lost the data it names.
- "always": fsync every object and its directory (slow; for paranoid setups).
- "none": never sync (tests, benchmarks, the node-local cache, which can refill).
Whatever the policy, a torn object after a crash is caught by read verification.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from ..errors import InputError, NotFound
from .backend import ObjectInfo

Durability = Literal["none", "flush", "always"]
TEMP_PREFIX = ".tmp-"
_NAME = re.compile(r"^[A-Za-z0-9_:.%-]+(/[A-Za-z0-9_:.%-]+)*$")
_counter = itertools.count()
FSYNC_MAX = 64  # pending files above which flush() uses syncfs instead


def _libc_syncfs() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


_SYNCFS = _libc_syncfs()


class FilesystemBackend:
    """Objects as files under `root` (created on first write)."""

    def __init__(self, root: str | os.PathLike[str], *, durability: Durability = "flush") -> None:
        if durability not in ("none", "flush", "always"):
            raise InputError(f"durability={durability!r} is not a policy", "use none, flush or always")
        self.root = Path(root).expanduser().absolute()
        self.durability: Durability = durability
        self._dirs: set[Path] = set()
        self._lock = threading.Lock()
        self._pending: list[Path] = []  # written since the last flush ("flush" policy)

    # -- names and temp files -------------------------------------------------

    def _path(self, name: str) -> Path:
        if not _NAME.match(name) or any(p in (".", "..") or p.startswith(TEMP_PREFIX) for p in name.split("/")):
            raise InputError(f"object name {name!r} is not valid", "use slash-separated [A-Za-z0-9_:.%-] parts")
        return self.root / name

    def _ensure_dir(self, d: Path) -> None:
        if d not in self._dirs:
            d.mkdir(parents=True, exist_ok=True)
            self._dirs.add(d)

    def _write_temp(self, path: Path, data: bytes | bytearray | memoryview) -> Path:
        self._ensure_dir(path.parent)
        tmp = path.parent / f"{TEMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{next(_counter)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.durability == "always":
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return tmp

    def _sync_dir(self, d: Path) -> None:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- the Backend protocol -------------------------------------------------

    def put(self, name: str, data: bytes | bytearray) -> None:
        path = self._path(name)
        tmp = self._write_temp(path, data)
        if self.durability == "flush" and name.startswith("refs/"):
            _fsync_path(tmp)
        os.replace(tmp, path)
        if self.durability == "flush" and name.startswith("refs/"):
            self._sync_dir(path.parent)
        else:
            self._written(path)

    def put_if_absent(self, name: str, data: bytes | Callable[[], bytes]) -> bool:
        path = self._path(name)
        if self._touch(path):
            return False
        tmp = self._write_temp(path, data() if callable(data) else data)
        # Names are content addresses, so a racing writer publishes the same bytes:
        # os.replace is safe, and measurably cheaper here than os.link + unlink
        # (file metadata operations dominate first writes on this store's layout).
        os.replace(tmp, path)
        self._written(path)
        return True

    def create(self, name: str, data: bytes) -> bool:
        """Backend.create: os.link of a complete temp file fails if the name exists, atomically
        on POSIX (os.replace would overwrite). Synced like a ref: nothing is written after it."""
        path = self._path(name)
        tmp = self._write_temp(path, data)
        try:
            if self.durability == "flush":
                _fsync_path(tmp)
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        if self.durability != "none":
            self._sync_dir(path.parent)
        return True

    def _written(self, path: Path) -> None:
        if self.durability == "always":
            self._sync_dir(path.parent)
        elif self.durability == "flush":
            with self._lock:
                if len(self._pending) <= FSYNC_MAX:  # beyond it flush() syncs the filesystem anyway
                    self._pending.append(path)

    def _touch(self, path: Path) -> bool:
        """Refresh mtime (see Backend.put_if_absent); False if absent."""
        try:
            os.utime(path)
            return True
        except FileNotFoundError:
            return False

    def get(self, name: str) -> bytes:
        try:
            with open(self._path(name), "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"object {name} is not in the store at {self.root}") from None

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        """Up to `length` bytes of the object from `offset` (fewer at its end); NotFound if absent.
        Packs are read this way (packs.read_range), a chunk at a time."""
        try:
            with open(self._path(name), "rb") as f:
                return os.pread(f.fileno(), length, offset)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"object {name} is not in the store at {self.root}") from None

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root / base if base else self.root
        for entry in _walk(start):
            name = Path(entry.path).relative_to(self.root).as_posix()
            if not name.startswith(prefix):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # deleted while listing
                continue
            yield ObjectInfo(name=name, size=st.st_size, mtime=st.st_mtime)

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        if len(pending) <= FSYNC_MAX:
            for path in pending:
                with contextlib.suppress(FileNotFoundError):  # removed since (gc, quarantine)
                    _fsync_path(path)
            for d in {p.parent for p in pending}:
                self._sync_dir(d)
            return
        if _SYNCFS is None:
            os.sync()
            return
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _SYNCFS(fd) != 0:
                os.sync()
        finally:
            os.close(fd)

    def describe(self) -> str:
        return str(self.root)

    # -- filesystem-only maintenance -----------------------------------------

    def sweep_temp(self, older_than: float) -> int:
        """Remove temp files left by crashed writers; returns how many."""
        removed = 0
        cutoff = time.time() - older_than
        for entry in _walk(self.root, temps=True):
            try:
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _walk(d: Path, *, temps: bool = False) -> Iterator[os.DirEntry[str]]:
    """Regular files under d, depth first; only temp files when temps=True."""
    try:
        it = os.scandir(d)
    except (FileNotFoundError, NotADirectoryError):
        return
    with it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            yield from _walk(Path(e.path), temps=temps)
        elif e.is_file(follow_symlinks=False) and e.name.startswith(TEMP_PREFIX) == temps:
            yield e
