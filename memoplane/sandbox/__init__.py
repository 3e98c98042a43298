"""The sandbox: a zygote per runtime profile, a warm pool of isolated children.

    with SandboxPool(profile="python", size=4) as pool:
        outcome = pool.run(SandboxRequest(PythonTask(source, "main", {"x": 1}), in_dir, out_dir))

Every outcome records the isolation its child actually had (`outcome.isolation`).

What a job gets (agent running as root; see child.py for the order of steps):
- its own user, mount, pid, ipc and uts namespaces; an empty network
  namespace (a down loopback only) no other running job is in, made by host
  root so the job cannot configure it, and reused by a later job only once
  every process of this one is gone (zygote.NetnsPool): no job sees another's
  sockets, listeners or abstract names, in /proc/net or otherwise; and
  sockets of three address families only: AF_UNIX, AF_INET and AF_INET6
  (any other family, AF_VSOCK and AF_NETLINK among them, fails with
  EAFNOSUPPORT; see seccomp_filter.py);
- host uid/gid JOB_HOST_ID (isolate.py), no supplementary groups, no
  capabilities, empty bounding and ambient sets, NOROOT securebits locked,
  no_new_privs: inside it is root of a one-id user namespace, on the host an
  id that owns no file and no other process;
- a read-only view (/usr, the Python runtime, a few /etc files, five device
  nodes), its own read-only /proc, a size-limited tmpfs /tmp, /in read-only
  and idmapped (no host owner or mode changes), and /out a tmpfs of its own
  sized to max_output_bytes (writes past it fail with ENOSPC; outputs are
  held in memory, charged to the job's memory cgroup, until collected); a
  runtime that lives under /tmp (a virtualenv made there) stays visible,
  read-only, at its own path on top of the job's /tmp;
- seccomp (mount, ptrace, bpf, keyrings, kexec, modules, namespaces,
  io_uring, userfaultfd, perf_event_open, setting the clock, address
  families...; reading the clock's state with adjtimex is allowed: the kernel
  refuses any change without CAP_SYS_TIME), Landlock scoping of abstract
  unix sockets and signals, rlimits, memory and pids cgroups, a wall-clock
  timeout, caps on logs and outputs; set-id bits and non-regular files in
  outputs are refused.

What the host does with a job (pool.py, collect.py): it takes the first
result message on the job's channel as the end and reads nothing after it;
it kills the job's pid namespace and waits until every process in it is gone
(the kernel reports the namespace's init only then); only then does it read
/out, through a directory fd of the job's tmpfs, every name opened beneath it
with no symlinks, magic links or mount crossings (openat2), iteratively and
capped in depth (MAX_TREE_DEPTH), entries and bytes, copying regular files
into a host directory with O_EXCL | O_NOFOLLOW. Return values are JSON nested
at most MAX_JSON_DEPTH deep. A command job ends when every process it started
has ended. The collector runs as the agent (root): it needs no privilege, but
dropping it per job would cost a fork of the agent; with nothing left alive
and every open confined beneath the job's own tmpfs, there is nothing else
for it to reach.

What a fork sandbox does NOT protect against:
- the kernel is shared: a kernel bug reachable through the allowed system
  calls (the filter is a deny list; most of the kernel's surface is open) is
  an escape, for every namespace at once;
- side channels: timing, caches, speculative execution (Spectre-class),
  Rowhammer, /proc/meminfo, loadavg, CPU and memory pressure all cross the
  boundary; jobs on one node can observe, and slow down, each other;
- memory shared with the zygote: a child starts as a copy of it, so anything
  the zygote holds is readable by every job (why the zygote is exec'd clean
  and never holds credentials), and it learns the zygote's address layout
  (ASLR is the same in every child);
- denial of service below the limits: disk I/O, kernel memory outside the
  cgroup, entropy, and CPU up to the timeout; a node needs memory for each
  running job's memory limit plus its output cap (outputs are in RAM until
  collected);
- what the agent does with outputs afterwards: they are untrusted data;
- the same host uid for every job: RLIMIT_NPROC is per user namespace, but
  any per-uid kernel accounting on the host (e.g. inotify, key quotas) is shared.
Without root (a developer's machine) the view is built per child, jobs run
as the caller's uid, and /in and /out are not idmapped; `outcome.isolation`
says which protections held.
"""

from __future__ import annotations

from memoplane.sandbox.pool import REQUIRED, SandboxPool
from memoplane.sandbox.profiles import PROFILES, Profile
from memoplane.sandbox.types import (
    CommandTask,
    Failure,
    FailureReason,
    Limits,
    PythonTask,
    SandboxOutcome,
    SandboxRequest,
)

__all__ = [
    "PROFILES",
    "REQUIRED",
    "CommandTask",
    "Failure",
    "FailureReason",
    "Limits",
    "Profile",
    "PythonTask",
    "SandboxOutcome",
    "SandboxPool",
    "SandboxRequest",
    "probe_isolation",
    "run_once",
]


def run_once(request: SandboxRequest, profile: str = "python",
             require_isolation: bool = True) -> SandboxOutcome:
    """Start a pool of one, run one job, stop. For scripts and tests; agents keep a pool."""
    with SandboxPool(profile=profile, size=0, require_isolation=require_isolation) as pool:
        return pool.run(request)


def probe_isolation(profile: str = "minimal") -> dict[str, bool | str]:
    """What this host lets a sandbox child have: True, or why not (a string)."""
    with SandboxPool(profile=profile, size=0, require_isolation=False) as pool:
        return dict(pool.isolation)
