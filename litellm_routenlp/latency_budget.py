"""SLA-aware routing: keep each task's latency budget on top of whichever decision policy is active.

A task may declare ``latency_budget_ms`` (of its p99 latency by default, of its p50 with
``latency_budget_quantile: p50``).  The decision policy (:mod:`litellm_routenlp.policy`) decides on
quality and cost alone; this module only vetoes a choice whose expected latency would break the
budget, and says so:

* **start**: the expected latency of the start tier is its rolling quantile (the budget's quantile)
  over its last calls.  Over budget -> the nearest cheaper allowed tier that meets the budget, else the
  cheapest more capable one that does; if none does, the fastest tier (``met: false``).
* **escalation** (:class:`BudgetedSteps`, a wrapper with the policy's ``pre_check``/``step``
  interface that :func:`cascade.run_cascade` drives unchanged): the path's expected latency is the
  time the request has already spent (measured, so the tiers already called count as they really
  took) plus the target tier's quantile.  Over budget -> the nearest tier the policy skipped over
  that meets it, else the cheapest tier above the target that does, else stop and keep the best
  answer so far (the fastest choice: nothing more is waited for).

Per-tier latency comes from the plugin's own rolling windows (:class:`TierLatencies`), fed by
LiteLLM's success and failure logging events of every call to a tier (a timeout counts with the
time it took).  LiteLLM's own lowest-latency strategy keeps similar figures in the router cache
(``{model_group}_map[id]["latency"]``), but only when ``routing_strategy: latency-based-routing``
is on, and as seconds per *output token*, which is not the request latency a budget is about; so the
plugin keeps end-to-end call times itself.  A quantile of the sum is at most the sum of the
quantiles, so a path sum is a conservative estimate for a p99 budget.

A tier with no call in the last ``max_age_s`` seconds has no figure: it is not held against a budget,
so the next request probes it and a tier that recovered is used again.  Reads on the request path are
O(tiers) dictionary lookups; the quantile is recomputed when a call is observed (off the hot path).
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Mapping, Optional, Sequence

#: the quantiles a budget may be stated in, as fractions
QUANTILES = {"p50": 0.50, "p99": 0.99}
STOP_REASON = "latency_budget"   # the cascade's stop reason when a budget stopped an escalation


@dataclass(frozen=True)
class LatencyBudget:
    """One task's budget: ``budget_ms`` at ``quantile`` ("p50" or "p99")."""

    budget_ms: float
    quantile: str = "p99"


