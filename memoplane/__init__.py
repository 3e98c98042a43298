"""memoplane: every computation done once, its result remembered, verified and shared."""

__version__ = "0.1.0"

from .sdk import Memoized, memoize

__all__ = ["memoize", "Memoized", "__version__"]
