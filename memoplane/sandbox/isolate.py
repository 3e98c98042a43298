"""Namespaces, the mount view and the privilege drop of a sandbox child.

Linux only. Python 3.11 has no os.unshare/os.mount, so these go through libc
with ctypes. Every step raises OSError with the failing call named, so the
caller can record *why* a primitive is missing instead of running unisolated.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import sysconfig
from dataclasses import dataclass

from memoplane.tree_limits import MAX_TREE_ENTRIES

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACES = {"userns": CLONE_NEWUSER, "mountns": CLONE_NEWNS, "pidns": CLONE_NEWPID,
              "ipcns": CLONE_NEWIPC, "utsns": CLONE_NEWUTS, "netns": CLONE_NEWNET}

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 1, 2, 4
MOUNT_ATTR_IDMAP = 0x00100000
AT_RECURSIVE = 0x8000
PIDFD_GET_USER_NAMESPACE = 0xFF09  # _IO(PIDFS_IOCTL_MAGIC, 9), Linux 6.11

PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_SECUREBITS = 1, 24, 28
PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 47, 4
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
# NOROOT: uid 0 gains no capabilities on execve; *_LOCKED: nobody can undo it.
SECUREBITS_LOCKED = 0b1011_1111

_COMMON = {"openat2": 437, "mount_setattr": 442, "open_tree": 428, "move_mount": 429, "fsopen": 430,
           "fsconfig": 431, "fsmount": 432, "landlock_create_ruleset": 444,
           "landlock_restrict_self": 446}
_SYSCALLS = {  # number of each raw syscall that glibc does not wrap
    "x86_64": {"pivot_root": 155, "capset": 126, **_COMMON},
    "aarch64": {"pivot_root": 41, "capset": 91, **_COMMON},
}
FSOPEN_CLOEXEC, FSCONFIG_CMD_CREATE, FSMOUNT_CLOEXEC, MOUNT_ATTR_NOEXEC = 1, 6, 1, 8
# Landlock (ABI 6, Linux 6.12): no connecting to abstract unix sockets, and no
# signals, outside the job's own domain.
LANDLOCK_SCOPE = 0x1 | 0x2
OPEN_TREE_CLONE, AT_EMPTY_PATH, MOVE_MOUNT_F_EMPTY_PATH = 1, 0x1000, 4
DEFAULT_WORK_BYTES = 256 << 20
DEFAULT_OUT_BYTES = 1024 << 20  # Limits.max_output_bytes's default: /out of a warm child
# The host uid/gid that root of every job's user namespace maps to when the
# agent runs as root. Nothing else on a host should have it: it is above
# useradd's user and subordinate-id ranges (SUB_UID_MAX 600100000) and
# systemd's container ranges (up to 1879048191), below systemd's foreign-id
# ranges (from 2147352576). So a job owns no host file and no host process.
JOB_HOST_ID = 2_000_000_000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                        ctypes.c_ulong, ctypes.c_char_p]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong, ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long


def _check(ret: int, what: str) -> None:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


_TABLE = _SYSCALLS.get(platform.machine())  # looked up once, not per call in every child


def _nr(name: str) -> int:
    if _TABLE is None:
        raise OSError(38, f"{name}: unsupported architecture {platform.machine()}")
    return _TABLE[name]


def _b(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), f"unshare({flags:#x})")


def fork_lean() -> int:
    """glibc's fork(), without CPython's after-fork work in the child.

    os.fork() re-initialises interpreter locks, signal state and threading
    and runs the at-fork callbacks in the child: ~200 copy-on-write page
    faults, about 0.8 MiB of private memory and half a millisecond per
    child. In a single-threaded parent that holds no lock at the call none
    of that is needed, except that `random` is not reseeded: the child must
    do it (runner.reseed). glibc still does its own part (cached tid,
    robust lists, malloc locks). Never call this with other threads running."""
    pid = int(_libc.fork())
    if pid < 0:
        raise OSError(ctypes.get_errno(), "fork")
    return pid


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), f"setns({nstype:#x})")


def _sys(name: str, *args: object) -> int:
    return int(_libc.syscall(ctypes.c_long(_nr(name)), *args))


def detached_proc() -> int:
    """A new proc instance for the caller's pid namespace, not attached anywhere.

    Made while the caller is still privileged on the host's terms, so none of
    the rules for mounting proc inside a user namespace apply; the child
    attaches it later like /in and /out."""
    fs = _sys("fsopen", b"proc", ctypes.c_uint(FSOPEN_CLOEXEC))
    _check(fs, "fsopen(proc)")
    try:
        _check(_sys("fsconfig", ctypes.c_int(fs), ctypes.c_uint(FSCONFIG_CMD_CREATE), None, None,
                    ctypes.c_int(0)), "fsconfig(proc)")
        attrs = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC
        fd = _sys("fsmount", ctypes.c_int(fs), ctypes.c_uint(FSMOUNT_CLOEXEC), ctypes.c_uint(attrs))
        _check(fd, "fsmount(proc)")
        return fd
    finally:
        os.close(fs)


class _LandlockAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


def landlock_scope() -> None:
    """Confine abstract unix sockets and signals to this process and its children.

    Jobs share one network namespace, hence one abstract socket namespace;
    this is what keeps one job from connecting to another's. Needs no_new_privs."""
    attr = _LandlockAttr(0, 0, LANDLOCK_SCOPE)
    fd = _sys("landlock_create_ruleset", ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
              ctypes.c_uint(0))
    _check(fd, "landlock_create_ruleset")
    try:
        _check(_sys("landlock_restrict_self", ctypes.c_int(fd), ctypes.c_uint(0)),
               "landlock_restrict_self")
    finally:
        os.close(fd)


