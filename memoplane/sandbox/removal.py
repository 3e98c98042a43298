"""Removing a directory tree that a job wrote or a crashed process left: of any depth, with
modes a job may have set (000), never through a symlink, never into another mount.

The pool removes a job's scratch output tree with it; memoplane.leftovers removes stale temp
dirs of crashed processes with it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree(path: Path) -> None:
    """Remove a directory tree of any depth with a bounded stack and bounded open files:
    each pass moves the grandchildren of `path` up into it and removes the emptied children.
    Never follows a symlink below `path`, never enters another mount (a mount inside is
    left, with an error). For trees nobody writes to any more (their owner is gone)."""
    parent_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        top = _open_dir(parent_fd, path.name)
        try:
            _empty(top, _mount_id(top))
        finally:
            os.close(top)
        os.rmdir(path.name, dir_fd=parent_fd)
    finally:
        os.close(parent_fd)


def _open_dir(parent_fd: int, name: str) -> int:
    """Open a directory (never a link) and make sure we may list and empty it: a job may
    chmod its directories to 000, and an agent without CAP_DAC_OVERRIDE is bound by modes."""
    try:
        fd = os.open(name, _OPEN_DIR, dir_fd=parent_fd)
    except PermissionError:
        os.chmod(name, 0o700, dir_fd=parent_fd)
        fd = os.open(name, _OPEN_DIR, dir_fd=parent_fd)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o700 != 0o700:
            os.fchmod(fd, 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _listing(fd: int) -> list[tuple[str, bool]]:
    """(name, is a directory) of each entry; links are not directories."""
    with os.scandir(fd) as it:
        return [(e.name, e.is_dir(follow_symlinks=False)) for e in it]


def _mount_id(fd: int) -> str:
    """The mount an open file is on (bind mounts of one filesystem differ, unlike st_dev)."""
    with open(f"/proc/self/fdinfo/{fd}") as info:
        return next((line.split()[1] for line in info if line.startswith("mnt_id:")), "")


def _empty(top: int, mount: str) -> None:
    hoisted = 0
    while entries := _listing(top):
        for name, is_dir in entries:
            if not is_dir:
                os.unlink(name, dir_fd=top)
                continue
            sub = _open_dir(top, name)
            try:
                if _mount_id(sub) != mount:
                    raise OSError(errno.EXDEV, f"{name} is a mount point inside the tree; left in place")
                hoisted = _hoist(sub, top, hoisted)
            finally:
                os.close(sub)
            os.rmdir(name, dir_fd=top)


def _hoist(sub: int, top: int, counter: int) -> int:
    """Unlink the files of `sub`, move its directories up into `top`; return the counter."""
    for name, is_dir in _listing(sub):
        if not is_dir:
            os.unlink(name, dir_fd=sub)
            continue
        while True:
            counter += 1
            try:
                os.rename(name, f".rm{counter}", src_dir_fd=sub, dst_dir_fd=top)
                break
            except OSError as exc:   # the name is taken in top (all of it goes anyway): try the next
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    raise
    return counter
