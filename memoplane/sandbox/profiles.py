"""Runtime profiles: what a zygote preloads and the environment it starts with."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Profile:
    name: str
    preload: tuple[str, ...]               # imported once by the zygote; missing ones are skipped
    env: dict[str, str] = field(default_factory=dict)  # zygote (and so job) environment
    extra_paths: tuple[str, ...] = ()      # more host dirs for the read-only view


# One BLAS thread: a forked child cannot reuse a thread pool started in the
# zygote, and jobs are sized by the scheduler, not by BLAS.
_SINGLE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

PROFILES: dict[str, Profile] = {
    "python": Profile("python", ("json", "math", "re", "collections", "itertools",
                                 "functools", "hashlib", "random", "numpy", "numpy.random",
                                 "memoplane.gmem.transfer"), _SINGLE_THREAD),  # fromSeed: generated in the child
    "minimal": Profile("minimal", ("json",)),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown runtime profile {name!r}; known: {sorted(PROFILES)}") from None
