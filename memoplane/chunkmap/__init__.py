"""Map over the content-defined chunks of one large input, combined by a memoized tree.

`split`: record-aligned content-defined chunks (a row is never split). `tree`: a
prolly-tree-shaped combine tree whose group boundaries come from the hash of the child
ids, so an edit or an append changes O(log n) nodes. `plan`: the leaf and combine jobs,
each an ordinary memoized job keyed by its inputs' content, and their evaluation.
"""

from .plan import ChunkMapReport, combine_job, leaf_job, run_over_chunks
from .split import record_chunks
from .tree import Node, build_tree

__all__ = ["ChunkMapReport", "Node", "build_tree", "combine_job", "leaf_job", "record_chunks", "run_over_chunks"]