def mount(src: str | None, dst: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    ret = _libc.mount(_b(src), _b(dst), _b(fstype), flags, _b(data))
    _check(ret, f"mount({src} -> {dst})")


def umount_detach(path: str) -> None:
    _check(_libc.umount2(_b(path), ctypes.c_int(MNT_DETACH)), f"umount2({path})")


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    _check(_libc.prctl(option, arg2, arg3, 0, 0), f"prctl({option})")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _setattr(dirfd: int, path: bytes, flags: int, attrs: int, userns_fd: int = 0) -> int:
    attr = _MountAttr(attrs, 0, 0, userns_fd)
    return int(_libc.syscall(ctypes.c_long(_nr("mount_setattr")), ctypes.c_int(dirfd), path,
                             ctypes.c_uint(flags | AT_RECURSIVE), ctypes.byref(attr),
                             ctypes.c_size_t(ctypes.sizeof(attr))))


def make_readonly(path: str) -> None:
    """Read-only, nosuid, nodev on `path` and every mount below it."""
    ret = _setattr(-100, os.fsencode(path), 0,
                   MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
    if ret < 0:  # kernels before 5.12: remount the top mount only
        mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def detached_tree(path: str, readonly: bool, userns_fd: int | None = None) -> int:
    """A detached copy of the mounts at `path`, as an fd a child can attach.

    Needs CAP_SYS_ADMIN where the caller lives (an agent running as root).
    This is how a child that already left the host tree receives its
    per-request /in and /out: no path lookup in the child, no unmount of
    the host tree on the request path.

    With `userns_fd` the copy is idmapped through that user namespace: files
    owned by host root (the agent) appear owned by the namespace's root, so an
    unprivileged job can read its inputs and write its outputs without the
    agent changing any owner or mode on the host; what the job writes lands
    on disk owned by the agent, as if the agent had written it."""
    fd = int(_libc.syscall(ctypes.c_long(_nr("open_tree")), ctypes.c_int(-100), _b(path),
                           ctypes.c_uint(OPEN_TREE_CLONE | os.O_CLOEXEC | AT_RECURSIVE)))
    _check(fd, f"open_tree({path})")
    attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | (MOUNT_ATTR_RDONLY if readonly else 0)
    if userns_fd is not None:
        attrs |= MOUNT_ATTR_IDMAP
    if _setattr(fd, b"", AT_EMPTY_PATH, attrs, userns_fd or 0) < 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, f"mount_setattr({path}): {os.strerror(err)}")
    return fd


def attach_tree(fd: int, dst: str) -> None:
    ret = _libc.syscall(ctypes.c_long(_nr("move_mount")), ctypes.c_int(fd), b"",
                        ctypes.c_int(-100), _b(dst), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH))
    _check(int(ret), f"move_mount(-> {dst})")


