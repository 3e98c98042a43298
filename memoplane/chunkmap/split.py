"""Content-defined chunks of a table, cut only at record (line) boundaries.

The store's FastCDC chunker (memoplane.cas.chunking) proposes cut points from the content
itself, with a task-sized target (memoplane.settings.CHUNK_TASK_BYTES); each cut then moves
forward to just after the next newline, so a CSV or JSONL row is never split. Both steps
depend only on nearby content, so an edit moves only the cuts around it and the chunks
after it resynchronise: the leaves whose content did not change keep their digests.
"""

from __future__ import annotations

import itertools

from ..cas.chunking import ChunkParams

MIN_TARGET = 1024  # FastCDC's floor for an average size, with min = target/2 and max = 4*target


def chunk_params(target: int) -> ChunkParams:
    target = max(target, MIN_TARGET)
    return ChunkParams(avg_size=target, min_size=target // 2, max_size=target * 4)


def record_chunks(data: bytes, target: int) -> list[tuple[int, int]]:
    """(offset, length) of each chunk, in order, covering `data`; at least one (empty input: one empty chunk).
    Every chunk but the last ends with a newline; input without newlines is one chunk."""
    cuts: list[int] = []
    last = 0
    for c in chunk_params(target).chunker().cut_buf(data):
        end = c.offset + c.length
        if end >= len(data):
            break
        newline = data.find(b"\n", max(end - 1, last))
        if newline < 0 or newline + 1 >= len(data):
            break  # no record ends after this cut: the rest is the last chunk
        if newline + 1 > last:
            last = newline + 1
            cuts.append(last)
    bounds = [0, *cuts, len(data)]
    return [(start, stop - start) for start, stop in itertools.pairwise(bounds)]
