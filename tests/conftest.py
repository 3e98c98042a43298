"""Suite-wide rule: a test that would skip fails instead.

memoplane's tests run against real components (DESIGN.md §8); a skip would hide a
component that could not start, so CI must never pass by skipping."""

from __future__ import annotations

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.longrepr = f"skipped tests fail in memoplane's suite: {reason}"


@pytest.fixture(autouse=True)
def _own_keys(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test signs with a key of its own (made on first use), never the user's ~/.config one;
    subprocesses inherit it through the environment."""
    monkeypatch.setenv("MEMOPLANE_KEYS_DIR", str(tmp_path_factory.mktemp("keys") / "keys"))