def write_id_maps(proc_fd: int, pid: int, uid: int, gid: int) -> None:
    """From the parent namespace: map root of `pid`'s new user namespace to
    the single host id `uid`/`gid` (nothing else of the host is mapped).

    A root parent may map any host id; an unprivileged one only its own.
    `proc_fd` is the host /proc, opened before the caller left the host tree."""
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"),
                       ("gid_map", f"0 {gid} 1")):
        fd = os.open(f"{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC, dir_fd=proc_fd)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)


def become_namespace_root() -> None:
    """After the parent wrote our maps: take the mapped ids (until now we are
    still host root, unmapped in here). Capabilities in the new namespace are
    kept: the kernel only clears them when leaving the namespace's root id."""
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def pidfd_userns(pidfd: int, pid: int) -> int:
    """An fd for the user namespace of the process behind `pidfd`."""
    import fcntl
    try:
        return fcntl.ioctl(pidfd, PIDFD_GET_USER_NAMESPACE)
    except OSError:  # before Linux 6.11; the caller holds the pidfd, so `pid` is not reused
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)


RESOLVE_NO_XDEV, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH = 1, 2, 4, 8
_CONFINED = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_openat2_missing = False


def open_beneath(dir_fd: int, rel: str, flags: int, mode: int = 0) -> int:
    """Open `rel` strictly below `dir_fd`: no symlink (anywhere on the path),
    no magic link, no "..", no other mount. openat2(2) (Linux 5.6); before it,
    one O_NOFOLLOW component at a time, which refuses the same links."""
    global _openat2_missing
    flags |= os.O_CLOEXEC | os.O_NOFOLLOW
    if not _openat2_missing:
        how = _OpenHow(flags, mode, _CONFINED)
        fd = _sys("openat2", ctypes.c_int(dir_fd), os.fsencode(rel), ctypes.byref(how),
                  ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != 38:  # ENOSYS
            raise OSError(err, f"{os.strerror(err)}: {rel!r}")
        _openat2_missing = True
    return _open_stepwise(dir_fd, rel, flags, mode)


def _open_stepwise(dir_fd: int, rel: str, flags: int, mode: int) -> int:
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise OSError(18, f"path leaves its directory: {rel!r}")  # EXDEV, as openat2 says
    fd = dir_fd
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            if fd != dir_fd:
                os.close(fd)
            fd = nxt
        return os.open(parts[-1], flags, mode, dir_fd=fd)
    finally:
        if fd != dir_fd:
            os.close(fd)


@dataclass(frozen=True)
class Bind:
    src: str      # host path
    dst: str      # absolute path inside the sandbox
    is_dir: bool


ETC_ALLOWED = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "passwd", "group",
               "nsswitch.conf", "localtime", "hosts", "ssl", "ca-certificates",
               "alternatives", "mime.types", "os-release")
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
DEVICES = ("null", "zero", "full", "random", "urandom")


