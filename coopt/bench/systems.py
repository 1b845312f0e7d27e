"""One interface for every system the benchmark compares, and the registry that names them.

A system is a :class:`RoutingSystem`: settings in ``__init__`` (no work there), ``fit(ctx)`` learns
from the seed's training rows and picks its operating point on the calibration rows, and
``route(rows)`` answers with :class:`~coopt.bench.metrics.Routes` (the tiers each query tried and
the tier it kept).  ``SYSTEMS`` maps a name to a factory; adding a router is adding a class and a
registry line (``@register("MyRouter")``), and ``routenlp bench --plugin my_module`` imports a
user's module so its registrations count.

Fair tuning, the same for every system that has a knob: each candidate setting is scored on the
calibration rows, and the cheapest setting whose quality ratio reaches ``ctx.target_quality``
(0.97 by default) is kept; when none reaches it, the one with the highest quality ratio.  Test rows
are never looked at before ``route``.  With ``--certify-baselines`` (``FitContext.certify``) the knob
is chosen instead by the same Learn-then-Test rule RouteNLP's lambda is: the knob grid ordered safe
-> cheap (by calibration cost, most expensive first), fixed-sequence testing of the loss
target * q_top - q with a WSR bound at delta 0.1, the cheapest certified setting kept (the safest one
when none is certified), so the comparison can be read both ways.

This module holds the interface, the helpers and the fixed reference systems (Always-top,
Always-T2, Random, Rule-based, Oracle).  RouteNLP lives in :mod:`coopt.bench.routenlp`, the learned
baselines in :mod:`coopt.bench.baselines`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence

import numpy as np

from calibration.certify import ltt_fixed_sequence, quality_loss
from coopt.bench.data import BenchData, Split
from coopt.bench.metrics import Routes

TARGET_QUALITY = 0.97


@dataclass
class FitContext:
    """What a system may use to fit: the data, this seed's split, and a scratch directory."""

    data: BenchData
    split: Split
    work_dir: Path
    encoder_dir: Path
    cache_path: Optional[Path] = None
    target_quality: float = TARGET_QUALITY
    #: results of systems fitted earlier in this seed (name -> Routes on the test rows), and objects
    #: systems share (e.g. the trained router, which the RouteNLP ablations reuse)
    test_routes: dict[str, Routes] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)
    #: --certify-baselines: choose every baseline's knob by LTT (see the module docstring)
    certify: bool = False
    delta: float = 0.1
    method: str = "wsr"

    @property
    def seed(self) -> int:
        return self.split.seed


class RoutingSystem:
    """Base class: subclasses set ``name`` and implement ``fit`` and ``route``."""

    name: ClassVar[str] = "?"
    #: "routenlp", "baseline", "reference" (fixed policies) or "bound" (the oracle)
    family: ClassVar[str] = "baseline"
    #: systems whose test routes must exist before this one is fitted (e.g. Random needs RouteNLP's)
    requires: ClassVar[tuple[str, ...]] = ()
    #: whether the operating point carries a finite-sample guarantee (set per instance by pick())
    certified: bool = False

    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.operating_point: dict[str, Any] = {}
        self.notes: list[str] = []

    def fit(self, ctx: FitContext) -> None:
        self.ctx = ctx

    def route(self, rows: np.ndarray) -> Routes:
        raise NotImplementedError

    def pick(self, candidates: Sequence[tuple], scorer: Optional["RatioScorer"] = None) -> dict[str, Any]:
        """:func:`pick` or, under ``ctx.certify``, :func:`pick_certified`; records ``self.certified``."""
        ctx = self.ctx
        if ctx.certify and scorer is not None and all(len(c) >= 4 for c in candidates):
            chosen = pick_certified(candidates, ctx.target_quality, scorer, ctx.delta, ctx.method)
            self.certified = bool(chosen["certified"])
            return chosen
        return pick(candidates, ctx.target_quality)


