"""RouteNLP in the benchmark: the project's own router, calibration and cascade, not a re-implementation.

Per seed:

1. **Train** the router on the training rows with :func:`coopt.train_router.train_router` (frozen
   MiniLM embeddings from the shared cache, the DESIGN loss, seeded), and load the artifact with
   :class:`litellm_routenlp.router_model.RouterModel` (int8 head, as the proxy serves it by default).
2. **Route** with :func:`litellm_routenlp.routing.choose_tier` on the router's probabilities: the
   proxy's decision rule.
3. **Calibrate** delta[tier][task] on the calibration rows with
   :func:`calibration.calibrate.calibrate` (rule "risk", the trained router replayed), and load them as
   a :class:`litellm_routenlp.thresholds.Thresholds`.
4. **Cascade** every test query with :func:`litellm_routenlp.cascade.run_cascade`, answering each
   ``ask(tier)`` from the all-pairs row (that tier's recorded uncertainty, cost and latency), with
   the proxy's ``max_hops`` and ``no_logprobs_policy`` defaults.

Operating point: ``route_confidence`` and ``alpha`` are chosen on the calibration rows like every
baseline's knob (cheapest setting reaching the target quality ratio).  Because the thresholds are
themselves fitted on those rows, each setting is scored by two-fold cross-fitting (fit delta on one
half, replay the other half, and the reverse), so the score is out-of-sample.  The final thresholds
are then fitted on all calibration rows.

Ablations: ``RouteNLP w/o cascade`` (same router, no thresholds), ``RouteNLP w/o task cond.`` (a
router trained with every query under one pooled task, so it cannot use the task; the cascade keeps
its per-task thresholds).  A data set without any uncertainty signal (RouterBench, RouteLLM) has
nothing to calibrate: the cascade is inert there and says so in the notes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import warnings
from typing import Any, Optional, Sequence

import numpy as np

from coopt.allpairs import AllPairsRecord, Portfolio, TaskSpec
from coopt.bench.metrics import Routes
from coopt.bench.systems import THRESHOLD_GRID, FitContext, RatioScorer, RoutingSystem, knob_grid, pick, register

ROUTE_CONFIDENCES = THRESHOLD_GRID  # the baselines' grid; fit() adds quantiles of the router's own scores
ALPHAS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
POOLED_TASK = "all-tasks"
FITTED = object()  # route(): use the thresholds fitted on the calibration split


def proxy_defaults() -> dict[str, Any]:
    """The proxy's own defaults for the settings the benchmark replays."""
    from litellm_routenlp.config import RouteNLPSettings

    fields = RouteNLPSettings.model_fields
    return {name: fields[name].default for name in ("route_confidence", "max_hops", "no_logprobs_policy",
                                                      "router_quantized")}


class EmbeddedRouter:
    """A loaded RouterModel that reads the benchmark's cached embeddings instead of running the encoder.

    It has what :func:`calibration.calibrate.calibrate` needs of a router (``tiers``,
    ``predict_proba(texts, tasks)``); ``task_map`` renames tasks (the pooled ablation).
    """

    def __init__(self, model: Any, data: Any, task_map: Optional[dict[str, str]] = None) -> None:
        self.model = model
        self.tiers = model.tiers
        self.artifact_dir = model.artifact_dir
        self.data = data
        self.task_map = task_map or {}
        self._row_of = {prompt: row for row, prompt in enumerate(data.prompts)}

    def task_ids(self, tasks: Sequence[str]) -> np.ndarray:
        return np.array([self.model.task_index(self.task_map.get(task, task)) for task in tasks], dtype=np.int64)

    def proba_rows(self, rows: np.ndarray) -> np.ndarray:
        return self.model.predict_proba_from_embeddings(self.data.embeddings[rows],
                                                        self.task_ids(self.data.task_names[rows].tolist()))

    def predict_proba(self, texts: Sequence[str], tasks: Sequence[str]) -> np.ndarray:
        rows = np.array([self._row_of[text] for text in texts], dtype=np.int64)
        return self.model.predict_proba_from_embeddings(self.data.embeddings[rows], self.task_ids(list(tasks)))