def runtime_paths(extra: tuple[str, ...] = ()) -> list[str]:
    """Host directories a Python job needs: interpreter, stdlib, site-packages."""
    cands = [sys.base_prefix, sys.prefix, sys.exec_prefix,
             *(sysconfig.get_paths().get(k, "") for k in ("stdlib", "purelib", "platlib")),
             *extra]
    out: list[str] = []
    for p in sorted({os.path.realpath(c) for c in cands if c and os.path.isdir(c)}):
        if p != "/" and not any(p.startswith(q + "/") for q in out):
            out.append(p)
    return out


def view_binds(extra: tuple[str, ...] = ()) -> tuple[list[Bind], dict[str, str]]:
    """The read-only view: binds, and symlinks (merged /usr) to recreate."""
    binds: list[Bind] = []
    links: dict[str, str] = {}
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            links[d] = os.readlink(d)
        elif os.path.isdir(d):
            binds.append(Bind(d, d, True))
    for name in ETC_ALLOWED:
        p = "/etc/" + name
        if os.path.exists(p):
            binds.append(Bind(os.path.realpath(p), p, os.path.isdir(p)))
    covered = [b.dst for b in binds if b.is_dir]
    for p in runtime_paths(extra):
        if not any(p == c or p.startswith(c + "/") for c in covered):
            binds.append(Bind(p, p, True))
    return binds, links


def hidden_by_work(binds: list[Bind]) -> list[Bind]:
    """Directories of the view inside /tmp (a virtualenv made there): a job's
    own /tmp would hide them, so they are laid over it again, read-only, at
    the same paths."""
    return [b for b in binds if b.is_dir and b.dst.startswith("/tmp/")]


def _mountpoint(root: str, dst: str, is_dir: bool) -> str:
    target = root + dst
    if is_dir:
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    return target


def build_root(root: str, binds: list[Bind], links: dict[str, str], early_pivot: bool) -> None:
    """Populate a tmpfs at `root` with read-only binds, /dev and a fresh /proc.

    Runs in the child's own mount namespace as root of its user namespace;
    nothing here is visible to the host. With `early_pivot` the child also
    enters the view now and later receives /in and /out as detached mounts
    (`attach_request`); otherwise `enter_root` binds them by path and pivots
    at request time. Either way /tmp is mounted here, with the runtime
    directories inside it laid over it, and only resized per request."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for dst, target in links.items():
        os.symlink(target, root + dst)
    over_work = hidden_by_work(binds)
    for b in binds:
        if b not in over_work:
            _bind_readonly(root, b)
    _build_dev(root)
    for d in ("in", "out", "tmp", "proc"):
        os.makedirs(f"{root}/{d}", exist_ok=True)
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
    mount(None, root, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    _mount_work(root, DEFAULT_WORK_BYTES)
    for b in over_work:
        _bind_readonly(root, b)
    if early_pivot:
        pivot_into(root)


def _bind_readonly(root: str, b: Bind) -> None:
    t = _mountpoint(root, b.dst, b.is_dir)
    mount(b.src, t, None, MS_BIND | MS_REC)
    make_readonly(t)


def _mount_work(root: str, size: int) -> None:
    mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
          f"size={max(size, 4096)},mode=1777")


def _resize_work(path: str, size: int) -> None:
    """Give the /tmp mounted in the warm phase the request's size."""
    if size != DEFAULT_WORK_BYTES:
        mount(None, path, None, MS_REMOUNT | MS_NOSUID | MS_NODEV, f"size={max(size, 4096)}")


def pivot_into(root: str) -> None:
    os.chdir(root)
    # pivot_root(".", ".") stacks the old root on top; detaching it leaves
    # no path back to the host tree (see pivot_root(2)).
    _check(_libc.syscall(ctypes.c_long(_nr("pivot_root")), b".", b"."), "pivot_root")
    umount_detach(".")
    os.chdir("/")


def attach_request(in_fd: int, work_bytes: int, out_bytes: int) -> None:
    """Request time, after an early pivot: attach /in, size /tmp and /out."""
    attach_tree(in_fd, "/in")
    size_request_tmpfs(work_bytes, out_bytes)


