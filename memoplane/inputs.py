"""Parsing the user's inputs (CLI `--input NAME=JSON | NAME=@FILE`, `--env K=V`)
into checked values, with errors that name the flag and the fix."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError
from .quantity import parse_quantity  # the CRDs' grammar

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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
    if not _NAME.match(name):
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
        return name, json.loads(raw, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"--input {name}: {raw!r} is not JSON ({exc.msg})",
            f"quote strings as JSON, e.g. --input '{name}=\"{raw}\"', or pass a file with {name}=@PATH",
        ) from None


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


def parse_env(texts: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for text in texts:
        name, sep, value = text.partition("=")
        if not sep or not name:
            raise InputError(f"--env {text!r} has no NAME=", "write --env NAME=VALUE")
        if name.startswith("MEMOPLANE_"):
            raise InputError(f"--env {name}: MEMOPLANE_* names are reserved", "choose another name")
        env[name] = value
    return env


def parse_bytes(text: str, field: str) -> int:
    """A Kubernetes byte quantity (512Mi, 1Gi, 1000000), as the CRDs accept it."""
    try:
        return int(parse_quantity(text.strip()))
    except ValueError:
        raise InputError(f"{field}: {text!r} is not a byte quantity", "write e.g. 512Mi, 2Gi or a number of bytes") from None
