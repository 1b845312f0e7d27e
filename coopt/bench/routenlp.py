"""RouteNLP in the benchmark: the project's own router, policies and calibration, not a re-implementation.

Two policies of :mod:`litellm_routenlp.policy`, both driven by the same offline replay
(:func:`calibration.fit_cascade_routing.replay_rows`) and converted to the bench's 0-based
:class:`Routes` in one place (:func:`to_routes`):

**RouteNLP** (``cascade_routing``, certified).  Per seed: train the router on the training rows
(:func:`coopt.train_router.train_router`, loaded with :class:`RouterModel` as the proxy serves it);
its ex-ante acceptance estimates on the calibration rows are out of sample; then
:func:`calibration.fit_cascade_routing.fit_cascade_routing` cross-fits the posterior estimator on
the calibration rows and certifies lambda per task (LTT with a WSR bound at delta 0.1, or CRC in
expectation: ``RouteNLP (CRC)``); the test rows are decided by the fitted policy.

**RouteNLP (paper rule)** (``conformal_thresholds``, the system before issue 14), tuned as before:

1. **Route** with :func:`litellm_routenlp.routing.choose_tier` on the router's probabilities.
2. **Calibrate** delta[tier][task] on the calibration rows with
   :func:`calibration.calibrate.calibrate` (rule "risk", the trained router replayed).
3. **Cascade** every test query through the policy with the proxy's ``max_hops`` and
   ``no_logprobs_policy`` defaults.

Operating point: ``route_confidence`` and ``alpha`` are chosen on the calibration rows like every
baseline's knob (cheapest setting reaching the target quality ratio).  Because the thresholds are
themselves fitted on those rows, each setting is scored by two-fold cross-fitting (fit delta on one
half, replay the other half, and the reverse), so the score is out-of-sample.  The final thresholds
are then fitted on all calibration rows.

Ablations of the paper rule: ``RouteNLP w/o cascade`` (same router, no thresholds), ``RouteNLP w/o
task cond.`` (a router trained with every query under one pooled task).  A data set without any
uncertainty signal (RouterBench, RouteLLM) has nothing to calibrate for the paper rule: its cascade
is inert there and says so in the notes (cascade routing still reads the answers' agreement).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any, Optional, Sequence

import numpy as np

from routenlp_core.allpairs import AllPairsRecord, Portfolio, TaskSpec
from litellm_routenlp.config import RouteNLPSettings
from litellm_routenlp.policy import ConformalThresholds
from litellm_routenlp.router_model import RouterModel
from litellm_routenlp.routers import RouterEstimates
from litellm_routenlp.routing import choose_tier
from litellm_routenlp.thresholds import Thresholds
from calibration.calibrate import calibrate, fit_thresholds
from calibration.fit_cascade_routing import (FAMILIES, THRESHOLD_FAMILIES, CalibrationRows, RowCache, assign_folds,
                                             family_policy, fit_cascade_routing, fit_parts, out_of_fold_quality,
                                             replay_rows, replay_threshold_grid,
                                             task_policy)
from coopt.bench.metrics import Routes
from coopt.bench.systems import THRESHOLD_GRID, FitContext, RatioScorer, RoutingSystem, knob_grid, pick, register
from coopt.train_router import train_router

ROUTE_CONFIDENCES = THRESHOLD_GRID  # the baselines' grid; fit() adds quantiles of the router's own scores
ALPHAS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
POOLED_TASK = "all-tasks"
FITTED = object()  # route(): use the thresholds fitted on the calibration split


def proxy_defaults() -> dict[str, Any]:
    """The proxy's own defaults for the settings the benchmark replays."""
    fields = RouteNLPSettings.model_fields
    return {name: fields[name].default for name in ("route_confidence", "max_hops", "no_logprobs_policy",
                                                      "router_quantized")}


