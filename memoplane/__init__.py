"""memoplane: every computation done once, its result remembered, verified and shared."""

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .sdk import Memoized, memoize


def __getattr__(name: str) -> Any:
    # The SDK imports the store; `memoplane --help` and the CLI's hit path need neither.
    if name in ("memoize", "Memoized"):
        from . import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'memoplane' has no attribute {name!r}")

__all__ = ["Memoized", "__version__", "memoize"]
