"""The figures each iteration is judged by: the proxy's cascade replayed over held-out all-pairs queries.

For every query the router picks a start tier among the tiers that serve the task (``choose_tier``,
as the proxy does), then :func:`litellm_routenlp.cascade.run_cascade` -- the proxy's own cascade --
walks up with the recorded answers: a tier's answer is kept while u <= delta[tier][task], the cost of
every tier tried is paid.  From the outcomes (paper Table 4):

- ``quality``: mean task metric of the answers the clients receive (``quality_retained``: the same
  divided by the top tier's mean quality on the same queries);
- ``acceptance``: fraction of answers meeting the task's bar;
- ``cost_ratio``: total cost / the cost of sending every query to the top tier;
- ``cheap_share``: fraction answered by the cheap local tiers (T1, T2); ``top_share``: by the top tier;
- ``escalation_rate``: fraction that needed more than one tier.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import numpy as np

from coopt.allpairs import AllPairsRecord, Portfolio, acceptable

CHEAP_TIERS = ("T1", "T2")


@dataclass(frozen=True)
class Outcome:
    """What the cascade did with one query."""

    id: str
    task: str
    start_tier: str
    path: tuple[str, ...]
    final_tier: str
    cost_usd: float
    quality: float
    acceptable: bool


def served_tier_numbers(records: Sequence[AllPairsRecord], portfolio: Portfolio, task: str) -> list[int]:
    """1-based tiers that serve ``task`` (a tier whose every answer is a ``not served`` error does not)."""
    from calibration.calibrate import served_tiers

    rows = np.array([i for i, r in enumerate(records) if r.task == task])
    served = served_tiers(records, rows, portfolio.tier_names)
    numbers = [k + 1 for k, ok in enumerate(served) if ok]
    top = len(portfolio.tier_names)
    return numbers if top in numbers else numbers + [top]


def start_tiers(records: Sequence[AllPairsRecord], portfolio: Portfolio, router: Any,
                route_confidence: float = 0.5) -> list[int]:
    """1-based start tier per record: the router's choice among the tiers serving the record's task."""
    from litellm_routenlp.routing import choose_tier

    probabilities = router.predict_proba([r.prompt for r in records], [r.task for r in records])
    served = {task: served_tier_numbers(records, portfolio, task) for task in {r.task for r in records}}
    return [choose_tier(row, served[r.task], route_confidence)[0] for row, r in zip(probabilities, records)]


def replay_cascade(records: Sequence[AllPairsRecord], portfolio: Portfolio, starts: Sequence[int], thresholds: Any,
                   max_hops: int = 3, no_logprobs_policy: str = "trust_router") -> list[Outcome]:
    """Run the proxy's cascade over the recorded answers, starting each record at ``starts`` (1-based)."""
    from litellm_routenlp.cascade import TierAnswer, run_cascade

    names = {k + 1: name for k, name in enumerate(portfolio.tier_names)}
    served = {task: served_tier_numbers(records, portfolio, task) for task in {r.task for r in records}}

    async def one(record: AllPairsRecord, start: int) -> Outcome:
        def answer(tier: int) -> TierAnswer:
            result = record.tiers[names[tier]]
            return TierAnswer(tier=tier, response=result, uncertainty=result.uncertainty, cost_usd=result.cost_usd,
                              latency_ms=result.latency_ms or 0.0)

        async def available() -> list[int]:
            return served[record.task]

        async def ask(tier: int) -> TierAnswer:
            return answer(tier)

        result = await run_cascade(first=answer(start), task=record.task, thresholds=thresholds, tier_names=names,
                                   available_tiers=available, ask=ask, max_hops=max_hops,
                                   no_logprobs_policy=no_logprobs_policy)
        final = names[result.final.tier]
        quality = record.tiers[final].quality
        return Outcome(id=record.id, task=record.task, start_tier=names[start],
                       path=tuple(names[t] for t in result.path),
                       final_tier=final, cost_usd=result.total_cost_usd, quality=quality,
                       acceptable=acceptable(record, final, portfolio.tau(record.task)))

    async def run_all() -> list[Outcome]:
        return [await one(record, start) for record, start in zip(records, starts)]

    return asyncio.run(run_all())


def summarise(outcomes: Sequence[Outcome], records: Sequence[AllPairsRecord], portfolio: Portfolio,
              cheap_tiers: Sequence[str] = CHEAP_TIERS) -> dict[str, Any]:
    """The Table-4 figures over all outcomes and per task (see module docstring)."""
    top = portfolio.tier_names[-1]
    by_id = {r.id: r for r in records}

    def figures(rows: Sequence[Outcome]) -> dict[str, Any]:
        if not rows:
            return {"n": 0}
        top_cost = sum(by_id[o.id].tiers[top].cost_usd for o in rows)
        top_quality = float(np.mean([by_id[o.id].tiers[top].quality for o in rows]))
        quality = float(np.mean([o.quality for o in rows]))
        shares = {name: round(float(np.mean([o.final_tier == name for o in rows])), 4) for name in portfolio.tier_names}
        return {
            "n": len(rows),
            "quality": round(quality, 4),
            "quality_retained": round(quality / top_quality, 4) if top_quality > 0 else None,
            "acceptance": round(float(np.mean([o.acceptable for o in rows])), 4),
            "cost_usd": round(float(sum(o.cost_usd for o in rows)), 6),
            "cost_ratio": round(float(sum(o.cost_usd for o in rows)) / top_cost, 5) if top_cost > 0 else None,
            "cheap_share": round(float(np.mean([o.final_tier in cheap_tiers for o in rows])), 4),
            "top_share": round(float(np.mean([o.final_tier == top for o in rows])), 4),
            "escalation_rate": round(float(np.mean([len(o.path) > 1 for o in rows])), 4),
            "final_tier_share": shares,
        }

    out = figures(outcomes)
    out["per_task"] = {task: figures([o for o in outcomes if o.task == task])
                       for task in sorted({o.task for o in outcomes})}
    return out


def evaluate(records: Sequence[AllPairsRecord], portfolio: Portfolio, router: Any, thresholds: Any,
             route_confidence: float = 0.5, max_hops: int = 3) -> tuple[dict[str, Any], list[Outcome]]:
    """Route + cascade every record; the Table-4 figures and the per-query outcomes."""
    starts = start_tiers(records, portfolio, router, route_confidence)
    outcomes = replay_cascade(records, portfolio, starts, thresholds, max_hops=max_hops)
    return summarise(outcomes, records, portfolio), outcomes


def outcome_dicts(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    return [{**asdict(o), "path": list(o.path)} for o in outcomes]


def tier_quality(records: Sequence[AllPairsRecord], portfolio: Portfolio, tier: str,
                 task: Optional[str] = None) -> Optional[float]:
    """Acceptance of one tier's own answers (every query it serves), e.g. T1 accuracy on the eval set."""
    rows = [r for r in records if (task is None or r.task == task) and not (r.tiers[tier].error or "").startswith(
        "not served")]
    if not rows:
        return None
    return round(float(np.mean([acceptable(r, tier, portfolio.tau(r.task)) for r in rows])), 4)
