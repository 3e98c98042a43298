"""Resource limits applied inside the child just before user code runs.

Note on RLIMIT_NPROC: the kernel counts processes per (user namespace, uid)
and exempts host root. With a root agent jobs run as JOB_HOST_ID, each child
in a user namespace of its own, so NPROC counts one job's processes only.
When jobs run as host root (no user namespace) it does nothing; the pids
cgroup is what stops fork bombs there (see cgroup.py). Both are set; the
isolation dict records which one was effective.
"""

from __future__ import annotations

import math
import os
import resource

from memoplane.sandbox.types import Limits

RESOURCES = (resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_FSIZE,
             resource.RLIMIT_NOFILE, resource.RLIMIT_CORE, resource.RLIMIT_NPROC)


def vm_size(proc_fd: int | None = None) -> int:
    """Current address-space size of this process, in bytes (`proc_fd`: a
    /proc to read it from, for a process that no longer sees one)."""
    fd = os.open("self/statm" if proc_fd is not None else "/proc/self/statm", os.O_RDONLY,
                 dir_fd=proc_fd)
    try:
        return int(os.read(fd, 4096).split()[0]) * resource.getpagesize()
    finally:
        os.close(fd)


def hard_limits() -> dict[int, int]:
    """The hard limits children inherit, read once by the zygote."""
    return {r: resource.getrlimit(r)[1] for r in RESOURCES}


def apply_rlimits(limits: Limits, as_baseline: int, effective_nproc: bool,
                  hard: dict[int, int] | None = None, mapped_bytes: int = 0) -> dict[str, bool]:
    """Lower the limits of this process (and everything it starts).

    RLIMIT_AS counts mappings inherited from the zygote (interpreter, numpy),
    so the job's allowance is added to what is already mapped. It also counts
    file mappings: `mapped_bytes`, the size of the inputs the runner maps
    read-only for the job (as: mmap), is added too. What limits what:
    - RLIMIT_AS (always): zygote baseline + memory_bytes + mapped inputs, so a
      job's own allocations stay under memory_bytes. A job that drops or unmaps
      a mapped input can reuse that address space for its own memory: the
      inputs' size is the most it can gain.
    - the memory cgroup (memory.max, v1 memory.limit_in_bytes; when the host
      lets us write it, as on agents running as root): memory_bytes +
      max_output_bytes (pool.py: /out is a tmpfs charged to it) for everything
      charged to the job. Pages of a mapped input are clean file pages: the
      kernel reclaims them under that limit rather than fail the job.
    `hard`: the inherited hard limits, if known (saves reading them on the request path)."""
    cpu = limits.cpu_seconds or math.ceil(limits.timeout_s) + 1
    wanted = {
        resource.RLIMIT_AS: as_baseline + limits.memory_bytes + mapped_bytes,
        resource.RLIMIT_CPU: cpu,
        resource.RLIMIT_FSIZE: max(limits.max_output_bytes, limits.workdir_bytes),
        resource.RLIMIT_NOFILE: 1024,
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_NPROC: limits.max_pids,
    }
    for which, value in wanted.items():
        cap = hard[which] if hard is not None else resource.getrlimit(which)[1]
        if cap != resource.RLIM_INFINITY:
            value = min(value, cap)
        resource.setrlimit(which, (value, value))
    return {"rlimit_as": True, "rlimit_cpu": True, "rlimit_fsize": True,
            "rlimit_nofile": True, "rlimit_core": True, "rlimit_nproc": effective_nproc}
