"""Bounds on a stored tree (an output directory), which the store enforces.

The store refuses a deeper or bigger tree when storing it and when loading it, so no walk
over a tree is ever unbounded; the sandbox's collector, which makes trees, fails a job whose
outputs break them ("forbidden" / "output-too-large") before the store sees them. They live
in a module of their own, below both, so the sandbox's zygote and jobs do not load the store.
"""

from __future__ import annotations

MAX_TREE_DEPTH = 128        # path components of an entry (a/b/c is 3): directories below $MEMOPLANE_OUT
MAX_TREE_ENTRIES = 100_000  # files, and directories while walking
