"""memoplane: every computation done once, its result remembered, verified and shared."""

__version__ = "0.1.0"
