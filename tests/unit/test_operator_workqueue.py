"""The operator's work queue: keyed lanes that de-duplicate, defer busy keys, and one worker."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest
from memoplane_operator.workqueue import Lane, WorkQueue


def test_a_key_put_again_keeps_its_place_with_the_newest_value() -> None:
    lane = Lane("job")
    lane.put("a", 1)
    lane.put("b", 2)
    lane.put("a", 3)
    assert lane.take() == ("a", 3) and lane.take() == ("b", 2) and lane.take() is None


def test_superseded_values_are_skipped() -> None:
    lane = Lane("job", accept=lambda v: v != "stale")
    lane.put("a", "stale")
    lane.put("b", "fresh")
    assert lane.take() == ("b", "fresh") and lane.take() is None


def test_a_busy_key_is_deferred_until_released() -> None:
    lane = Lane("job")
    lane.hold("a")
    lane.put("a", "event")
    assert lane.queued("a") and lane.take() is None
    lane.release("a", "result", requeue=False)    # what arrived meanwhile wins over the result
    assert lane.take() == ("a", "event")
    lane.hold("a")
    lane.release("a", "result", requeue=False)    # nothing arrived, nothing to do
    assert lane.take() is None and not lane.queued("a")
    lane.hold("a")
    lane.release("a", "result", requeue=True)
    assert lane.take() == ("a", "result")


def test_forget_drops_what_was_deferred_and_remove_keeps_it() -> None:
    lane = Lane("job")
    lane.hold("a")
    lane.put("a", "event")
    lane.take()
    lane.remove("a")
    lane.release("a", None, requeue=False)
    assert lane.take() == ("a", "event")
    lane.hold("a")
    lane.put("a", "event")
    lane.take()
    lane.forget("a")
    lane.release("a", None, requeue=False)
    assert lane.take() is None


def test_the_worker_resyncs_drains_lanes_in_order_and_survives_errors(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[Any] = []
    done = threading.Event()

    def handle(lane: str, key: Any, value: Any) -> None:
        seen.append((lane, key))
        if key == ("ns", "bad"):
            raise RuntimeError("boom")
        if len(seen) == 3:
            done.set()

    work = WorkQueue("test", [Lane("first"), Lane("second")], 3600.0, 60.0, logging.getLogger("test.workqueue"))
    assert not work.live()
    with work.cond:  # queued before the worker starts: the resync comes first, then lanes in order
        work.lanes["second"].put(("ns", "b"))
        work.lanes["first"].put(("ns", "bad"))
        work.lanes["first"].put(("ns", "a"))
    resyncs: list[float] = []
    before = work.healthy_at
    work.start(handle, lambda: resyncs.append(time.monotonic()))
    try:
        assert done.wait(5)
        assert len(resyncs) == 1
        assert seen == [("first", ("ns", "bad")), ("first", ("ns", "a")), ("second", ("ns", "b"))]
        assert work.live() and work.healthy_at > before
        assert "first ns/bad failed" in caplog.text
    finally:
        work.stop()
    assert not work.live()
