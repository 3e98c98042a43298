"""The seccomp policy of a sandbox child, compiled once by the zygote.

libseccomp (through pyseccomp) compiles the rules to a BPF program; the
zygote keeps the bytes and every child installs them with one prctl, so a
request does not pay for the compilation.

Policy: allow by default, and
- kill the process (reason "forbidden") on calls that only an escape attempt
  or an administrator needs: mount, ptrace, bpf, keyrings, kexec, modules...
- fail with EPERM the calls that ordinary programs probe and cope with:
  nested namespaces, io_uring, userfaultfd, perf_event_open;
- fail clone3 with ENOSYS: its flags live in memory seccomp cannot read, and
  ENOSYS makes libc fall back to clone, whose flags we can check;
- fail socket and socketpair with EAFNOSUPPORT (what the kernel says of a
  family it lacks) for every address family but FAMILIES.

Address families: a job's network namespace has nothing but loopback, so it
needs AF_UNIX, AF_INET and AF_INET6 only. All others are refused, among them
AF_VSOCK (it reaches the hypervisor, CID 2, and its ports are not confined
by the job's network namespace), AF_NETLINK (routing, audit, uevents...:
kernel surface a job has no use for), AF_PACKET, AF_ALG (kernel crypto),
AF_KEY, AF_XDP, Bluetooth, CAN, TIPC and RDS. What notices: glibc's
if_nameindex and getifaddrs, which ask netlink (/proc/net/dev lists the
interfaces instead), and ip(8) or ss(8). getaddrinfo copes: without netlink,
AI_ADDRCONFIG assumes both IPv4 and IPv6 (with it, a job's down loopback made
it find neither); multiprocessing uses pipes and unix sockets.

Allowed on purpose: adjtimex and clock_adjtime. Reading the clock's state
(modes 0) is harmless and some libraries do it; any change needs
CAP_SYS_TIME in the initial user namespace, which a job never has, so the
kernel answers EPERM. Setting the clock outright (settimeofday,
clock_settime) still kills.
"""

from __future__ import annotations

import errno
import socket
import tempfile
from typing import Any

KILL = (
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr",
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "bpf", "keyctl", "add_key", "request_key",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "swapon", "swapoff", "reboot", "acct", "quotactl", "syslog",
    "open_by_handle_at", "name_to_handle_at", "lookup_dcookie", "iopl", "ioperm",
    "settimeofday", "clock_settime", "vhangup",
    "fanotify_init", "uselib",
)
EPERM = (
    "unshare", "setns", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "userfaultfd", "perf_event_open",
)
FAMILIES = (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6)
CLONE_NS_FLAGS = (0x00020000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
                  0x40000000, 0x02000000, 0x00000080)  # NEWNS..NEWNET, NEWCGROUP, NEWTIME


# What a warm child still calls once its request came (attaching /in and
# /out, resizing /tmp). A root zygote's children install the policy in two
# filters: all of it but these while they wait for work, then a small one
# that kills these right before the job runs. Stacked filters both apply
# (the strictest action wins), so the job gets the same policy; loading a
# 10-instruction filter instead of the whole one saves the request ~60 us.
LATE = ("mount", "move_mount")


def compile_bpf(exclude: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> bytes:
    """Build the policy with libseccomp and return the raw BPF program:
    without the calls in `exclude`, or killing just the calls in `only`."""
    import pyseccomp as sc

    f = sc.SyscallFilter(defaction=sc.ALLOW)
    for name in KILL if only is None else only:
        if name not in exclude:
            _add(f, sc.KILL_PROCESS, name)
    if only is None:
        for name in EPERM:
            _add(f, sc.ERRNO(errno.EPERM), name)
        _add(f, sc.ERRNO(errno.ENOSYS), "clone3")
        for flag in CLONE_NS_FLAGS:  # clone(flags, ...): flags is argument 0
            f.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
        _refuse_families(f, sc)
    with tempfile.TemporaryFile() as tmp:
        f.export_bpf(tmp)
        tmp.seek(0)
        return tmp.read()


def _refuse_families(f: Any, sc: Any) -> None:
    """EAFNOSUPPORT from socket and socketpair for every family but FAMILIES.

    libseccomp ANDs the comparisons of one rule but takes one per argument,
    so "none of these" becomes one rule per refused value. The kernel reads
    the family as a 32-bit int: the values below the top allowed one are
    compared on the low half only, and anything above it, including any
    value with a high half, is refused whole."""
    refuse = sc.ERRNO(errno.EAFNOSUPPORT)
    top = max(FAMILIES)
    for call in ("socket", "socketpair"):
        for family in range(top):
            if family not in FAMILIES:
                f.add_rule(refuse, call, sc.Arg(0, sc.MASKED_EQ, 0xFFFF_FFFF, family))
        f.add_rule(refuse, call, sc.Arg(0, sc.GT, top))


def _add(f: object, action: int, name: str) -> None:
    try:
        f.add_rule(action, name)  # type: ignore[attr-defined]
    except (ValueError, RuntimeError, OSError):
        pass  # not a syscall on this architecture (e.g. iopl on aarch64)
