"""User-facing errors: every one names the cause and the fix in one line.

The CLI prints `str(error)` and exits with `error.exit_code`; nothing below the
CLI prints tracebacks for these.
"""

from __future__ import annotations


class MemoplaneError(Exception):
    """An error a user can act on: `cause` says what happened, `fix` what to do."""

    exit_code = 2

    def __init__(self, cause: str, fix: str = "") -> None:
        self.cause = cause
        self.fix = fix
        super().__init__(f"{cause} — {fix}" if fix else cause)


class InputError(MemoplaneError):
    """Bad input from the user: a missing file, an unknown input name, bad JSON."""


class JobFailed(MemoplaneError):
    """The user's code failed (exception, timeout, memory limit, output too large)."""

    exit_code = 1


class StoreCorrupted(MemoplaneError):
    """Stored data did not match its address; it was quarantined and never served."""

    exit_code = 3


class NotFound(MemoplaneError):
    """A key, digest or object is not in the store."""

    exit_code = 4


class IsolationUnavailable(MemoplaneError):
    """The host lacks a sandbox primitive and the caller did not allow running without it."""

    exit_code = 5


class Untrusted(MemoplaneError):
    """A stored result no key the reader trusts vouches for: never served, recomputed when a job asks."""

    exit_code = 7  # 6 is ClusterUnavailable (commands.kube)
