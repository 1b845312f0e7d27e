import asyncio
import json

import pytest

from litellm_routenlp.cascade import TierAnswer, run_cascade, should_escalate
from litellm_routenlp.routing import choose_tier, cumulative_acceptance, next_tier_above
from litellm_routenlp.thresholds import Thresholds, ThresholdsError

NAMES = {1: "T1", 2: "T2", 3: "T3", 4: "T4"}


def test_cheapest_tier_whose_cumulative_acceptance_reaches_confidence():
    probs = [0.1, 0.3, 0.4, 0.2]
    assert cumulative_acceptance(probs) == pytest.approx([0.1, 0.4, 0.8, 1.0])
    assert choose_tier(probs, [1, 2, 3, 4], 0.5)[0] == 3
    assert choose_tier(probs, [1, 2, 3, 4], 0.35)[0] == 2
    assert choose_tier([0.9, 0.05, 0.03, 0.02], [1, 2, 3, 4], 0.5)[0] == 1


def test_unhealthy_chosen_tier_moves_up_not_down():
    probs = [0.1, 0.6, 0.2, 0.1]
    assert choose_tier(probs, [1, 3, 4], 0.5)[0] == 3
    # only cheaper tiers left: the most capable of them answers
    assert choose_tier([0.0, 0.0, 0.1, 0.9], [1, 2], 0.5)[0] == 2


def test_next_tier_above_skips_missing_tiers():
    assert next_tier_above(1, [1, 3, 4]) == 3
    assert next_tier_above(4, [1, 2, 3, 4]) is None


def test_threshold_lookup_and_validation(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"alpha": 0.05, "thresholds": {
        "T2": {"bitext": {"delta": 0.3, "n": 100}, "banking77": {"delta": None}}}}))
    thresholds = Thresholds.load(path)
    assert thresholds.delta("T2", "bitext") == 0.3
    assert thresholds.delta("T2", "banking77") is None
    assert thresholds.delta("T3", "bitext") is None
    path.write_text('{"thresholds": {"T2": {"bitext": {"delta": -1}}}}')
    with pytest.raises(ThresholdsError, match=r"thresholds.T2.bitext.delta"):
        Thresholds.load(path)
    path.write_text('{"thresholds": {"T2": ')
    with pytest.raises(ThresholdsError, match="truncated"):
        Thresholds.load(path)
    with pytest.raises(ThresholdsError, match="not found"):
        Thresholds.load(tmp_path / "missing.json")


def test_escalation_rule():
    assert should_escalate(0.5, 0.4, "trust_router") is True
    assert should_escalate(0.4, 0.4, "trust_router") is False
    assert should_escalate(0.9, None, "trust_router") is False
    assert should_escalate(None, 0.4, "trust_router") is False
    assert should_escalate(None, 0.4, "escalate") is True


def _run(first, deltas, answers, max_hops=3, available=(1, 2, 3, 4), failing=()):
    thresholds = Thresholds(deltas=deltas)
    asked = []

    async def ask(tier):
        asked.append(tier)
        if tier in failing:
            raise RuntimeError("tier down")
        return answers[tier]

    async def healthy():
        return list(available)

    result = asyncio.run(run_cascade(first, "t", thresholds, NAMES, healthy, ask, max_hops))
    return result, asked


def test_cascade_escalates_while_uncertain_and_adds_costs():
    first = TierAnswer(tier=1, response="a1", uncertainty=0.6, cost_usd=0.001, latency_ms=1)
    answers = {2: TierAnswer(2, "a2", 0.5, 0.01, 1), 3: TierAnswer(3, "a3", 0.1, 0.1, 1)}
    result, asked = _run(first, {"T1": {"t": 0.3}, "T2": {"t": 0.2}, "T3": {"t": 0.2}}, answers)
    assert asked == [2, 3]
    assert result.final.response == "a3"
    assert result.path == [1, 2, 3]
    assert result.total_cost_usd == pytest.approx(0.111)


def test_cascade_stops_when_confident_or_out_of_hops():
    first = TierAnswer(tier=2, response="a2", uncertainty=0.1, cost_usd=0.01, latency_ms=1)
    result, asked = _run(first, {"T2": {"t": 0.2}}, {})
    assert asked == [] and result.final.response == "a2"
    first = TierAnswer(tier=1, response="a1", uncertainty=0.9, cost_usd=0.001, latency_ms=1)
    answers = {2: TierAnswer(2, "a2", 0.9, 0.01, 1)}
    result, asked = _run(first, {"T1": {"t": 0.1}, "T2": {"t": 0.1}}, answers, max_hops=1)
    assert asked == [2] and result.final.response == "a2"


def test_failed_escalation_keeps_previous_answer():
    first = TierAnswer(tier=2, response="a2", uncertainty=0.9, cost_usd=0.01, latency_ms=1)
    result, asked = _run(first, {"T2": {"t": 0.1}}, {}, failing=(3,))
    assert asked == [3]
    assert result.final.response == "a2"
    assert result.escalation_error.startswith("T3")
    assert result.path == [2]


def test_cascade_skips_unhealthy_next_tier():
    first = TierAnswer(tier=1, response="a1", uncertainty=0.9, cost_usd=0.0, latency_ms=1)
    answers = {3: TierAnswer(3, "a3", 0.0, 0.1, 1)}
    result, asked = _run(first, {"T1": {"t": 0.1}}, answers, available=(1, 3, 4))
    assert asked == [3] and result.final.response == "a3"


def test_outage_fallback_direction_follows_the_task_kind():
    from litellm_routenlp.routing import healthy_fallback

    # T2 and T3 down: structured tasks go down to T1, generation goes up to the top tier
    assert healthy_fallback(2, [1, 4], "down") == 1
    assert healthy_fallback(2, [1, 4], "up") == 4
    # T4 down: generation falls back to the most capable healthy tier below
    assert healthy_fallback(4, [1, 2, 3], "up") == 3
    assert healthy_fallback(3, [1, 2, 3, 4], "down") == 3
    with pytest.raises(ValueError):
        healthy_fallback(1, [], "up")


def test_cascade_stops_at_the_key_budget():
    thresholds = Thresholds(deltas={"T1": {"t": 0.1}})
    asked = []

    async def ask(tier):
        asked.append(tier)
        return TierAnswer(tier, "a", 0.0, 1.0, 1)

    async def healthy():
        return [1, 2, 3, 4]

    first = TierAnswer(tier=1, response="a1", uncertainty=0.9, cost_usd=0.05, latency_ms=1)
    result = asyncio.run(run_cascade(first, "t", thresholds, NAMES, healthy, ask, 3, budget_usd=0.04))
    assert asked == [] and result.escalation_skipped == "key budget"
    result = asyncio.run(run_cascade(first, "t", thresholds, NAMES, healthy, ask, 3, budget_usd=10.0))
    assert asked == [2] and result.escalation_skipped is None