def pooled_training_set(records: Sequence[AllPairsRecord], portfolio: Portfolio) -> tuple[list[AllPairsRecord], Portfolio]:
    """Every record under one task, so the router cannot condition on it.

    The cheapest-acceptable label of each record is unchanged: with one shared tau the qualities are
    kept; with different taus they are replaced by acceptability (1 if q >= the task's tau, else 0)
    under tau = 1.
    """
    taus = {spec.tau for spec in portfolio.tasks.values()}
    shared_tau = taus.pop() if len(taus) == 1 else None
    pooled = []
    for record in records:
        tiers = record.tiers
        if shared_tau is None:
            tau = portfolio.tau(record.task)
            tiers = {name: dataclasses.replace(result, quality=1.0 if result.quality >= tau else 0.0)
                     for name, result in record.tiers.items()}
        pooled.append(dataclasses.replace(record, task=POOLED_TASK, tiers=tiers))
    spec = TaskSpec(metric="pooled", tau=shared_tau if shared_tau is not None else 1.0, kind="structured")
    return pooled, Portfolio(tiers=portfolio.tiers, tasks={POOLED_TASK: spec})


def replay_cascade(data: Any, rows: np.ndarray, start_tiers: np.ndarray, thresholds: Any,
                   max_hops: int, no_logprobs_policy: str) -> Routes:
    """Run the proxy's :func:`run_cascade` on every row, answering from the all-pairs data."""
    from litellm_routenlp.cascade import TierAnswer, run_cascade

    K = data.K
    tier_names = {k + 1: name for k, name in enumerate(data.tier_names)}
    every_tier = list(range(1, K + 1))

    def answer(row: int, tier: int) -> TierAnswer:
        u = data.uncertainty[row, tier - 1]
        return TierAnswer(tier=tier, response=None, uncertainty=None if np.isnan(u) else float(u),
                          cost_usd=float(data.cost[row, tier - 1]), latency_ms=float(data.latency[row, tier - 1]))

    async def one(row: int, start: int) -> list[int]:
        async def ask(tier: int) -> TierAnswer:
            return answer(row, tier)

        async def available() -> list[int]:  # the tiers serving this task, as the proxy's eligibility
            return data.eligible_tiers(row) if hasattr(data, "eligible_tiers") else every_tier

        result = await run_cascade(first=answer(row, start + 1), task=str(data.task_names[row]),
                                   thresholds=thresholds, tier_names=tier_names, available_tiers=available,
                                   ask=ask, max_hops=max_hops, no_logprobs_policy=no_logprobs_policy)
        return [tier - 1 for tier in result.path]

    async def every() -> list[list[int]]:
        return [await one(int(row), int(start)) for row, start in zip(rows, start_tiers)]

    return Routes.from_paths(rows, asyncio.run(every()), K)


def _thresholds_object(document_thresholds: dict[str, dict[str, dict[str, Any]]], alpha: float) -> Any:
    from litellm_routenlp.thresholds import Thresholds

    deltas = {tier: {task: float(cell["delta"]) for task, cell in cells.items() if cell.get("delta") is not None}
              for tier, cells in document_thresholds.items()}
    return Thresholds(deltas={tier: cells for tier, cells in deltas.items() if cells}, alpha=alpha,
                      source="coopt.bench (calibrated on the calibration split)")


