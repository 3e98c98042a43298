"""The combine tree's shape, chosen by content like a prolly tree.

Level 0 holds the leaves' ids (their chunks' digests). A group of siblings ends after an
item whose hash (salted with the level) hits 1 in FANOUT, once it holds at least two items,
or when it reaches MAX_FANOUT. Boundaries depend on the items themselves, not on their
positions, so inserting or appending a chunk changes the groups around it and, above them,
one path to the root: O(log n) nodes, not every node to its right. A node's id is a digest
of its level and its children's ids, so equal subtrees have equal ids (and equal jobs).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..keys import digest_bytes

FANOUT = 4        # the expected children per combine node
MAX_FANOUT = 16   # bounds one combine's work where the hash finds no boundary


@dataclass(frozen=True)
class Node:
    id: str
    level: int                       # 0: a leaf
    children: tuple[Node, ...] = ()

    def walk(self) -> Iterator[Node]:
        """Every node below and including this one, children before parents."""
        for child in self.children:
            yield from child.walk()
        yield self


def _ends_group(level: int, item: Node, size: int, fanout: int, max_fanout: int) -> bool:
    if size >= max_fanout:
        return True
    if size < 2:
        return False
    salted = digest_bytes(f"{level}:{item.id}".encode())
    return int(salted[3:19], 16) % fanout == 0


def _group(level: int, items: Sequence[Node], fanout: int, max_fanout: int) -> list[Node]:
    parents: list[Node] = []
    group: list[Node] = []
    for item in items:
        group.append(item)
        if _ends_group(level, item, len(group), fanout, max_fanout):
            parents.append(_parent(level, group))
            group = []
    if group:
        parents.append(_parent(level, group))
    return parents


def _parent(level: int, group: list[Node]) -> Node:
    if len(group) == 1:
        return group[0]  # a lone trailing item rises unchanged: nothing to combine
    ids = "\n".join(child.id for child in group)
    return Node(digest_bytes(f"node:{level + 1}\n{ids}".encode()), level + 1, tuple(group))


def build_tree(leaf_ids: Sequence[str], fanout: int = FANOUT, max_fanout: int = MAX_FANOUT) -> Node:
    """The root over the leaves, in order; one leaf is its own root. Every group but a level's last
    has at least two items, so each level at most halves and the depth is O(log n)."""
    if not leaf_ids:
        raise ValueError("a combine tree needs at least one leaf")
    level, items = 0, [Node(i, 0) for i in leaf_ids]
    while len(items) > 1:
        items = _group(level, items, fanout, max_fanout)
        level += 1
    return items[0]
