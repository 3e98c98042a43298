"""What goes into a sandbox and what comes out: the boundary between the
sandbox and everything that calls it (embedded runner, node agent)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

MiB = 1 << 20

# How a Python entrypoint receives a file input: its bytes (a numpy array for .npy), the path of
# the read-only file under $MEMOPLANE_IN, that file opened for binary reading, or the file mapped
# read-only (a numpy array for a .npy file, else an mmap.mmap): no copy in the job's memory, and the
# mapping's size does not count against its memory limit (limits.py). Path, file and mmap let a
# job take an input larger than its memory limit. Commands always get the file.
Delivery = Literal["bytes", "path", "file", "mmap"]
DELIVERIES: tuple[Delivery, ...] = get_args(Delivery)


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 60.0
    memory_bytes: int = 512 * MiB          # address-space / cgroup memory cap
    max_output_bytes: int = 1024 * MiB     # files written under $MEMOPLANE_OUT, plus the return value
    max_log_bytes: int = 16 * MiB          # stdout and stderr each; the rest is cut and reported
    workdir_bytes: int = 256 * MiB         # the size-limited writable work dir
    max_pids: int = 64                     # processes the job may have at once
    cpu_seconds: int | None = None         # RLIMIT_CPU; None = timeout_s rounded up


@dataclass(frozen=True)
class PythonTask:
    source: str
    entrypoint: str = "main"
    inputs: dict[str, Any] = field(default_factory=dict)  # JSON values, passed as keyword args
    filename: str = "<job>"                               # shown in tracebacks
    # Inputs that are files under $MEMOPLANE_IN, passed as keyword args of type
    # bytes (name -> relative path under in_dir), or numpy arrays for .npy files.
    file_inputs: dict[str, str] = field(default_factory=dict)
    # Of those, the ones passed otherwise: name -> "path" (the file's path, a str), "file"
    # (the file opened for binary reading) or "mmap" (mapped read-only). Absent: bytes.
    file_deliveries: dict[str, str] = field(default_factory=dict)
    # Inputs generated in the child from a GMemSeed (the values never travel): name ->
    # {"params": GMemParams JSON, "offset": int, "count": int, "overlay": path under
    # in_dir of the overlay .npy, or None}; passed as numpy arrays.
    seed_inputs: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class CommandTask:
    argv: tuple[str, ...]


@dataclass(frozen=True)
class SandboxRequest:
    task: PythonTask | CommandTask
    in_dir: Path          # prepared by the caller; mounted read-only at $MEMOPLANE_IN
    out_dir: Path         # empty dir created by the caller; the job's outputs are copied here once it ended
    env: dict[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)


FailureReason = Literal[
    "exception",        # user code raised; message + traceback
    "syntax",           # the source did not compile
    "no-entrypoint",    # entrypoint missing or not callable
    "bad-input",        # an input name the entrypoint does not accept
    "unserializable",   # return value is not JSON / bytes / array
    "exit",             # command exited non-zero, or the child exited abnormally
    "signal",           # killed by a signal (not ours)
    "timeout",          # wall-clock timeout
    "memory",           # memory limit
    "output-too-large", # output or return value over max_output_bytes
    "forbidden",        # a seccomp-denied syscall killed the child
    "sandbox",          # the sandbox itself failed (a memoplane bug or host problem)
]


@dataclass(frozen=True)
class Failure:
    reason: FailureReason
    message: str             # one line, names the cause and the fix
    detail: str = ""         # traceback or stderr tail


ValueKind = Literal["json", "bytes", "file", "none"]
# Where a return value of each kind appears among a result's files: a "file"
# value is the array the runner saves there; `memoplane result -o` writes the
# others there, so a job's own output file may not take the name.
VALUE_FILE_NAMES: dict[str, str] = {"json": "return.json", "bytes": "return.bin", "file": "return.npy"}
# A return value too big for the control channel, written to $MEMOPLANE_OUT by the
# job's runner and read (not kept as an output) by the host.
RETURN_FILE = ".memoplane-return"


@dataclass(frozen=True)
class SandboxOutcome:
    ok: bool
    value: Any = None               # JSON value (kind "json"), bytes (kind "bytes")
    value_kind: ValueKind = "none"  # "file": an array saved as out_dir/"return.npy"
    exit_code: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    failure: Failure | None = None
    duration_s: float = 0.0
    # What isolation the child actually had, e.g. {"userns": True, "seccomp": True,
    # "cgroup": False, ...}; recorded with every job so nothing runs unisolated silently.
    isolation: dict[str, bool] = field(default_factory=dict)