@register("RouteNLP")
class RouteNLP(RoutingSystem):
    """The trained task-conditioned router + conformal cascade (see the module docstring)."""

    family = "routenlp"
    cascade = True
    task_conditioning = True

    def __init__(self, route_confidences: Sequence[float] = ROUTE_CONFIDENCES, alphas: Sequence[float] = ALPHAS,
                 rule: str = "risk", **settings: Any) -> None:
        super().__init__(route_confidences=tuple(route_confidences), alphas=tuple(alphas), rule=rule, **settings)
        self.defaults = proxy_defaults()

    # -------------------------------------------------------------------------------- training
    def _router(self, ctx: FitContext) -> EmbeddedRouter:
        key = f"router:{'task' if self.task_conditioning else 'pooled'}"
        if key not in ctx.shared:
            from coopt.train_router import train_router
            from litellm_routenlp.router_model import RouterModel

            data = ctx.data
            records = [data.records[i] for i in ctx.split.train]
            portfolio, task_map = data.portfolio, None
            if not self.task_conditioning:
                records, portfolio = pooled_training_set(records, portfolio)
                task_map = {task: POOLED_TASK for task in data.tasks}
            out = ctx.work_dir / f"seed{ctx.seed}" / key.replace(":", "-")
            logging.disable(logging.WARNING)  # onnxruntime's quantiser nags on the root logger at every export
            try:
                report = train_router(records, portfolio, out, encoder_dir=ctx.encoder_dir,
                                      cache_path=ctx.cache_path, seed=ctx.seed)
            finally:
                logging.disable(logging.NOTSET)
            model = RouterModel.load(out, with_encoder=False, quantized=bool(self.defaults["router_quantized"]))
            ctx.shared[key] = EmbeddedRouter(model, data, task_map)
            ctx.shared[key + ":report"] = {"val_accuracy": report.val_accuracy,
                                           "majority_baseline_accuracy": report.majority_baseline_accuracy,
                                           "epochs_run": report.epochs_run, "n_train": report.n_train}
        return ctx.shared[key]

    # -------------------------------------------------------------------------------- pieces
    def start_tiers(self, probabilities: np.ndarray, route_confidence: float,
                    rows: Optional[np.ndarray] = None) -> np.ndarray:
        """0-based tier chosen by the proxy's rule for each row of router probabilities, among the
        tiers that serve the row's task (all tiers when ``rows`` is not given)."""
        from litellm_routenlp.routing import choose_tier

        every_tier = list(range(1, probabilities.shape[1] + 1))
        data = self.ctx.data
        eligible = [every_tier if rows is None else data.eligible_tiers(int(row))
                    for row in (rows if rows is not None else range(len(probabilities)))]
        return np.array([choose_tier(p, tiers, route_confidence)[0] - 1 for p, tiers in zip(probabilities, eligible)],
                        dtype=np.int64)

    def can_cascade(self) -> bool:
        data = self.ctx.data
        return self.cascade and data.K > 1 and bool(data.has_uncertainty[:-1].any())

    def fit_thresholds(self, rows: np.ndarray, start: np.ndarray, alpha: float,
                       portfolio: Optional[Portfolio] = None) -> Optional[dict]:
        """delta per tier and task on ``rows`` (start tiers given), or None when it cannot be fitted."""
        from calibration.calibrate import fit_thresholds

        data = self.ctx.data
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return fit_thresholds([data.records[i] for i in rows], portfolio or data.portfolio, start,
                                      alpha, self.settings["rule"])
        except ValueError as error:
            self._note(f"calibration failed ({error}); cascade off for this setting")
            return None

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def cascade_routes(self, rows: np.ndarray, start: np.ndarray, thresholds_doc: Optional[dict], alpha: float,
                       delta_scale: float = 1.0) -> Routes:
        thresholds = None
        if thresholds_doc is not None:
            scaled = {tier: {task: {**cell, "delta": None if cell.get("delta") is None else cell["delta"] * delta_scale}
                             for task, cell in cells.items()} for tier, cells in thresholds_doc.items()}
            thresholds = _thresholds_object(scaled, alpha)
        if thresholds is None:
            return Routes.single(rows, start, self.ctx.data.K)
        return replay_cascade(self.ctx.data, rows, start, thresholds, int(self.defaults["max_hops"]),
                              str(self.defaults["no_logprobs_policy"]))

    def calibrate_on(self, rows: np.ndarray, route_confidence: float, alpha: float,
                     portfolio: Optional[Portfolio] = None) -> Optional[dict]:
        """The project's ``calibrate`` on ``rows`` with the trained router replayed; None if impossible."""
        from calibration.calibrate import calibrate

        if not self.can_cascade():
            return None
        data = self.ctx.data
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                document = calibrate([data.records[i] for i in rows], portfolio or data.portfolio,
                                     router_artifact=self.router, alpha=alpha, n_calib=len(rows),
                                     rule=self.settings["rule"], route_confidence=route_confidence, seed=self.ctx.seed)
        except ValueError as error:
            self._note(f"calibration failed ({error}); cascade off")
            return None
        return document["thresholds"]

    # -------------------------------------------------------------------------------- fit / route
    def fit(self, ctx: FitContext) -> None:
        super().fit(ctx)
        data, calib = ctx.data, ctx.split.calib
        self.router = self._router(ctx)
        self.calib_probabilities = self.router.proba_rows(calib)
        scorer = RatioScorer(data, calib)
        alphas = self.settings["alphas"] if self.can_cascade() else (None,)
        if self.cascade and not self.can_cascade():
            self._note("no uncertainty signal below the top tier in this data: the cascade cannot be calibrated "
                       "and never escalates (RouteNLP = its router here)")
        halves = np.random.default_rng([ctx.seed, 11]).permutation(len(calib)) % 2 == 0
        candidates = []
        cumulative = np.minimum(np.cumsum(self.calib_probabilities, axis=1), 1.0)
        grid = sorted(set(self.settings["route_confidences"]) | set(knob_grid(cumulative)))
        for route_confidence in grid:
            start = self.start_tiers(self.calib_probabilities, route_confidence, calib)
            for alpha in alphas:
                if alpha is None:
                    routes = Routes.single(calib, start, data.K)
                else:
                    tried = np.zeros((len(calib), data.K), dtype=bool)
                    final = np.zeros(len(calib), dtype=np.int64)
                    for fit_half in (halves, ~halves):
                        doc = self.fit_thresholds(calib[fit_half], start[fit_half], alpha)
                        part = self.cascade_routes(calib[~fit_half], start[~fit_half], doc, alpha)
                        tried[~fit_half], final[~fit_half] = part.tried, part.final
                    routes = Routes(rows=calib, tried=tried, final=final)
                quality, cost = scorer.score(routes.tried, routes.final)
                candidates.append(({"route_confidence": route_confidence, "alpha": alpha}, quality, cost))
        self.operating_point = pick(candidates, ctx.target_quality)
        self.route_confidence = self.operating_point["route_confidence"]
        self.alpha = self.operating_point["alpha"]
        self.thresholds_doc = (self.calibrate_on(calib, self.route_confidence, self.alpha)
                               if self.alpha is not None else None)
        self.operating_point["router"] = ctx.shared[f"router:{'task' if self.task_conditioning else 'pooled'}:report"]
        if self.thresholds_doc is not None:
            self.operating_point["thresholds"] = {
                tier: {task: {key: cell[key] for key in ("delta", "n", "violation")} for task, cell in cells.items()}
                for tier, cells in self.thresholds_doc.items()}

    def route(self, rows: np.ndarray, route_confidence: Optional[float] = None, thresholds_doc: Any = FITTED,
              alpha: Optional[float] = None, delta_scale: float = 1.0) -> Routes:
        """Test routes at the fitted operating point; the keyword arguments give the sweeps' variants
        (``thresholds_doc=None`` routes without a cascade)."""
        probabilities = self.router.proba_rows(rows)
        start = self.start_tiers(probabilities, self.route_confidence if route_confidence is None else route_confidence,
                                 rows)
        doc = self.thresholds_doc if thresholds_doc is FITTED else thresholds_doc
        return self.cascade_routes(rows, start, doc, self.alpha if alpha is None else alpha, delta_scale)

    # -------------------------------------------------------------------------------- sweeps (Tables 12-13)
    def scaled_tau_portfolio(self, scale: float) -> Portfolio:
        portfolio = self.ctx.data.portfolio
        tasks = {name: dataclasses.replace(spec, tau=min(1.0, spec.tau * scale)) for name, spec in portfolio.tasks.items()}
        return Portfolio(tiers=portfolio.tiers, tasks=tasks)


@register("RouteNLP w/o cascade")
class RouteNLPNoCascade(RouteNLP):
    cascade = False


@register("RouteNLP w/o task cond.")
class RouteNLPNoTask(RouteNLP):
    task_conditioning = False