SYSTEMS: dict[str, Callable[..., RoutingSystem]] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: ``@register("kNN")`` makes the class available to ``routenlp bench``."""

    def decorate(cls: type) -> type:
        cls.name = name
        SYSTEMS[name] = cls
        return cls

    return decorate


# --------------------------------------------------------------------------------------------------
# Tuning helpers


class RatioScorer:
    """Quality and cost ratios on fixed rows, fast enough to score thousands of candidate settings."""

    def __init__(self, data: BenchData, rows: np.ndarray) -> None:
        self.data, self.rows = data, rows
        top = data.K - 1
        task_ids = data.task_ids[rows]
        self.masks = [task_ids == task for task in np.unique(task_ids)]
        self.weights = [mask.mean() for mask in self.masks]
        self.quality_reference = [max(float(data.quality[rows[mask], top].sum()), 1e-12) for mask in self.masks]
        self.cost_reference = [max(float(data.cost[rows[mask], top].sum()), 1e-300) for mask in self.masks]
        self.quality = data.quality[rows]
        self.cost = data.cost[rows]

    def _ratio(self, values: np.ndarray, references: list[float]) -> float:
        return float(sum(w * values[m].sum() / r for w, m, r in zip(self.weights, self.masks, references)))

    def score(self, tried: np.ndarray, final: np.ndarray) -> tuple[float, float, np.ndarray]:
        """(quality ratio, cost ratio, per-row quality) of routes given as (n, K) tried and (n,) final."""
        quality = self.quality[np.arange(len(final)), final]
        cost = (self.cost * tried).sum(axis=1)
        return self._ratio(quality, self.quality_reference), self._ratio(cost, self.cost_reference), quality

    def score_single(self, tiers: np.ndarray) -> tuple[float, float, np.ndarray]:
        index = np.arange(len(tiers))
        quality = self.quality[index, tiers]
        return (self._ratio(quality, self.quality_reference),
                self._ratio(self.cost[index, tiers], self.cost_reference), quality)

    @property
    def top_quality(self) -> np.ndarray:
        return self.quality[:, -1]


def pick(candidates: Sequence[tuple], target: float) -> dict[str, Any]:
    """The cheapest candidate whose quality ratio reaches ``target``; else the best quality one.

    ``candidates`` are (settings, quality ratio, cost ratio[, per-row quality]) on the calibration rows.  The returned
    dict holds the settings plus ``calib_quality_ratio``, ``calib_cost_ratio`` and ``reached_target``.
    """
    if not candidates:
        raise ValueError("no candidate settings")
    reaching = [c for c in candidates if c[1] >= target - 1e-12]
    if reaching:
        best = min(reaching, key=lambda c: (c[2], -c[1]))
    else:
        best = max(candidates, key=lambda c: (c[1], -c[2]))
    return {**best[0], "calib_quality_ratio": best[1], "calib_cost_ratio": best[2], "reached_target": bool(reaching)}


def pick_certified(candidates: Sequence[tuple], target: float, scorer: RatioScorer, delta: float = 0.1,
                   method: str = "wsr") -> dict[str, Any]:
    """The knob by Learn-then-Test: candidates ordered safe -> cheap (calibration cost, highest first),
    fixed-sequence test of E[target * q_top - q] <= 0 on the calibration rows, cheapest certified kept.

    ``candidates`` are (settings, quality ratio, cost ratio, per-row quality).  When no candidate is
    certified the safest (most expensive) one is kept and ``certified`` is False.
    """
    order = sorted(range(len(candidates)), key=lambda i: (-candidates[i][2], -candidates[i][1]))
    losses = np.stack([quality_loss(np.asarray(candidates[i][3], dtype=np.float64), scorer.top_quality, target)
                       for i in order])
    index, bounds = ltt_fixed_sequence(losses, delta, method, lo=-1.0, hi=float(target), threshold=0.0)
    chosen = candidates[order[0] if index is None else order[index]]
    return {**chosen[0], "calib_quality_ratio": chosen[1], "calib_cost_ratio": chosen[2],
            "reached_target": bool(chosen[1] >= target - 1e-12), "certified": index is not None,
            "ltt_bound": float(bounds[0 if index is None else index])}


def knob_grid(scores: np.ndarray, quantiles: int = 19) -> tuple[float, ...]:
    """The fixed :data:`THRESHOLD_GRID` plus quantiles of a system's own calibration scores.

    ``scores`` (n, K) are the per-tier values a threshold is compared with (the top tier's column is
    ignored).  A router whose scores crowd into a narrow band (a confident or a prior-like one) gets
    candidate thresholds inside that band too, so no system is judged on a grid too coarse for it.
    """
    values = np.asarray(scores, dtype=np.float64)[:, :-1].ravel()
    values = values[np.isfinite(values)]
    extra = np.quantile(values, np.linspace(0, 1, quantiles + 2)[1:-1]) if values.size else np.array([])
    grid = np.unique(np.round(np.concatenate([THRESHOLD_GRID, extra]), 4))
    return tuple(float(t) for t in grid if 0.0 < t < 1.0)


def cheapest_confident(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """0-based cheapest tier whose probability reaches ``threshold``; the top tier when none does."""
    K = probabilities.shape[1]
    hits = probabilities >= threshold
    hits[:, K - 1] = True
    return hits.argmax(axis=1)


#: the knob values every threshold-style system is tuned over (RouteNLP's route_confidence too):
#: steps of 0.05, finer near 1 where a confident router's decisions change fastest
THRESHOLD_GRID = tuple(float(t) for t in np.round(np.concatenate([np.linspace(0.05, 0.95, 19),
                                                                   [0.96, 0.97, 0.98, 0.99]]), 3))


# --------------------------------------------------------------------------------------------------
# Fixed reference systems


@register("Always-top")
class AlwaysTop(RoutingSystem):
    family = "reference"

    def route(self, rows: np.ndarray) -> Routes:
        K = self.ctx.data.K
        return Routes.single(rows, np.full(len(rows), K - 1), K)


@register("Always-T2")
class AlwaysT2(RoutingSystem):
    family = "reference"

    def route(self, rows: np.ndarray) -> Routes:
        K = self.ctx.data.K
        return Routes.single(rows, np.full(len(rows), min(1, K - 1)), K)


@register("Random")
class RandomRouter(RoutingSystem):
    """Random tier per query, drawn with RouteNLP's final-tier shares on the same test rows, per task."""

    family = "reference"
    requires = ("RouteNLP",)

    def route(self, rows: np.ndarray) -> Routes:
        data, K = self.ctx.data, self.ctx.data.K
        reference = self.ctx.test_routes.get(self.settings.get("match", "RouteNLP"))
        rng = np.random.default_rng([self.ctx.seed, 7])
        tiers = np.zeros(len(rows), dtype=np.int64)
        for task in np.unique(data.task_ids[rows]):
            mask = data.task_ids[rows] == task
            if reference is not None:
                ref_mask = data.task_ids[reference.rows] == task
                shares = np.bincount(reference.final[ref_mask], minlength=K) / max(1, ref_mask.sum())
            else:
                shares = np.full(K, 1.0 / K)
            shares = shares / shares.sum() if shares.sum() > 0 else np.full(K, 1.0 / K)
            tiers[mask] = rng.choice(K, size=int(mask.sum()), p=shares)
        self.operating_point = {"matched_to": self.settings.get("match", "RouteNLP")}
        return Routes.single(rows, tiers, K)


@register("Rule-based")
class RuleBased(RoutingSystem):
    """Structured tasks -> T1, generation tasks -> T3 (the top tier when there are fewer tiers)."""

    family = "reference"

    def route(self, rows: np.ndarray) -> Routes:
        data = self.ctx.data
        generation_tier = min(2, data.K - 1)
        tiers = np.array([generation_tier if data.kind[task] == "generation" else 0
                          for task in data.task_names[rows]], dtype=np.int64)
        return Routes.single(rows, tiers, data.K)


@register("Oracle")
class Oracle(RoutingSystem):
    """The cheapest acceptable tier of each query (the top tier when none is): a bound, not a router."""

    family = "bound"

    def route(self, rows: np.ndarray) -> Routes:
        return Routes.single(rows, self.ctx.data.oracle_tier[rows], self.ctx.data.K)