class EmbeddedRouter:
    """A loaded RouterModel that reads the benchmark's cached embeddings instead of running the encoder.

    It is a :class:`litellm_routenlp.routers.Router` (what :func:`calibration.calibrate.calibrate`
    replays); ``task_map`` renames tasks (the pooled ablation).
    """

    max_chars = None   # the texts are looked up, not encoded: no cut
    blocking = False

    def __init__(self, model: Any, data: Any, task_map: Optional[dict[str, str]] = None) -> None:
        self.model = model
        self.tiers = model.tiers
        self.tasks = model.tasks
        self.artifact_dir = model.artifact_dir
        self.data = data
        self.task_map = task_map or {}
        self._row_of = {prompt: row for row, prompt in enumerate(data.prompts)}

    def task_ids(self, tasks: Sequence[str]) -> np.ndarray:
        return np.array([self.model.task_index(self.task_map.get(task, task)) for task in tasks], dtype=np.int64)

    def proba_rows(self, rows: np.ndarray) -> np.ndarray:
        return self.model.predict_proba_from_embeddings(self.data.embeddings[rows],
                                                        self.task_ids(self.data.task_names[rows].tolist()))

    def acceptance_rows(self, rows: np.ndarray) -> np.ndarray:
        """Ex-ante P(tier k acceptable) per row (the router's acceptance head)."""
        return self.model.predict_acceptance_from_embeddings(self.data.embeddings[rows],
                                                             self.task_ids(self.data.task_names[rows].tolist()))

    def predict(self, texts: Sequence[str], tasks: Sequence[str]) -> RouterEstimates:
        """Both head outputs for texts of the benchmark (their cached embeddings), as RouterModel.predict."""
        rows = np.array([self._row_of[text] for text in texts], dtype=np.int64)
        route, acceptance = self.model.predict_both_from_embeddings(self.data.embeddings[rows],
                                                                    self.task_ids(list(tasks)))
        return RouterEstimates(route=route, acceptance=acceptance)


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


def to_routes(rows: np.ndarray, kept: np.ndarray, tried: np.ndarray, K: int) -> Routes:
    """The one place where the policy's 1-based tiers become the bench's 0-based :class:`Routes`."""
    kept = np.asarray(kept, dtype=np.int64)
    if kept.size and (kept.min() < 1 or kept.max() > K):
        raise ValueError(f"kept tiers must be 1-based in 1..{K}")
    return Routes(rows=rows, tried=np.asarray(tried, dtype=bool), final=kept - 1)


def bench_rows(data: Any, rows: np.ndarray, ex_ante: Optional[np.ndarray] = None) -> Any:
    """The bench rows as the policy replay reads them (:class:`CalibrationRows`)."""
    K = data.K
    available = {task: [k + 1 for k in range(K) if data.served[index, k]] for index, task in enumerate(data.tasks)}
    outputs = [[data.records[i].tiers[name].output for name in data.tier_names] for i in rows]
    return CalibrationRows(tasks=data.task_names[rows], ex_ante=ex_ante if ex_ante is not None else np.full((len(rows), K), 0.5),
                           quality=data.quality[rows], acceptable=data.acceptable[rows],
                           uncertainty=data.uncertainty[rows], cost=data.cost[rows], outputs=outputs,
                           available=available)


def policy_routes(policy: Any, data: Any, rows: np.ndarray, ex_ante: Optional[np.ndarray] = None,
                  starts: Optional[np.ndarray] = None, route_probabilities: Optional[np.ndarray] = None) -> Routes:
    """Decide ``rows`` with ``policy`` on their recorded answers; the bench's Routes."""
    kept, tried, _ = replay_rows(policy, bench_rows(data, rows, ex_ante), route_probabilities, starts)
    return to_routes(rows, kept, tried, data.K)


class _RouterOwner(RoutingSystem):
    """Systems built on the project's trained router (shared between them within a seed)."""

    family = "routenlp"
    task_conditioning = True

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self.defaults = proxy_defaults()

    def _router(self, ctx: FitContext, rows: Optional[np.ndarray] = None, name: Optional[str] = None) -> EmbeddedRouter:
        """The router trained on ``rows`` (default: the training rows), shared under ``name`` in the seed."""
        key = name or f"router:{'task' if self.task_conditioning else 'pooled'}"
        if key not in ctx.shared:
            data = ctx.data
            records = [data.records[i] for i in (ctx.split.train if rows is None else rows)]
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
                                           "epochs_run": report.epochs_run, "n_train": report.n_train,
                                           "acceptance": model.acceptance_source}
        return ctx.shared[key]


#: the guarantee ``RouteNLP`` certifies with by default (chosen from the benchmark: README "Results")
DEFAULT_GUARANTEE = "ltt"
#: the policy family ``RouteNLP`` certifies by default (chosen from the benchmark: README "Results")
DEFAULT_FAMILY = "posterior_threshold"