def size_request_tmpfs(work_bytes: int, out_bytes: int) -> None:
    """Resize /tmp and /out to the request's limits, when they differ from
    the sizes a warm child mounted them with (both are still empty)."""
    _resize_work("/tmp", work_bytes)
    resize_out(out_bytes)


def resize_out(out_bytes: int) -> None:
    if out_bytes != DEFAULT_OUT_BYTES:
        mount(None, "/out", None, MS_REMOUNT | MS_NOSUID | MS_NODEV, f"size={_out_size(out_bytes)}")


def _out_size(out_bytes: int) -> int:
    # tmpfs rounds to pages and needs room for the return-value file and
    # directory entries; the cap itself is enforced again by the collector.
    return max(out_bytes, 4096) + (64 << 10)


def mount_out(path: str) -> int:
    """Mount the job's /out: a size-limited tmpfs in the child's own mount
    namespace, never a host directory. Returns an O_RDONLY directory fd on it
    for the pool, which reads the outputs through it after every process of
    the job is gone (the mount outlives the namespace while the fd is open),
    so nothing the job does reaches the host's disk or makes the host follow
    a path the job controls."""
    # nr_inodes caps the entries a job can leave (the collector refuses more anyway)
    # before a huge directory costs the host memory to list.
    mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV,
          f"size={_out_size(DEFAULT_OUT_BYTES)},nr_inodes={MAX_TREE_ENTRIES + 16},mode=755")
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _build_dev(root: str) -> None:
    os.makedirs(root + "/dev")
    for name in DEVICES:  # bind host nodes: mknod is not allowed in a userns
        mount("/dev/" + name, _mountpoint(root, "/dev/" + name, False), None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
                         ("shm", "/tmp")):
        os.symlink(target, f"{root}/dev/{name}")


def enter_root(root: str, in_dir: str, work_bytes: int) -> None:
    """Per-request mounts by path, then pivot into the view (no early pivot).
    /out is the tmpfs the warm child mounted (mount_out)."""
    _resize_work(root + "/tmp", work_bytes)
    mount(in_dir, root + "/in", None, MS_BIND | MS_REC)
    make_readonly(root + "/in")
    pivot_into(root)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def limit_future_privileges(last: int) -> None:
    """no_new_privs, empty bounding/ambient sets, NOROOT: these only limit what
    an execve could gain, so a warm child sets them before it has work; it
    keeps its capabilities to attach the request's mounts."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    for cap in range(last + 1):
        prctl(PR_CAPBSET_DROP, cap)
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKED)


# Made once (in the zygote): a child building ctypes objects on the request
# path pays for it in copy-on-write faults.
_CAP_HEADER = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
_CAP_NONE = (_CapData * 2)()


def drop_capabilities() -> None:
    _check(_libc.syscall(ctypes.c_long(_nr("capset")), ctypes.byref(_CAP_HEADER),
                         ctypes.byref(_CAP_NONE)), "capset")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


# id(program) -> (program, its buffer, the sock_fprog pointing at it)
_BPF: dict[int, tuple[bytes, ctypes.Array[ctypes.c_char], _SockFprog]] = {}


def prepare_bpf(bpf: bytes) -> None:
    """Build the ctypes form of a program once (in the zygote) for load_bpf."""
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    _BPF[id(bpf)] = (bpf, buf, _SockFprog(len(bpf) // 8, ctypes.addressof(buf)))


def load_bpf(bpf: bytes) -> None:
    """Install a compiled seccomp program (needs no_new_privs already set);
    a second call stacks another filter: both apply."""
    entry = _BPF.get(id(bpf))
    if entry is None or entry[0] is not bpf:
        prepare_bpf(bpf)
        entry = _BPF[id(bpf)]
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER,
                       ctypes.addressof(entry[2]), 0, 0), "seccomp")
