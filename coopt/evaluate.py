"""The figures each iteration is judged by: the proxy's cascade replayed over held-out all-pairs queries.

For every query the router (any :class:`litellm_routenlp.routers.Router`, asked as the proxy asks it;
build one with :func:`litellm_routenlp.routers.load_router`, the proxy's registry) gives its estimates,
the decision policy (:mod:`litellm_routenlp.policy`; default the paper's
``conformal_thresholds``) picks a start tier among the tiers that serve the task, then
:func:`litellm_routenlp.cascade.run_cascade` -- the proxy's own cascade loop, deciding through the
same policy -- walks up with the recorded answers (paper rule: a tier's answer is kept while
u <= delta[tier][task]); the cost of every tier tried is paid.  From the outcomes (paper Table 4):

- ``quality``: mean task metric of the answers the clients receive (``quality_retained``: the same
  divided by the top tier's mean quality on the same queries);
- ``acceptance``: fraction of answers meeting the task's bar;
- ``cost_ratio``: total cost / the cost of sending every query to the top tier;
- ``cheap_share``: fraction answered by the cheap local tiers (T1, T2); ``top_share``: by the top tier;
- ``escalation_rate``: fraction that needed more than one tier.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from calibration.calibrate import served_tiers
from litellm_routenlp.cascade import TierAnswer, run_cascade
from litellm_routenlp.policy import ConformalThresholds, decide_start
from litellm_routenlp.routers import Router, RouterEstimates, predict_served
from routenlp_core.allpairs import AllPairsRecord, Portfolio, acceptable
from routenlp_core.decision_record import DecisionRecord, PolicyRecord, RouteRecord

CHEAP_TIERS = ("T1", "T2")


@dataclass(frozen=True)
class Outcome:
    """What the cascade did with one query: the decision record the proxy would have written for it
    (``routenlp_core.decision_record``), and the quality of the answer it kept."""

    record: DecisionRecord
    start_tier: str
    quality: float
    acceptable: bool

    @property
    def id(self) -> str:
        return self.record.request_id

    @property
    def task(self) -> str:
        return str(self.record.task)

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(self.record.path)

    @property
    def final_tier(self) -> str:
        return str(self.record.final_tier)

    @property
    def cost_usd(self) -> float:
        return float(self.record.total_cost_usd or 0.0)


def served_tier_numbers(records: Sequence[AllPairsRecord], portfolio: Portfolio, task: str) -> list[int]:
    """1-based tiers that serve ``task`` (a tier whose every answer is a ``not served`` error does not)."""
    rows = np.array([i for i, r in enumerate(records) if r.task == task])
    served = served_tiers(records, rows, portfolio.tier_names)
    numbers = [k + 1 for k, ok in enumerate(served) if ok]
    top = len(portfolio.tier_names)
    return numbers if top in numbers else numbers + [top]


def router_estimates(records: Sequence[AllPairsRecord], router: Router) -> RouterEstimates:
    """The router's estimates for every record, asked as the proxy asks (one call, the proxy's cut)."""
    if not isinstance(router, Router):
        raise TypeError(f"a {type(router).__name__} is not a router: a Router (litellm_routenlp.routers) has "
                        "tiers / tasks / artifact_dir / max_chars / blocking / predict(texts, tasks)")
    return predict_served(router, [r.prompt for r in records], [r.task for r in records])


def start_tiers(records: Sequence[AllPairsRecord], portfolio: Portfolio, router: Router,
                route_confidence: float = 0.5, policy: Any = None,
                estimates: Optional[RouterEstimates] = None) -> list[int]:
    """1-based start tier per record: ``policy.start`` among the tiers serving the record's task
    (default policy: the paper rule at ``route_confidence``), on ``estimates`` (default: ask ``router``)."""
    policy = policy if policy is not None else ConformalThresholds(route_confidence=route_confidence)
    estimates = estimates if estimates is not None else router_estimates(records, router)
    acceptance = estimates.acceptance
    served = {task: served_tier_numbers(records, portfolio, task) for task in {r.task for r in records}}
    return [decide_start(policy, r.task, served[r.task], row, None if acceptance is None else acceptance[i]).tier
            for i, (row, r) in enumerate(zip(estimates.route, records))]


def replay_cascade(records: Sequence[AllPairsRecord], portfolio: Portfolio, starts: Sequence[int], thresholds: Any,
                   max_hops: int = 3, no_logprobs_policy: str = "trust_router", policy: Any = None,
                   acceptance: Optional[np.ndarray] = None) -> list[Outcome]:
    """Run the proxy's cascade over the recorded answers, starting each record at ``starts`` (1-based).

    ``policy`` (default: the paper rule from ``thresholds``) decides every step; ``acceptance`` (n, K)
    is the router's ex-ante estimate a ``cascade_routing`` policy reads."""
    names = {k + 1: name for k, name in enumerate(portfolio.tier_names)}
    served = {task: served_tier_numbers(records, portfolio, task) for task in {r.task for r in records}}

    async def one(index: int, record: AllPairsRecord, start: int) -> Outcome:
        def answer(tier: int) -> TierAnswer:
            result = record.tiers[names[tier]]
            return TierAnswer(tier=tier, response=result, uncertainty=result.uncertainty, cost_usd=result.cost_usd,
                              latency_ms=result.latency_ms or 0.0, text=result.output)

        async def available() -> list[int]:
            return served[record.task]

        async def ask(tier: int) -> TierAnswer:
            return answer(tier)

        result = await run_cascade(first=answer(start), task=record.task, thresholds=thresholds, tier_names=names,
                                   available_tiers=available, ask=ask, max_hops=max_hops,
                                   no_logprobs_policy=no_logprobs_policy, policy=policy,
                                   acceptance=None if acceptance is None else acceptance[index])
        final = names[result.final.tier]
        decision = DecisionRecord(
            request_id=record.id, task=record.task, task_status="known",
            router=RouteRecord(routed_tier=names[start], wanted_tier=names[start]),
            policy=PolicyRecord(name=getattr(policy, "name", "conformal_thresholds"), stop_reason=result.stop_reason),
            attempts=tuple(result.attempts), final_tier=final, total_cost_usd=result.total_cost_usd)
        return Outcome(record=decision, start_tier=names[start], quality=record.tiers[final].quality,
                       acceptable=acceptable(record, final, portfolio.tau(record.task)))

    async def run_all() -> list[Outcome]:
        return [await one(index, record, start) for index, (record, start) in enumerate(zip(records, starts))]

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