@register("RouteNLP")
class RouteNLP(_RouterOwner):
    """The trained router + certified cascade routing (module docstring)."""

    certified = True
    guarantee = DEFAULT_GUARANTEE
    #: the certified policy family (calibration.fit_cascade_routing.FAMILIES); ``family`` is the
    #: bench's system family ("routenlp"), a different thing
    policy_family = DEFAULT_FAMILY

    def __init__(self, delta: float = 0.1, method: str = "wsr", folds: int = 3, **settings: Any) -> None:
        super().__init__(delta=delta, method=method, folds=folds, **settings)

    def _cross_fit(self, ctx: FitContext) -> dict[str, Any]:
        """Every labelled row of the seed (train + calibration) used by router and certificate alike.

        The rows are split into folds (by task); fold f's ex-ante estimates come from a router
        trained on the other folds, and the posterior estimator that decides fold f's rows is
        fitted on the other folds too (:func:`fit_cascade_routing` with the same folds), so every
        decision the certificate counts was made by estimators that never saw its row.  The router
        that serves the test rows is trained on all of them."""
        data = ctx.data
        pool = np.sort(np.concatenate([ctx.split.train, ctx.split.calib]))
        fold_of = assign_folds(data.task_names[pool], self.settings["folds"], ctx.seed)
        ex_ante = np.zeros((len(pool), data.K))
        for fold in range(int(fold_of.max()) + 1):
            held = fold_of == fold
            router = self._router(ctx, pool[~held], name=f"router:fold{fold}")
            ex_ante[held] = router.acceptance_rows(pool[held])
        rows = bench_rows(data, pool, ex_ante)
        oof = out_of_fold_quality(rows, self.lambdas, 0, ctx.seed, int(self.defaults["max_hops"]),
                                  str(self.defaults["no_logprobs_policy"]), fold_of, self.policy_family)
        return {"pool": pool, "rows": rows, "oof": oof, "final": fit_parts(rows, ctx.seed),
                "router": self._router(ctx, pool, name="router:pool")}

    @property
    def lambdas(self) -> tuple[float, ...]:
        return FAMILIES[self.policy_family]

    def fit(self, ctx: FitContext) -> None:
        RoutingSystem.fit(self, ctx)
        data = ctx.data
        key = f"certified:{self.policy_family}"
        if key not in ctx.shared:
            ctx.shared[key] = self._cross_fit(ctx)
        shared = ctx.shared[key]
        self.router = shared["router"]
        targets = {task: ctx.target_quality for task in data.tasks}
        fitted = fit_cascade_routing(shared["rows"], targets, guarantee=self.guarantee, delta=self.settings["delta"],
                                     method=self.settings["method"], lambdas=self.lambdas, seed=ctx.seed,
                                     max_hops=int(self.defaults["max_hops"]),
                                     no_logprobs_policy=str(self.defaults["no_logprobs_policy"]),
                                     oof=shared["oof"], final=shared["final"], family=self.policy_family)
        self.policy, self.fitted = fitted.policy, fitted
        tasks = fitted.document["tasks"]
        self.certified_tasks = {task: bool(entry["certificate"]["certified"]) for task, entry in tasks.items()}
        quality, cost = shared["oof"]
        top = shared["rows"].quality[:, -1]
        self.operating_point = {
            "policy": self.policy_family, "guarantee": self.guarantee, "n_certification": int(len(shared["pool"])),
            "lambda" if self.policy_family == "cascade_routing" else "threshold":
                {task: entry["lambda" if self.policy_family == "cascade_routing" else "threshold"] for task, entry in tasks.items()},
            "certificates": {task: entry["certificate"] for task, entry in tasks.items()},
            "costs": {task: entry["costs"] for task, entry in tasks.items()},
            "sigmas": {task: entry["sigmas"] for task, entry in tasks.items()},
            "out_of_fold": {task: {"knob": list(self.lambdas),
                                   "quality_ratio": [round(float(quality[i, m].sum() / max(top[m].sum(), 1e-12)), 4)
                                                     for i in range(len(self.lambdas))],
                                   "cost_ratio": [round(float(cost[i, m].sum() / max(shared["rows"].cost[m, -1].sum(), 1e-300)), 4)
                                                  for i in range(len(self.lambdas))]}
                            for task in tasks for m in [shared["rows"].tasks == task]},
            "router": ctx.shared["router:pool:report"]}
        for task, entry in tasks.items():
            if not entry["certificate"]["certified"]:
                self.notes.append(entry["certificate"]["message"])

    def route(self, rows: np.ndarray) -> Routes:
        return policy_routes(self.policy, self.ctx.data, rows, self.router.acceptance_rows(rows))

    def curve(self, rows: np.ndarray) -> list[Routes]:
        """Test routes at every knob value of the grid (same estimator): the APGR/CPT curve."""
        ex_ante = self.router.acceptance_rows(rows)
        cache, memo = RowCache(self.policy.estimator), {}
        policies = [family_policy(self.policy_family, {task: task_policy(self.policy_family, knob, spec.costs, spec.sigmas)
                                                       for task, spec in self.policy.tasks.items()},
                                  cache, self.policy.max_hops, self.policy.no_logprobs_policy, memo)
                    for knob in self.lambdas]
        if self.policy_family in THRESHOLD_FAMILIES:
            kept, tried = replay_threshold_grid(policies, self.lambdas, bench_rows(self.ctx.data, rows, ex_ante))
            return [to_routes(rows, kept[i], tried[i], self.ctx.data.K) for i in range(len(policies))]
        return [policy_routes(policy, self.ctx.data, rows, ex_ante) for policy in policies]


