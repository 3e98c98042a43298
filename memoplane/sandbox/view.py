"""The read-only view, built once by a root zygote in its own mount namespace.

The zygote unshares a mount namespace, assembles the view on a small tmpfs
(recursive read-only binds of /usr and the Python runtime, copies of a few
/etc files, device nodes) and pivots into it, so its mount
namespace holds nothing but the view. Each child then gets the view with the
one unshare(CLONE_NEWNS) it needs anyway: a copy of about ten mounts instead
of ~30 mount calls per child. The copies are locked (the child's user
namespace is less privileged than the zygote's), so a child cannot unmount a
piece to look underneath, nor make a read-only mount writable.

Per child there are then two mounts: /proc of its own pid namespace (made
while still host root, see isolate.detached_proc) and its /tmp. A runtime
that lives under /tmp (a virtualenv made there) is in the template at its own
path, which the child's /tmp covers: the child clones it first and lays the
read-only copy over its /tmp at the same path (one more mount per such
directory, in the warm phase).
"""

from __future__ import annotations

import os
import stat

from memoplane.sandbox.isolate import (
    CLONE_NEWNS,
    DEVICES,
    MS_BIND,
    MS_NODEV,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    Bind,
    attach_tree,
    detached_tree,
    hidden_by_work,
    mount,
    pivot_into,
    unshare,
)

_DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
              ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"), ("shm", "/tmp"))
# Where the zygote assembles the view: /tmp of its *own* mount namespace,
# shadowed there by a tmpfs, so nothing is created on the host.
_STAGE = "/tmp"
# The view's directories inside /tmp (isolate.hidden_by_work): set by
# build_template in the zygote, inherited by every child.
_over_tmp: tuple[str, ...] = ()


def build_template(binds: list[Bind], links: dict[str, str]) -> None:
    """Run once in the (root) zygote: leave the host tree for the view."""
    global _over_tmp
    _over_tmp = tuple(b.dst for b in hidden_by_work(binds))
    unshare(CLONE_NEWNS)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    # Take everything from the host before the stage shadows /tmp (a source may be there).
    trees = [(b.dst, detached_tree(b.src, readonly=True)) for b in binds if b.is_dir]
    files = [(b.dst, _read(b.src)) for b in binds if not b.is_dir]
    root = _STAGE
    # Not nodev: the device nodes below live here. Nobody can add any: the
    # root becomes read-only and jobs have no CAP_MKNOD.
    mount("tmpfs", root, "tmpfs", MS_NOSUID, "size=16m,mode=755")
    for dst, target in links.items():
        os.symlink(target, root + dst)
    for dst, fd in trees:
        os.makedirs(root + dst, exist_ok=True)
        attach_tree(fd, root + dst)
        os.close(fd)
    for dst, (data, mode) in files:  # copies: one mount less in every child, same content
        os.makedirs(os.path.dirname(root + dst), exist_ok=True)
        with open(root + dst, "wb") as f:
            f.write(data)
        os.chmod(root + dst, mode)
    _make_dev(root)
    for d in ("in", "out", "tmp", "proc"):
        os.makedirs(f"{root}/{d}", exist_ok=True)
    mount(None, root, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)
    pivot_into(root)


def _read(path: str) -> tuple[bytes, int]:
    with open(path, "rb") as f:
        return f.read(), stat.S_IMODE(os.fstat(f.fileno()).st_mode) & 0o755


def _make_dev(root: str) -> None:
    os.makedirs(root + "/dev")
    for name in DEVICES:
        st = os.stat("/dev/" + name)
        os.mknod(f"{root}/dev/{name}", stat.S_IFCHR | 0o666, st.st_rdev)
        os.chmod(f"{root}/dev/{name}", 0o666)
    for name, target in _DEV_LINKS:
        os.symlink(target, f"{root}/dev/{name}")


def enter_child(proc_fd: int | None, work_bytes: int) -> None:
    """Run in a child (pid 1 of its pid namespace, root of its user namespace)
    whose mount namespace is a copy of the template. `proc_fd`: its own /proc,
    made before it entered the user namespace (isolate.detached_proc)."""
    if proc_fd is not None:
        attach_tree(proc_fd, "/proc")
        os.close(proc_fd)
    # Copies of the runtime inside /tmp, taken before our own /tmp hides it. A
    # clone, not a tree the zygote keeps: attaching a detached tree uses it up.
    kept = [(path, detached_tree(path, readonly=True)) for path in _over_tmp]
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={max(work_bytes, 4096)},mode=1777")
    for path, fd in kept:
        os.makedirs(path, exist_ok=True)
        attach_tree(fd, path)
        os.close(fd)
    os.chdir("/tmp")
