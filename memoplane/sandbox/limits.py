"""Resource limits applied inside the child just before user code runs.

Note on RLIMIT_NPROC: it counts processes per *host* uid, and the kernel
exempts host root from it. Children map root-in-namespace to the agent's own
uid, so when the agent runs as root NPROC does nothing; the pids cgroup is
what stops fork bombs there (see cgroup.py). Both are set; the isolation
dict records which one was effective.
"""

from __future__ import annotations

import math
import resource

from memoplane.sandbox.types import Limits


def vm_size() -> int:
    """Current address-space size of this process, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def apply_rlimits(limits: Limits, as_baseline: int, effective_nproc: bool) -> dict[str, bool]:
    """Lower the limits of this process (and everything it starts).

    RLIMIT_AS counts mappings inherited from the zygote (interpreter, numpy),
    so the job's allowance is added to what is already mapped."""
    cpu = limits.cpu_seconds or math.ceil(limits.timeout_s) + 1
    wanted = {
        resource.RLIMIT_AS: as_baseline + limits.memory_bytes,
        resource.RLIMIT_CPU: cpu,
        resource.RLIMIT_FSIZE: max(limits.max_output_bytes, limits.workdir_bytes),
        resource.RLIMIT_NOFILE: 1024,
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_NPROC: limits.max_pids,
    }
    for which, value in wanted.items():
        _soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))
    return {"rlimit_as": True, "rlimit_cpu": True, "rlimit_fsize": True,
            "rlimit_nofile": True, "rlimit_core": True, "rlimit_nproc": effective_nproc}
