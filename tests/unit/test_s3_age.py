"""S3Backend's age of an object (what decides a GC-grace refresh) errs towards old, never young."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from memoplane.cas.s3 import DATE_SLACK, S3Backend


@dataclass
class Head:
    last_modified: datetime | None
    metadata: dict[str, str] | None


def test_a_date_that_trails_last_modified_still_reads_as_written_now_or_earlier() -> None:
    # A cached Date header (versitygw refreshes it once a second) can name the second before the write.
    written = datetime(2026, 12, 7, 12, 37, 2, tzinfo=UTC)
    head = Head(written, {"Date": "Mon, 07 Dec 2026 12:37:01 GMT"})
    assert S3Backend._age(head) == DATE_SLACK - 1.0 > 0


def test_age_is_the_servers_date_minus_last_modified_plus_the_slack() -> None:
    head = Head(datetime(2026, 12, 7, 12, 0, 0, tzinfo=UTC), {"Date": "Mon, 07 Dec 2026 12:01:30 GMT"})
    assert S3Backend._age(head) == 90.0 + DATE_SLACK


def test_an_object_without_last_modified_is_old() -> None:
    assert S3Backend._age(Head(None, {})) == float("inf")