def evaluate(records: Sequence[AllPairsRecord], portfolio: Portfolio, router: Router, thresholds: Any,
             route_confidence: float = 0.5, max_hops: int = 3, policy: Any = None) -> tuple[dict[str, Any], list[Outcome]]:
    """Route + cascade every record with ``policy`` (default: the paper rule from ``thresholds``);
    the Table-4 figures and the per-query outcomes.

    Like the proxy, the policy is handed both of the router's outputs (the paper rule reads the route
    probabilities, the certified policies the acceptance estimates; None when the router has none)."""
    if policy is None:
        policy = ConformalThresholds(thresholds, route_confidence=route_confidence, max_hops=max_hops)
    estimates = router_estimates(records, router)
    starts = start_tiers(records, portfolio, router, route_confidence, policy, estimates)
    outcomes = replay_cascade(records, portfolio, starts, thresholds, max_hops=max_hops, policy=policy,
                              acceptance=estimates.acceptance)
    return summarise(outcomes, records, portfolio), outcomes


def outcome_dicts(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    """``outcomes.jsonl`` rows: the figures of each query, then its decision record."""
    return [{"id": o.id, "task": o.task, "start_tier": o.start_tier, "path": list(o.path), "final_tier": o.final_tier,
             "cost_usd": o.cost_usd, "quality": o.quality, "acceptable": o.acceptable, "record": o.record.to_dict()}
            for o in outcomes]


def tier_quality(records: Sequence[AllPairsRecord], portfolio: Portfolio, tier: str,
                 task: Optional[str] = None) -> Optional[float]:
    """Acceptance of one tier's own answers (every query it serves), e.g. T1 accuracy on the eval set."""
    rows = [r for r in records if (task is None or r.task == task) and not (r.tiers[tier].error or "").startswith(
        "not served")]
    if not rows:
        return None
    return round(float(np.mean([acceptable(r, tier, portfolio.tau(r.task)) for r in rows])), 4)
