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
  ENOSYS makes libc fall back to clone, whose flags we can check.
"""

from __future__ import annotations

import errno
import tempfile

KILL = (
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr",
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "bpf", "keyctl", "add_key", "request_key",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "swapon", "swapoff", "reboot", "acct", "quotactl", "syslog",
    "open_by_handle_at", "name_to_handle_at", "lookup_dcookie", "iopl", "ioperm",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "vhangup",
    "fanotify_init", "uselib",
)
EPERM = (
    "unshare", "setns", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "userfaultfd", "perf_event_open",
)
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
    with tempfile.TemporaryFile() as tmp:
        f.export_bpf(tmp)
        tmp.seek(0)
        return tmp.read()


def _add(f: object, action: int, name: str) -> None:
    try:
        f.add_rule(action, name)  # type: ignore[attr-defined]
    except (ValueError, RuntimeError, OSError):
        pass  # not a syscall on this architecture (e.g. iopl on aarch64)