class TierLatencies:
    """Rolling end-to-end latency per tier: the last ``window`` calls younger than ``max_age_s``.

    A ``collections.deque(maxlen=window)`` of (time, ms) per tier; on every observation the p50 and p99
    of the window are recomputed (nearest rank, as LiteLLM's ``_percentile_latency``: on 20 calls p99 is
    the slowest) so that a routing decision only reads two cached numbers per tier."""

    def __init__(self, window: int = 20, max_age_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.window = int(window)
        self.max_age_s = float(max_age_s)
        self.clock = clock
        self._samples: dict[int, deque[tuple[float, float]]] = {}
        self._quantiles: dict[int, dict[str, float]] = {}
        self._newest: dict[int, float] = {}

    def observe(self, tier: int, latency_ms: float, now: Optional[float] = None) -> None:
        now = self.clock() if now is None else now
        samples = self._samples.setdefault(tier, deque(maxlen=self.window))
        while samples and now - samples[0][0] > self.max_age_s:
            samples.popleft()
        samples.append((now, float(latency_ms)))
        values = sorted(ms for _, ms in samples)
        n = len(values)
        self._quantiles[tier] = {name: values[max(math.ceil(q * n - 1e-9) - 1, 0)] for name, q in QUANTILES.items()}
        self._newest[tier] = now

    def quantile(self, tier: int, quantile: str = "p99", now: Optional[float] = None) -> Optional[float]:
        """The tier's latency at ``quantile`` (ms), or None: no call within ``max_age_s``."""
        newest = self._newest.get(tier)
        if newest is None:
            return None
        now = self.clock() if now is None else now
        if now - newest > self.max_age_s:
            return None
        return self._quantiles[tier][quantile]

    def count(self, tier: int) -> int:
        return len(self._samples.get(tier, ()))

    def snapshot(self, quantile: str = "p99") -> dict[int, Optional[float]]:
        return {tier: self.quantile(tier, quantile) for tier in sorted(self._samples)}


@dataclass
class SlaNote:
    """What a budget did to one choice (the decision record's ``sla`` entries)."""

    stage: str                         # "start" | "escalation"
    budget_ms: float
    quantile: str
    expected_ms: Optional[float]       # expected latency of the choice taken (None: no figure yet)
    forced: bool                       # the budget changed the policy's choice
    met: bool                          # the choice taken is expected to meet the budget
    chosen: Optional[int] = None       # tier taken (None: escalation stopped)
    chosen_instead_of: Optional[int] = None   # the policy's choice when forced
    instead_expected_ms: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("expected_ms", "instead_expected_ms"):
            if out[key] is not None:
                out[key] = round(out[key], 1)
        return out


def _fits(expected: Optional[float], budget_ms: float) -> bool:
    return expected is None or expected <= budget_ms


def _expected(latencies: TierLatencies, tier: int, quantile: str, elapsed_ms: float) -> Optional[float]:
    figure = latencies.quantile(tier, quantile)
    return None if figure is None else elapsed_ms + figure


def choose_start(budget: LatencyBudget, latencies: TierLatencies, wanted: int,
                 available: Sequence[int]) -> tuple[int, SlaNote]:
    """The start tier under ``budget``: ``wanted`` when it fits, else as the module docstring says."""
    expected = _expected(latencies, wanted, budget.quantile, 0.0)
    if _fits(expected, budget.budget_ms):
        return wanted, SlaNote("start", budget.budget_ms, budget.quantile, expected, forced=False, met=True,
                               chosen=wanted)
    tiers = sorted(set(available) - {wanted})
    order = [t for t in reversed(tiers) if t < wanted] + [t for t in tiers if t > wanted]
    for tier in order:
        figure = _expected(latencies, tier, budget.quantile, 0.0)
        if _fits(figure, budget.budget_ms):
            return tier, SlaNote("start", budget.budget_ms, budget.quantile, figure, forced=True, met=True,
                                 chosen=tier, chosen_instead_of=wanted, instead_expected_ms=expected)
    # nothing meets it: the fastest tier (every candidate has a figure here, or it would have fitted)
    fastest = min([wanted, *tiers], key=lambda t: (latencies.quantile(t, budget.quantile) or 0.0, t))
    figure = _expected(latencies, fastest, budget.quantile, 0.0)
    return fastest, SlaNote("start", budget.budget_ms, budget.quantile, figure, forced=fastest != wanted, met=False,
                            chosen=fastest, chosen_instead_of=wanted if fastest != wanted else None,
                            instead_expected_ms=expected if fastest != wanted else None)


def choose_escalation(budget: LatencyBudget, latencies: TierLatencies, current: int, target: int,
                      available: Sequence[int], elapsed_ms: float) -> tuple[Optional[int], SlaNote]:
    """The tier to ask instead of ``target`` (or ``target``), or None: stop, no tier fits."""
    expected = _expected(latencies, target, budget.quantile, elapsed_ms)
    if _fits(expected, budget.budget_ms):
        return target, SlaNote("escalation", budget.budget_ms, budget.quantile, expected, forced=False, met=True,
                               chosen=target)
    above = sorted(t for t in set(available) if t > current and t != target)
    order = [t for t in reversed(above) if t < target] + [t for t in above if t > target]
    for tier in order:
        figure = _expected(latencies, tier, budget.quantile, elapsed_ms)
        if _fits(figure, budget.budget_ms):
            return tier, SlaNote("escalation", budget.budget_ms, budget.quantile, figure, forced=True, met=True,
                                 chosen=tier, chosen_instead_of=target, instead_expected_ms=expected)
    return None, SlaNote("escalation", budget.budget_ms, budget.quantile, elapsed_ms, forced=True,
                         met=elapsed_ms <= budget.budget_ms, chosen=None, chosen_instead_of=target,
                         instead_expected_ms=expected)


class BudgetedSteps:
    """One request's policy under a budget: the active policy's ``pre_check``/``step``, each "ask"
    checked by :func:`choose_escalation` against the time the request has taken so far.

    ``started`` is the request's start on ``clock`` (seconds); every check appends a
    :class:`SlaNote` to ``notes``, which the plugin writes into the decision record."""

    def __init__(self, policy: Any, budget: LatencyBudget, latencies: TierLatencies, started: float,
                 notes: list[SlaNote], clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self.name = getattr(policy, "name", "policy")
        self.budget = budget
        self.latencies = latencies
        self.started = started
        self.notes = notes
        self.clock = clock
        inner = getattr(policy, "pre_check", None)
        self.pre_check = inner if inner is not None else (lambda state: None)

    def start(self, state: Any) -> Any:
        return self.policy.start(state)

    def step(self, state: Any) -> Any:
        decision = self.policy.step(state)
        if decision.stop or decision.next_tier is None:
            return decision
        current = max(answer.tier for answer in state.answers)
        elapsed_ms = (self.clock() - self.started) * 1000.0
        tier, note = choose_escalation(self.budget, self.latencies, current, int(decision.next_tier),
                                       state.available_tiers, elapsed_ms)
        self.notes.append(note)
        if tier == decision.next_tier:
            return decision
        if tier is not None:
            return replace(decision, next_tier=tier,
                           reason=f"{decision.reason}; latency budget: T{tier} instead of T{decision.next_tier}")
        return replace(decision, action="stop", next_tier=None, stop_reason=STOP_REASON,
                       reason=f"{decision.reason}; latency budget {budget_text(note)}: escalation to "
                              f"T{note.chosen_instead_of} skipped")


def budget_text(note: SlaNote) -> str:
    return f"{note.budget_ms:.0f} ms ({note.quantile})"


def summarise(notes: Sequence[SlaNote]) -> Optional[dict[str, Any]]:
    """The decision record's ``sla`` block: budget, the choices, whether any was forced."""
    if not notes:
        return None
    first = notes[0]
    forced = [n for n in notes if n.forced]
    return {"budget_ms": first.budget_ms, "quantile": first.quantile,
            "expected_ms": None if notes[-1].expected_ms is None else round(notes[-1].expected_ms, 1),
            "forced": bool(forced), "met": all(n.met for n in notes),
            "chosen_instead_of": forced[0].chosen_instead_of if forced else None,
            "choices": [n.to_dict() for n in notes]}


def header_text(notes: Sequence[SlaNote], tier_names: Mapping[int, str]) -> Optional[str]:
    """``x-routenlp-sla``: only when a budget forced a choice (or no tier could meet it)."""
    parts = []
    for note in notes:
        if not note.forced and note.met:
            continue
        name = lambda t: tier_names.get(t, f"T{t}")  # noqa: E731
        instead = "-" if note.instead_expected_ms is None else f"{note.instead_expected_ms:.0f}"
        if note.stage == "start":
            what = f"start {name(note.chosen)}" + (f" instead of {name(note.chosen_instead_of)} ({instead} ms)"
                                                    if note.chosen_instead_of else "")
        elif note.chosen is None:
            what = f"escalation to {name(note.chosen_instead_of)} skipped ({instead} ms)"
        else:
            what = f"escalation to {name(note.chosen)} instead of {name(note.chosen_instead_of)} ({instead} ms)"
        parts.append(f"{what}; budget {budget_text(note)}" + ("" if note.met else "; no tier meets it, fastest taken"))
    return "; ".join(parts) if parts else None


@dataclass
class SlaGuard:
    """The plugin's one guard: the tasks' budgets and the tiers' rolling latencies."""

    budgets: dict[str, LatencyBudget]
    latencies: TierLatencies = field(default_factory=TierLatencies)

    @classmethod
    def from_settings(cls, settings: Any) -> Optional["SlaGuard"]:
        """None when no task declares a budget (then nothing is measured or checked)."""
        budgets = {name: LatencyBudget(float(task.latency_budget_ms), task.latency_budget_quantile)
                   for name, task in settings.tasks.items() if task.latency_budget_ms is not None}
        if not budgets:
            return None
        return cls(budgets, TierLatencies(window=settings.latency_window, max_age_s=settings.latency_max_age_s))

    def budget(self, task: Optional[str]) -> Optional[LatencyBudget]:
        return self.budgets.get(task) if task is not None else None


__all__ = ["LatencyBudget", "TierLatencies", "SlaNote", "SlaGuard", "BudgetedSteps", "choose_start",
           "choose_escalation", "summarise", "header_text", "QUANTILES", "STOP_REASON"]
