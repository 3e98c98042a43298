"""Parsing the user's inputs (CLI `--input NAME=JSON | NAME=@FILE`, `--env K=V`)
into checked values, with errors that name the flag and the fix."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .canonical import check_json_depth, too_deep
from .errors import InputError
from .quantity import parse_quantity  # the CRDs' grammar
from .sandbox.types import DELIVERIES

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# What a job's environment variable may be called, one definition for the CLI, the
# ComputeJob CRD (spec.env) and the job manifest an agent runs. Kubernetes' classic rule
# for container env names (C_IDENTIFIER plus '-' and '.'): never empty, never '=' or NUL
# (execve cannot carry them), no leading digit. MEMOPLANE_* is reserved for the sandbox.
ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
RESERVED_ENV_PREFIX = "MEMOPLANE_"
ENV_NAME_FIX = "use letters, digits, '_', '-' and '.', not a digit first, and not the MEMOPLANE_ prefix (e.g. MODE)"
ENV_VALUE_FIX = "remove the NUL character (a process environment cannot hold it)"
_ENV_NAME = re.compile(ENV_NAME_PATTERN.removeprefix("^").removesuffix("$"))


def env_name_problem(name: str) -> str | None:
    """Why `name` cannot be an environment variable of a job (None: it can)."""
    if not _ENV_NAME.fullmatch(name):
        return f"{name!r} is not a valid variable name"
    if name.startswith(RESERVED_ENV_PREFIX):
        return f"{name!r} uses the reserved prefix {RESERVED_ENV_PREFIX}"
    return None


def env_problem(name: str, value: str) -> tuple[str, str] | None:
    """(cause, fix) when `name=value` cannot be in a job's environment, else None."""
    problem = env_name_problem(name)
    if problem:
        return problem, ENV_NAME_FIX
    if "\0" in value:
        return f"the value of {name} contains a NUL character", ENV_VALUE_FIX
    return None


@dataclass(frozen=True)
class FileArg:
    """An input given as @FILE: its bytes go into the store by content."""

    path: Path


@dataclass(frozen=True)
class SeedArg:
    """An input given as @seed:NAME:OFFSET:COUNT: a range of a gmem seed in the store,
    generated inside the sandbox (only the seed's parameters and overrides travel)."""

    name: str
    offset: int
    count: int


SEED_PREFIX = "@seed:"


def _seed_arg(name: str, raw: str) -> SeedArg:
    seed, _, rest = raw[len(SEED_PREFIX):].partition(":")
    offset, _, count = rest.partition(":")
    try:
        arg = SeedArg(seed, int(offset, 0), int(count, 0))
    except ValueError:
        arg = None
    if arg is None or not seed or arg.offset < 0 or arg.count < 1:
        raise InputError(f"--input {name}: {raw!r} is not @seed:NAME:OFFSET:COUNT",
                         f"write e.g. --input {name}=@seed:field:0:1000")
    return arg


def check_input_name(name: str, flag: str = "--input") -> str:
    if not _NAME.fullmatch(name):
        raise InputError(
            f"{flag} {name!r}: an input name must be a Python identifier",
            "use letters, digits and _ (e.g. rows, scale_2)",
        )
    return name


def parse_input(text: str) -> tuple[str, Any | FileArg | SeedArg]:
    """`rows=[1,2,3]` -> ("rows", [1, 2, 3]); `raw=@data.csv` -> ("raw", FileArg);
    `noise=@seed:field:0:1000` -> ("noise", SeedArg)."""
    name, sep, raw = text.partition("=")
    if not sep:
        raise InputError(f"--input {text!r} has no '='", "write NAME=JSON or NAME=@FILE, e.g. --input rows=[1,2,3]")
    check_input_name(name)
    if raw.startswith(SEED_PREFIX):
        return name, _seed_arg(name, raw)
    if raw.startswith("@"):
        path = Path(raw[1:]).expanduser()
        if not path.is_file():
            raise InputError(f"--input {name}: file {raw[1:]!r} does not exist", "check the path after '@'")
        return name, FileArg(path)
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"--input {name}: {raw!r} is not JSON ({exc.msg})",
            f"quote strings as JSON, e.g. --input '{name}=\"{raw}\"', or pass a file with {name}=@PATH",
        ) from None
    except RecursionError:  # too deep for the decoder itself, let alone the cap
        raise too_deep(f"--input {name}") from None
    check_json_depth(value, f"--input {name}")
    return name, value


def _reject_constant(token: str) -> Any:
    raise InputError(f"--input: {token} is not a JSON number", "use a finite number or null")


def parse_inputs(texts: list[str]) -> dict[str, Any | FileArg]:
    found: dict[str, Any | FileArg] = {}
    for text in texts:
        name, value = parse_input(text)
        if name in found:
            raise InputError(f"--input {name} is given twice", "give each input once")
        found[name] = value
    return found


def parse_deliveries(texts: list[str], inputs: dict[str, Any | FileArg]) -> dict[str, str]:
    """`--as NAME=bytes|path|file|mmap` for @FILE inputs: name -> delivery."""
    found: dict[str, str] = {}
    for text in texts:
        name, sep, how = text.partition("=")
        if not sep or how not in DELIVERIES:
            raise InputError(f"--as {text!r} is not NAME={'|'.join(DELIVERIES)}", "write e.g. --as table=path")
        if name in found:
            raise InputError(f"--as {name} is given twice", "give each input's delivery once")
        if not isinstance(inputs.get(name), FileArg):
            raise InputError(f"--as {name}: there is no file input {name!r}",
                             f"give the file with --input {name}=@FILE, or remove --as {name}")
        found[name] = how
    return found


def parse_env(texts: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for text in texts:
        name, sep, value = text.partition("=")
        if not sep or not name:
            raise InputError(f"--env {text!r} has no NAME=", "write --env NAME=VALUE")
        problem = env_problem(name, value)
        if problem:
            raise InputError(f"--env {problem[0]}", problem[1])
        env[name] = value
    return env


def parse_bytes(text: str, field: str) -> int:
    """A Kubernetes byte quantity (512Mi, 1Gi, 1000000), as the CRDs accept it."""
    try:
        return int(parse_quantity(text.strip()))
    except ValueError:
        raise InputError(f"{field}: {text!r} is not a byte quantity", "write e.g. 512Mi, 2Gi or a number of bytes") from None
