"""The cascade loop: ask tiers until the decision policy stops, then return the answer it keeps.

The loop is independent of LiteLLM: it receives the first answer and an ``ask(tier)`` coroutine, so the
proxy (non-streaming and buffered streaming) and any offline replay use the same rules.  Every
stop/escalate decision is made by a :mod:`litellm_routenlp.policy` object (default: the paper's
``conformal_thresholds`` rule built from ``thresholds``, ``max_hops`` and ``no_logprobs_policy``);
this module only adds what is not a quality decision: cost adds up over every tier tried, a failed
escalation keeps the answers so far and says so, and a key's budget stops escalation.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable, Optional, Sequence

from routenlp_core.decision_record import Attempt

from .policy import ConformalThresholds, PolicyAnswer, StepDecision, StepState, should_escalate
from .thresholds import Thresholds


@dataclass
class TierAnswer:
    """An answer as the cascade sees it; ``response`` is whatever the caller hands back to the client."""

    tier: int
    response: Any
    uncertainty: Optional[float]
    cost_usd: float
    latency_ms: float
    model_id: Optional[str] = None
    margin: Optional[float] = None
    text: Optional[str] = None


@dataclass
class CascadeResult:
    final: TierAnswer
    attempts: list[Attempt] = field(default_factory=list)
    escalation_error: Optional[str] = None
    escalation_skipped: Optional[str] = None   # why a wanted escalation was not made (e.g. key budget)
    stop_reason: Optional[str] = None          # the policy's code (policy.STOP_REASONS) or "error"/"key budget"
    decisions: list[StepDecision] = field(default_factory=list)

    @property
    def total_cost_usd(self) -> float:
        return sum(attempt.cost_usd for attempt in self.attempts)

    @property
    def path(self) -> list[int]:
        return [attempt.tier for attempt in self.attempts if attempt.error is None]



async def run_cascade(
    first: TierAnswer,
    task: Optional[str],
    thresholds: Optional[Thresholds],
    tier_names: dict[int, str],
    available_tiers: Callable[[], Awaitable[Sequence[int]]],
    ask: Callable[[int], Awaitable[TierAnswer]],
    max_hops: int,
    no_logprobs_policy: str = "trust_router",
    budget_usd: Optional[float] = None,
    policy: Any = None,
    acceptance: Optional[Sequence[float]] = None,
) -> CascadeResult:
    """Ask tiers from ``first`` on until ``policy`` stops (default: the paper's threshold rule).

    ``acceptance`` is the router's ex-ante P(tier k acceptable) (read by ``cascade_routing``).
    ``budget_usd`` is what the calling key may still spend: escalation calls do not pass through the
    proxy's budget check, so the cascade stops itself once the cost so far has used that budget up.
    """
    if policy is None:
        policy = ConformalThresholds(thresholds, max_hops=max_hops, no_logprobs_policy=no_logprobs_policy)
    ex_ante = None if acceptance is None else tuple(float(p) for p in acceptance)
    result = CascadeResult(final=first)
    answers: dict[int, TierAnswer] = {}
    seen: list[PolicyAnswer] = []
    current = first
    hops = 0
    while True:
        name = tier_names.get(current.tier, f"T{current.tier}")
        answers[current.tier] = current
        seen.append(PolicyAnswer(tier=current.tier, uncertainty=current.uncertainty, margin=current.margin,
                                 text=current.text, cost_usd=current.cost_usd))
        state = StepState(task=task, answers=tuple(seen), available_tiers=(), hops=hops, tier_names=tier_names,
                          acceptance=ex_ante)
        pre_check = getattr(policy, "pre_check", None)
        decision = pre_check(state) if pre_check is not None else None
        if decision is None:  # only now look up tier health (a cooldown lookup in the proxy)
            state = dataclasses.replace(state, available_tiers=tuple(await available_tiers()))
            decision = policy.step(state)
        result.decisions.append(decision)
        result.attempts.append(Attempt(
            tier=current.tier, tier_name=name, model_id=current.model_id, uncertainty=current.uncertainty,
            threshold=decision.threshold, cost_usd=current.cost_usd, latency_ms=current.latency_ms,
            reason=decision.reason,
            estimates=None if decision.estimates is None else tuple(round(v, 6) for v in decision.estimates)))
        result.final = answers.get(decision.answer_tier, current)
        if decision.stop:
            result.stop_reason = decision.stop_reason
            break
        target = int(decision.next_tier)
        if budget_usd is not None and result.total_cost_usd >= budget_usd:
            result.escalation_skipped = "key budget"
            result.stop_reason = "key budget"
            break
        result.attempts[-1] = replace(result.attempts[-1], escalated=True)
        hops += 1
        started = time.perf_counter()
        try:
            answer = await ask(target)
        except Exception as error:  # any provider failure: keep the best answer so far
            message = f"{type(error).__name__}: {str(error)[:300]}"
            result.attempts.append(Attempt(
                tier=target, tier_name=tier_names.get(target, f"T{target}"), model_id=None, uncertainty=None,
                threshold=None, cost_usd=0.0, latency_ms=(time.perf_counter() - started) * 1000.0,
                error=message))
            result.escalation_error = f"T{target}: {message}"
            result.stop_reason = "error"
            break
        current = answer
    return result


__all__ = ["Attempt", "TierAnswer", "CascadeResult", "run_cascade", "should_escalate"]
