"""Rate tiers over injected time: a tier's rate holds within 5% over 60 s, per key and per team."""

from __future__ import annotations

import json

import pytest

from memoplane.errors import InputError
from memoplane.server.auth import CREATE, EXECUTE, Caller
from memoplane.server.errors import ApiError
from memoplane.server.limits import Limiter, RateLimited
from memoplane.settings import DEFAULT_TIERS, ServeSettings, Tier, TierLimits, serve_tiers

PER_MINUTE, BURST = 600, 50
TIER = Tier(key=TierLimits(30, 5, 3, PER_MINUTE, BURST, 2), team=TierLimits(30, 5, 4, 900, BURST, 3))


def _admitted(limiter: Limiter, callers: list[Caller], kind: str, seconds: float, step: float) -> int:
    """Offer one call per caller every `step` seconds of injected time; count those let through
    (each finishes at once)."""
    admitted, ticks = 0, round(seconds / step)
    for tick in range(ticks):
        for caller in callers:
            try:
                limiter.take(caller, kind, 1000.0 + tick * step)
                admitted += 1
                limiter.finished(caller, kind)
            except RateLimited as refused:
                assert refused.status == 429 and refused.retry_after >= 1
    return admitted


def test_a_key_holds_its_tier_within_5_percent_over_60_seconds() -> None:
    limiter = Limiter({"t": TIER})
    admitted = _admitted(limiter, [Caller("team", "k1", tier="t")], EXECUTE, 60.0, 0.01)   # 6,000 offered
    assert abs(admitted - (PER_MINUTE + BURST)) <= 0.05 * (PER_MINUTE + BURST)


def test_a_team_holds_its_tier_across_its_keys() -> None:
    limiter = Limiter({"t": TIER})
    keys = [Caller("team", f"k{i}", tier="t") for i in range(3)]   # 3 x 600/min offered to a 900/min team
    admitted = _admitted(limiter, keys, EXECUTE, 60.0, 0.01)
    assert abs(admitted - (900 + BURST)) <= 0.05 * (900 + BURST)


def test_creations_wait_for_their_bucket_and_say_how_long() -> None:
    limiter = Limiter({"t": TIER})
    caller = Caller("team", "k1", tier="t")
    for _ in range(5):
        limiter.take(caller, CREATE, 0.0)
    with pytest.raises(RateLimited) as refused:
        limiter.take(caller, CREATE, 0.0)
    assert refused.value.retry_after == 2            # 30 a minute: one every 2 s
    limiter.take(caller, CREATE, 2.0)


def test_alive_sandboxes_are_bounded_per_key_and_team() -> None:
    limiter = Limiter({"t": TIER})
    caller = Caller("team", "k1", tier="t")
    limiter.check_alive(caller, 2, 3)
    with pytest.raises(RateLimited, match="API key k1 has 3"):
        limiter.check_alive(caller, 3, 3)
    with pytest.raises(RateLimited, match="team team has 4"):
        limiter.check_alive(caller, 0, 4)


def test_running_executions_are_bounded_per_key_and_team_and_cost_no_token_when_refused() -> None:
    limiter = Limiter({"t": TIER})
    k1, k2 = Caller("team", "k1", tier="t"), Caller("team", "k2", tier="t")
    limiter.take(k1, EXECUTE, 0.0)
    limiter.take(k1, EXECUTE, 0.0)
    with pytest.raises(RateLimited, match="API key k1 has 2 executions running") as refused:
        limiter.take(k1, EXECUTE, 0.0)
    assert refused.value.status == 429 and refused.value.retry_after == 1
    limiter.take(k2, EXECUTE, 0.0)
    with pytest.raises(RateLimited, match="team team has 3 executions running"):
        limiter.take(k2, EXECUTE, 0.0)
    assert limiter.running(k1) == (2, 3)
    limiter.finished(k1, EXECUTE)
    limiter.take(k2, EXECUTE, 0.0)   # the team had room again
    assert limiter.running(k2) == (2, 3)
    other_team = Caller("other", "k3", tier="t")
    limiter.take(other_team, EXECUTE, 0.0)   # another team's are its own
    for caller in (k1, k2, k2, other_team):
        limiter.finished(caller, EXECUTE)
    assert limiter.running(k1) == (0, 0) and limiter.running(other_team) == (0, 0)
    # the refusals above charged nothing: of the team's burst, the 4 let through are gone, no more
    for _ in range(BURST - 4):
        limiter.take(k1, EXECUTE, 0.0)
        limiter.finished(k1, EXECUTE)
    with pytest.raises(RateLimited, match="team team is over its tier's rate of executions"):
        limiter.take(k1, EXECUTE, 0.0)
    limiter.take(k1, CREATE, 0.0)
    limiter.finished(k1, CREATE)   # creations are not executions: nothing to end
    assert limiter.running(k1) == (0, 0)


def test_an_unlimited_caller_and_an_unknown_tier() -> None:
    limiter = Limiter({"t": TIER})
    for _ in range(1000):
        limiter.take(Caller(), EXECUTE, 0.0)    # the local caller (no keys): no tier
    with pytest.raises(ApiError, match="tier 'gold' is not configured"):
        limiter.take(Caller("team", "k", tier="gold"), EXECUTE, 0.0)


def test_tiers_come_from_the_settings_and_bad_ones_name_the_field() -> None:
    limits = {"creations_per_minute": 1, "creation_burst": 1, "concurrent_sandboxes": 1,
              "executions_per_minute": 6, "execution_burst": 2, "concurrent_executions": 1}
    tiers = serve_tiers(ServeSettings(tiers=json.dumps({"gold": {"key": limits, "team": limits}})))
    assert tiers == {"gold": Tier(TierLimits(1, 1, 1, 6, 2, 1), TierLimits(1, 1, 1, 6, 2, 1))}
    assert serve_tiers(ServeSettings()) == DEFAULT_TIERS
    with pytest.raises(InputError, match=r"gold\.team does not give exactly the limits"):
        serve_tiers(ServeSettings(tiers=json.dumps({"gold": {"key": limits, "team": {"creation_burst": 1}}})))
    with pytest.raises(InputError, match=r"gold\.key\.execution_burst = -1 is not a number >= 0"):
        serve_tiers(ServeSettings(tiers=json.dumps({"gold": {"key": {**limits, "execution_burst": -1},
                                                             "team": limits}})))
    with pytest.raises(InputError, match="MEMOPLANE_SERVE_TIERS is not JSON"):
        serve_tiers(ServeSettings(tiers="{"))
