"""Conformal cascading: keep a tier's answer while u <= delta[tier][task], otherwise ask the next tier.

The loop is independent of LiteLLM: it receives the first answer and an ``ask(tier)`` coroutine, so the
proxy (non-streaming and buffered streaming) and any offline replay use the same rules.  Cost adds up
over every tier tried; a failed escalation keeps the previous answer and says so.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable, Optional, Sequence

from .routing import next_tier_above
from .thresholds import Thresholds


@dataclass
class Attempt:
    """One tier tried for a request."""

    tier: int
    tier_name: str
    model_id: Optional[str]
    uncertainty: Optional[float]
    threshold: Optional[float]
    cost_usd: float
    latency_ms: float
    escalated: bool = False
    error: Optional[str] = None


@dataclass
class TierAnswer:
    """An answer as the cascade sees it; ``response`` is whatever the caller hands back to the client."""

    tier: int
    response: Any
    uncertainty: Optional[float]
    cost_usd: float
    latency_ms: float
    model_id: Optional[str] = None


@dataclass
class CascadeResult:
    final: TierAnswer
    attempts: list[Attempt] = field(default_factory=list)
    escalation_error: Optional[str] = None
    escalation_skipped: Optional[str] = None   # why a wanted escalation was not made (e.g. key budget)

    @property
    def total_cost_usd(self) -> float:
        return sum(attempt.cost_usd for attempt in self.attempts)

    @property
    def path(self) -> list[int]:
        return [attempt.tier for attempt in self.attempts if attempt.error is None]

    def attempts_as_dicts(self) -> list[dict[str, Any]]:
        return [asdict(attempt) for attempt in self.attempts]


def should_escalate(uncertainty: Optional[float], delta: Optional[float], no_logprobs_policy: str) -> bool:
    """u > delta escalates; no threshold never does; no uncertainty follows the declared policy."""
    if delta is None:
        return False
    if uncertainty is None:
        return no_logprobs_policy == "escalate"
    return uncertainty > delta


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
) -> CascadeResult:
    """Escalate from ``first`` until an answer is confident enough, the top tier answers, or hops run out.

    ``budget_usd`` is what the calling key may still spend: escalation calls do not pass through the
    proxy's budget check, so the cascade stops itself once the cost so far has used that budget up.
    """
    current = first
    result = CascadeResult(final=first)
    hops = 0
    while True:
        name = tier_names.get(current.tier, f"T{current.tier}")
        delta = thresholds.delta(name, task) if (thresholds is not None and task is not None) else None
        attempt = Attempt(tier=current.tier, tier_name=name, model_id=current.model_id,
                          uncertainty=current.uncertainty, threshold=delta, cost_usd=current.cost_usd,
                          latency_ms=current.latency_ms)
        result.attempts.append(attempt)
        if hops >= max_hops or not should_escalate(current.uncertainty, delta, no_logprobs_policy):
            break
        target = next_tier_above(current.tier, await available_tiers())
        if target is None:
            break
        if budget_usd is not None and result.total_cost_usd >= budget_usd:
            result.escalation_skipped = "key budget"
            break
        attempt.escalated = True
        hops += 1
        started = time.perf_counter()
        try:
            answer = await ask(target)
        except Exception as error:  # any provider failure: keep the previous answer
            message = f"{type(error).__name__}: {str(error)[:300]}"
            result.attempts.append(Attempt(
                tier=target, tier_name=tier_names.get(target, f"T{target}"), model_id=None, uncertainty=None,
                threshold=None, cost_usd=0.0, latency_ms=(time.perf_counter() - started) * 1000.0,
                error=message))
            result.escalation_error = f"T{target}: {message}"
            break
        current = answer
        result.final = answer
    return result
