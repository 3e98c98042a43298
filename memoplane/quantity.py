"""Kubernetes resource quantities (512Mi, 1Gi, 500m, 2): one grammar for the CRDs,
the API models and the CLI's flags. Kept free of pydantic so the CLI starts fast."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

QUANTITY_PATTERN = (
    r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_QUANTITY = re.compile(QUANTITY_PATTERN)

_SUFFIXES: dict[str, Decimal] = {
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
    "k": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9), "T": Decimal(10**12),
    "P": Decimal(10**15), "E": Decimal(10**18),
    "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30), "Ti": Decimal(2**40),
    "Pi": Decimal(2**50), "Ei": Decimal(2**60),
}


def _check_quantity(value: Any) -> int | str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        # ValueError, not TypeError: pydantic turns only ValueError into a field-named error.
        message = f"{value!r} is not a quantity: use a number or a string such as 500m, 2, 512Mi, 1Gi"
        raise ValueError(message)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative: a quantity must be >= 0")
        return value
    if not _QUANTITY.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity: write e.g. 500m, 2, 512Mi, 1Gi")
    return value


def parse_quantity(value: int | str) -> Decimal:
    """`"512Mi"` -> 536870912, `"500m"` -> 0.5; raises ValueError on a bad quantity."""
    checked = _check_quantity(value)
    if isinstance(checked, int):
        return Decimal(checked)
    match = re.fullmatch(r"([0-9.]+)(.*)", checked)
    assert match  # the pattern above guarantees a numeric head
    number, suffix = match.groups()
    try:
        if suffix in _SUFFIXES:
            return Decimal(number) * _SUFFIXES[suffix]
        return Decimal(number + suffix)  # decimal exponent: 1e3
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a Kubernetes quantity") from None


