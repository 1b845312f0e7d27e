"""The routing decision: from router probabilities and the healthy tiers to one tier.

The router's head predicts p_k = P(the cheapest acceptable tier is k).  A tier j is then acceptable
with probability P(cheapest <= j) = p_1 + ... + p_j (quality grows with tier), so the cheapest tier
"predicted to meet the task's quality threshold" is the cheapest healthy, eligible j whose cumulative
probability reaches ``route_confidence``.  When no healthy tier reaches it, the most capable healthy
tier answers.  The result is a small typed record that the proxy, the decision log, the benchmark and
the co-optimisation loop all read the same way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence


@dataclass
class RoutingDecision:
    """What the router decided for one request, and why."""

    task: Optional[str]
    task_status: str                      # "known" | "unknown" | "missing"
    probabilities: list[float]            # p_k per tier, cheapest first
    tier: Optional[int] = None            # 1-based tier chosen among healthy ones
    wanted_tier: Optional[int] = None     # the router's choice before health was considered
    reason: str = ""
    router_ms: float = 0.0
    healthy_tiers: list[int] = field(default_factory=list)
    acceptance: Optional[list[float]] = None   # ex-ante P(tier k acceptable), k = 1..K (cascade_routing)
    start_estimates: Optional[list[float]] = None   # the policy's per-tier estimates at the start
    lam: Optional[float] = None                # cascade_routing: the task's certified lambda
    threshold: Optional[float] = None          # posterior_threshold: the task's certified threshold

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RoutingDecision":
        return cls(**{key: raw[key] for key in cls.__dataclass_fields__ if key in raw})


def cumulative_acceptance(probabilities: Sequence[float]) -> list[float]:
    total, out = 0.0, []
    for p in probabilities:
        total += float(p)
        out.append(min(total, 1.0))
    return out


def choose_tier(probabilities: Sequence[float], available_tiers: Sequence[int],
                route_confidence: float) -> tuple[int, str]:
    """Cheapest available tier whose P(acceptable) >= route_confidence, else the highest available."""
    if not available_tiers:
        raise ValueError("no tier is available")
    tiers = sorted(set(available_tiers))
    cumulative = cumulative_acceptance(probabilities)
    for tier in tiers:
        index = min(tier, len(cumulative)) - 1
        if cumulative[index] >= route_confidence:
            return tier, f"P(acceptable at T{tier})={cumulative[index]:.3f}>={route_confidence}"
    return tiers[-1], f"no healthy tier reaches P(acceptable)>={route_confidence}; highest healthy tier"


def healthy_fallback(wanted: int, healthy_tiers: Sequence[int], direction: str) -> int:
    """The tier that serves when ``wanted`` is unhealthy (the paper's outage policy).

    Structured tasks (``direction="down"``) fall back to the nearest cheaper healthy tier, whose answer
    the cascade can still escalate; generation tasks (``"up"``) go to the nearest more capable healthy
    tier.  Either way, when nothing is healthy on that side the other side is used.
    """
    tiers = sorted(set(healthy_tiers))
    if not tiers:
        raise ValueError("no tier is available")
    if wanted in tiers:
        return wanted
    below = [t for t in tiers if t < wanted]
    above = [t for t in tiers if t > wanted]
    if direction == "down":
        return below[-1] if below else above[0]
    return above[0] if above else below[-1]


def next_tier_above(current: int, available_tiers: Sequence[int]) -> Optional[int]:
    """The cheapest available tier more capable than ``current`` (the cascade's next hop)."""
    above = sorted(t for t in set(available_tiers) if t > current)
    return above[0] if above else None
