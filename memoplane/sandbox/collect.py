"""Reading a finished job's /out on the host: the only code that touches a job's outputs.

Called by the pool after every process of the job is gone, on a directory fd
of the job's /out (a tmpfs the host never mounted anywhere; see
isolate.mount_out). Nothing can change the tree any more, and still every
name is opened relative to a directory fd, beneath it, refusing symlinks,
magic links and other mounts (isolate.open_beneath), and only regular files
and directories are read. The walk is iterative and capped in depth, entries
and bytes, so a poison tree fails its job with a reason instead of the host.

What is read is copied into a directory the host created (`dest`): files are
created with O_EXCL | O_NOFOLLOW relative to directory fds, so the copy is
plain data owned by the host, and the bytes later hashed are the bytes
checked here.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from dataclasses import dataclass

from memoplane.sandbox.isolate import open_beneath
from memoplane.sandbox.types import (
    RETURN_FILE,
    VALUE_FILE_NAMES,
    Failure,
    Limits,
)
from memoplane.tree_limits import MAX_TREE_DEPTH, MAX_TREE_ENTRIES

_DIR = os.O_RDONLY | os.O_DIRECTORY
_COPY_CHUNK = 8 << 20


class Refused(Exception):
    """The job's outputs break a rule; `failure` says which, for the job's status."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


def _refuse(reason: str, message: str) -> Refused:
    return Refused(Failure(reason, message))  # type: ignore[arg-type]


@dataclass
class _Budget:
    bytes_left: int
    entries_left: int = MAX_TREE_ENTRIES

    def take(self, rel: str, size: int, limits: Limits) -> None:
        self.entries_left -= 1
        if self.entries_left < 0:
            raise _refuse("output-too-large", f"the job left more than {MAX_TREE_ENTRIES} files and "
                          "directories in $MEMOPLANE_OUT — write fewer, larger files (e.g. an archive)")
        self.bytes_left -= size
        if self.bytes_left < 0:
            raise _refuse("output-too-large", f"the job's outputs (at {rel!r}) exceed max_output_bytes="
                          f"{limits.max_output_bytes} — write less or raise the limit")