@register("RouteNLP (CRC)")
class RouteNLPCRC(RouteNLP):
    """RouteNLP certified in expectation (conformal risk control) instead of with probability 1 - delta."""

    guarantee = "crc"


@register("RouteNLP (cascade routing)")
class RouteNLPCascadeRouting(RouteNLP):
    """Cascade routing's lookahead (expected quality - lambda x cost), lambda certified by LTT."""

    policy_family = "cascade_routing"


@register("RouteNLP (paper rule)")
class RouteNLPPaperRule(_RouterOwner):
    """The trained task-conditioned router + conformal cascade (the paper's rule, tuned as before)."""

    cascade = True
    certified = False

    def __init__(self, route_confidences: Sequence[float] = ROUTE_CONFIDENCES, alphas: Sequence[float] = ALPHAS,
                 rule: str = "risk", **settings: Any) -> None:
        super().__init__(route_confidences=tuple(route_confidences), alphas=tuple(alphas), rule=rule, **settings)

    # -------------------------------------------------------------------------------- pieces
    def start_tiers(self, probabilities: np.ndarray, route_confidence: float,
                    rows: Optional[np.ndarray] = None) -> np.ndarray:
        """1-based tier chosen by the proxy's rule for each row of router probabilities, among the
        tiers that serve the row's task (all tiers when ``rows`` is not given)."""
        every_tier = list(range(1, probabilities.shape[1] + 1))
        data = self.ctx.data
        eligible = [every_tier if rows is None else data.eligible_tiers(int(row))
                    for row in (rows if rows is not None else range(len(probabilities)))]
        return np.array([choose_tier(p, tiers, route_confidence)[0] for p, tiers in zip(probabilities, eligible)],
                        dtype=np.int64)

    def can_cascade(self) -> bool:
        data = self.ctx.data
        return self.cascade and data.K > 1 and bool(data.has_uncertainty[:-1].any())

    def fit_thresholds(self, rows: np.ndarray, start: np.ndarray, alpha: float,
                       portfolio: Optional[Portfolio] = None) -> Optional[dict]:
        """delta per tier and task on ``rows`` (1-based start tiers given), or None when it cannot be fitted."""
        data = self.ctx.data
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return fit_thresholds([data.records[i] for i in rows], portfolio or data.portfolio, start,
                                      alpha, self.settings["rule"], int(self.defaults["max_hops"]),
                                      str(self.defaults["no_logprobs_policy"]))
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
            thresholds = Thresholds.from_cells(scaled, alpha, "coopt.bench (calibrated on the calibration split)")
        # no thresholds: every answer is kept (the policy never escalates without a delta)
        policy = ConformalThresholds(thresholds, max_hops=int(self.defaults["max_hops"]),
                                     no_logprobs_policy=str(self.defaults["no_logprobs_policy"]))
        return policy_routes(policy, self.ctx.data, rows, starts=start)

    def calibrate_on(self, rows: np.ndarray, route_confidence: float, alpha: float,
                     portfolio: Optional[Portfolio] = None) -> Optional[dict]:
        """The project's ``calibrate`` on ``rows`` with the trained router replayed; None if impossible."""
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
                    routes = self.cascade_routes(calib, start, None, alpha)
                else:
                    tried = np.zeros((len(calib), data.K), dtype=bool)
                    final = np.zeros(len(calib), dtype=np.int64)
                    for fit_half in (halves, ~halves):
                        doc = self.fit_thresholds(calib[fit_half], start[fit_half], alpha)
                        part = self.cascade_routes(calib[~fit_half], start[~fit_half], doc, alpha)
                        tried[~fit_half], final[~fit_half] = part.tried, part.final
                    routes = Routes(rows=calib, tried=tried, final=final)
                candidates.append(({"route_confidence": route_confidence, "alpha": alpha},
                                   *scorer.score(routes.tried, routes.final)))
        self.operating_point = pick(candidates, ctx.target_quality)
        self.route_confidence = self.operating_point["route_confidence"]
        self.alpha = self.operating_point["alpha"]
        self.thresholds_doc = (self.calibrate_on(calib, self.route_confidence, self.alpha)
                               if self.alpha is not None else None)
        self.operating_point["policy"] = "conformal_thresholds"
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


    def curve(self, rows: np.ndarray) -> list[Routes]:
        """Test routes over the route-confidence grid at the fitted alpha/thresholds (APGR/CPT curve)."""
        return [self.route(rows, route_confidence=value) for value in self.settings["route_confidences"]]


@register("RouteNLP w/o cascade")
class RouteNLPNoCascade(RouteNLPPaperRule):
    cascade = False


@register("RouteNLP w/o task cond.")
class RouteNLPNoTask(RouteNLPPaperRule):
    task_conditioning = False
