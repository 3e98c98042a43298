"""Rate tiers (settings.Tier): token buckets per API key and per team on sandbox creations and
executions, and bounds on the sandboxes each has alive and the executions each has running.
Time is injected (`now`) for tests."""

from __future__ import annotations

import math
import threading
from collections import Counter
from dataclasses import dataclass

from ..settings import Tier, TierLimits
from .auth import CREATE, EXECUTE, Caller
from .errors import ApiError


class RateLimited(ApiError):
    def __init__(self, message: str, fix: str, retry_after: float) -> None:
        super().__init__(429, message, fix)
        self.retry_after = max(1, math.ceil(retry_after))


@dataclass
class TokenBucket:
    per_second: float
    burst: float
    tokens: float
    at: float

    def wait(self, now: float) -> float:
        """Seconds until a token is there (0: now), after refilling up to `now`."""
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.per_second)
        self.at = max(self.at, now)
        if self.tokens >= 1:
            return 0.0
        return math.inf if self.per_second <= 0 else (1 - self.tokens) / self.per_second


class Limiter:
    def __init__(self, tiers: dict[str, Tier]) -> None:
        self.tiers = tiers
        self._buckets: dict[tuple[str, str, str], TokenBucket] = {}
        self._running: Counter[tuple[str, str]] = Counter()   # executions under way, per key and per team
        self._lock = threading.Lock()

    def tier(self, caller: Caller) -> Tier | None:
        if caller.tier is None:
            return None
        if caller.tier not in self.tiers:
            raise ApiError(500, f"team {caller.team}'s tier {caller.tier!r} is not configured",
                           f"set MEMOPLANE_SERVE_TIERS to include it, or give the team one of {sorted(self.tiers)}")
        return self.tiers[caller.tier]

    def take(self, caller: Caller, kind: str, now: float) -> None:
        """One creation or execution for the caller's key and team, or RateLimited (neither is charged).
        An execution taken runs until `finished` says so: at most the tier's concurrent_executions."""
        tier = self.tier(caller)
        if tier is None:
            return
        with self._lock:
            if kind == EXECUTE:
                self._check_running(caller, tier)
            buckets = [self._bucket(("key", caller.key_id, kind), tier.key, kind, now),
                       self._bucket(("team", caller.team, kind), tier.team, kind, now)]
            waits = [b.wait(now) for b in buckets]
            if max(waits) > 0:
                who = "API key " + caller.key_id if waits[0] > 0 else "team " + caller.team
                what = "sandbox creations" if kind == CREATE else "executions"
                raise RateLimited(f"{who} is over its tier's rate of {what}", "retry after Retry-After seconds, "
                                  "or ask for a larger tier", max(waits))
            for bucket in buckets:
                bucket.tokens -= 1
            if kind == EXECUTE:
                self._running.update(_running_names(caller))

    def finished(self, caller: Caller, kind: str) -> None:
        """An execution `take` let through has ended (a creation needs no word)."""
        if kind != EXECUTE or self.tier(caller) is None:
            return
        with self._lock:
            self._running.subtract(_running_names(caller))
            self._running += Counter()   # drop the zeros: keys come and go

    def running(self, caller: Caller) -> tuple[int, int]:
        """Executions under way of the caller's key, and of its team."""
        key, team = _running_names(caller)
        with self._lock:
            return self._running[key], self._running[team]

    def _check_running(self, caller: Caller, tier: Tier) -> None:
        key, team = _running_names(caller)
        for who, running, bound in ((f"API key {caller.key_id}", self._running[key], tier.key.concurrent_executions),
                                    (f"team {caller.team}", self._running[team], tier.team.concurrent_executions)):
            if running >= bound:
                raise RateLimited(f"{who} has {running} executions running, its tier's most",
                                  "retry after Retry-After seconds, once one ended; or ask for a larger tier", 1)

    def check_alive(self, caller: Caller, of_key: int, of_team: int) -> None:
        """Refuse a creation while the key or the team has its tier's sandboxes alive."""
        tier = self.tier(caller)
        if tier is None:
            return
        for who, alive, bound in ((f"API key {caller.key_id}", of_key, tier.key.concurrent_sandboxes),
                                  (f"team {caller.team}", of_team, tier.team.concurrent_sandboxes)):
            if alive >= bound:
                raise RateLimited(f"{who} has {alive} sandboxes alive, its tier's most", "kill one first", 1)

    def _bucket(self, name: tuple[str, str, str], limits: TierLimits, kind: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(name)
        if bucket is None:
            per_minute, burst = (limits.creations_per_minute, limits.creation_burst) if kind == CREATE else \
                (limits.executions_per_minute, limits.execution_burst)
            bucket = self._buckets[name] = TokenBucket(per_minute / 60, burst, burst, now)
        return bucket


def _running_names(caller: Caller) -> tuple[tuple[str, str], tuple[str, str]]:
    return ("key", caller.key_id), ("team", caller.team)