def read_return_file(out_fd: int, limits: Limits) -> bytes:
    """The return value the job's runner wrote to /out (too big for the channel)."""
    try:
        fd = open_beneath(out_fd, RETURN_FILE, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise _refuse("sandbox", f"the job's return value file is missing or not a plain file ({e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limits.max_output_bytes:
            raise _refuse("output-too-large", f"the return value has {st.st_size} bytes, over "
                          f"max_output_bytes={limits.max_output_bytes} — return less or write files")
        return _read_all(fd, st.st_size)
    finally:
        os.close(fd)


def _read_all(fd: int, size: int) -> bytes:
    chunks, left = [], size
    while left > 0:
        data = os.read(fd, min(left, _COPY_CHUNK))
        if not data:
            break
        chunks.append(data)
        left -= len(data)
    return b"".join(chunks)


def collect(out_fd: int, dest: str, limits: Limits, value_kind: str) -> None:
    """Copy the job's outputs below `out_fd` into the empty host directory `dest`.

    Raises Refused when the tree breaks a rule (the job fails with its reason).
    `value_kind` is the kind of the job's return value: its file name
    (VALUE_FILE_NAMES) is reserved at the top of the tree, so that a result
    never holds two different things under one name."""
    dest_fd = os.open(dest, _DIR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _copy_tree(out_fd, dest_fd, limits, value_kind)
    except BaseException:
        _empty(dest)  # a refused job's outputs never reach the host, not even in part
        raise
    finally:
        os.close(dest_fd)


def _empty(dest: str) -> None:
    for entry in os.scandir(dest):  # our own copy: at most MAX_TREE_DEPTH deep, no links
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            os.unlink(entry.path)


def _copy_tree(out_fd: int, dest_fd: int, limits: Limits, value_kind: str) -> None:
    budget = _Budget(limits.max_output_bytes)
    reserved = VALUE_FILE_NAMES.get(value_kind) if value_kind != "file" else None
    pending: list[tuple[str, int]] = [("", 0)]
    while pending:
        rel, depth = pending.pop()
        for name, is_dir in _copy_dir(out_fd, dest_fd, rel, budget, limits, reserved):
            child = f"{rel}/{name}" if rel else name
            if depth + 1 > MAX_TREE_DEPTH:
                raise _refuse("forbidden", f"the job's outputs nest directories more than "
                              f"{MAX_TREE_DEPTH} levels deep (at {child[:60]!r}...) — flatten the tree")
            if is_dir:
                pending.append((child, depth + 1))
    if value_kind == "file":
        _check_array_file(dest_fd)


def _copy_dir(out_fd: int, dest_fd: int, rel: str, budget: _Budget, limits: Limits,
              reserved: str | None) -> list[tuple[str, bool]]:
    """Copy the files of one directory; create (and return) its subdirectories."""
    src = open_beneath(out_fd, rel or ".", _DIR)
    dst = open_beneath(dest_fd, rel or ".", _DIR)
    found: list[tuple[str, bool]] = []
    try:
        for name in sorted(os.listdir(src)):
            child = f"{rel}/{name}" if rel else name
            _check_name(name, child, top=not rel, reserved=reserved)
            st = os.stat(name, dir_fd=src, follow_symlinks=False)
            if not rel and name == RETURN_FILE:
                if not stat.S_ISREG(st.st_mode):
                    raise _refuse("forbidden", f"the job left {name!r} in $MEMOPLANE_OUT, a name memoplane "
                                  "keeps for return values — rename it")
                continue  # the return value, read by read_return_file; never an output
            if stat.S_ISDIR(st.st_mode):
                budget.take(child, 0, limits)
                os.mkdir(name, 0o755, dir_fd=dst)
                found.append((name, True))
            elif stat.S_ISREG(st.st_mode):
                if st.st_mode & (stat.S_ISUID | stat.S_ISGID):  # never copied; refused as intent
                    raise _refuse("forbidden", f"the job set a set-user/group-id bit on {child!r} in "
                                  "$MEMOPLANE_OUT — write plain files only")
                budget.take(child, st.st_size, limits)
                _copy_file(src, dst, name, child, st, limits)
            else:
                raise _refuse("forbidden", f"the job left {child!r} in $MEMOPLANE_OUT, which is not a regular "
                              f"file or directory ({_kind(st.st_mode)}) — write plain files only")
    finally:
        os.close(src)
        os.close(dst)
    return found


def _check_array_file(dest_fd: int) -> None:
    name = VALUE_FILE_NAMES["file"]
    try:
        st = os.stat(name, dir_fd=dest_fd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is None or not stat.S_ISREG(st.st_mode):
        raise _refuse("sandbox", f"the job returned an array but left no {name} in $MEMOPLANE_OUT")


def _check_name(name: str, rel: str, top: bool, reserved: str | None) -> None:
    try:
        os.fsencode(name).decode("utf-8")
    except UnicodeDecodeError:
        raise _refuse("forbidden", f"the output file name {os.fsencode(rel)[-200:]!r} is not valid UTF-8 — "
                      "name output files in UTF-8") from None
    if top and reserved is not None and name == reserved:
        raise _refuse("forbidden", f"the job wrote {name!r} to $MEMOPLANE_OUT, the name its return value is "
                      "stored under — rename the file, or return None")


def _copy_file(src: int, dst: int, name: str, rel: str, st: os.stat_result, limits: Limits) -> None:
    rfd = open_beneath(src, name, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = 0o755 if st.st_mode & stat.S_IXUSR else 0o644
        wfd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dst)
        try:
            copied = _copy_bytes(rfd, wfd, st.st_size)
        finally:
            os.close(wfd)
    finally:
        os.close(rfd)
    if copied != st.st_size:  # nothing runs any more; a change means a bug, not a race
        raise _refuse("sandbox", f"output {rel!r} changed size while it was collected")


def _copy_bytes(rfd: int, wfd: int, size: int) -> int:
    done = 0
    while done < size:
        try:
            n = os.copy_file_range(rfd, wfd, min(size - done, _COPY_CHUNK))
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            n = os.sendfile(wfd, rfd, None, min(size - done, _COPY_CHUNK))
        if n == 0:
            break
        done += n
    return done


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return "an unknown kind of file"
