"""The learned baselines, each extended to K cost-ordered tiers (the paper's Appendix E).

All read the same query features: the frozen MiniLM embedding the router uses, plus a task one-hot
where the method would know the task.  Each learns on the training rows only and picks its knob on
the calibration rows with :func:`coopt.bench.systems.pick` (cheapest setting at the target quality).

* **RouteLLM** (BERT-classifier router, Ong et al. 2024): a K-class classifier of the cheapest
  acceptable tier trained with cross-entropy (multinomial logistic regression on the frozen
  encoder, the classifier head of RouteLLM's BERT router); a query goes to the cheapest tier j whose
  cumulative win probability P(label <= j) reaches the threshold, RouteLLM's threshold rule with K
  classes.  It does not see the task (RouteLLM routes on the prompt alone).
* **Hybrid LLM** (Ding et al. 2024): per cheaper tier k a classifier of the quality gap,
  P(q_k >= q_top - t) (t = 0 on 0/1 metrics); the cheapest tier whose probability reaches the
  threshold answers, else the top tier.
* **kNN router** (Li et al. 2025): the k nearest training queries of the same task (cosine on the
  embedding) vote on each tier's acceptability; cheapest tier whose vote share reaches the threshold.
* **FrugalGPT** (Chen et al. 2023): a cascade in cost order over a learned subset of tiers; after
  each answer a per-tier scorer (logistic regression on the query embedding, task and that answer's
  uncertainty) estimates P(answer acceptable) and the answer is kept when it reaches the tier's
  threshold.  The subset and the thresholds are searched jointly.
* **AutoMix** (Madaan et al. 2024), K actions: start at T1; after tier k answers, its uncertainty
  (the stand-in for AutoMix's self-verification score) is binned, and the belief
  P(tier j acceptable | task, bin) estimated on the training rows picks the action among "keep" and
  "go to tier j > k" that maximises P(acceptable) - mu * normalised extra cost (a one-step POMDP
  policy); mu is the knob.  Without an uncertainty signal every query falls in one bin.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any, Callable

import numpy as np

from coopt.bench.metrics import Routes
from coopt.bench.systems import FitContext, RatioScorer, RoutingSystem, cheapest_confident, knob_grid, register


def fit_classifier(X: np.ndarray, y: np.ndarray, n_classes: int, C: float = 1.0) -> Callable[[np.ndarray], np.ndarray]:
    """Logistic regression (multinomial) returning (n, n_classes) probabilities; constant if one class."""
    classes = np.unique(y)
    if len(classes) == 1:
        constant = np.zeros(n_classes)
        constant[int(classes[0])] = 1.0
        return lambda Z: np.tile(constant, (len(Z), 1))
    from sklearn.linear_model import LogisticRegression  # local: scikit-learn costs ~1.2 s to import

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LogisticRegression(C=C, max_iter=300).fit(X, y)

    def predict(Z: np.ndarray) -> np.ndarray:
        out = np.zeros((len(Z), n_classes))
        out[:, model.classes_.astype(int)] = model.predict_proba(Z)
        return out

    return predict


class _ThresholdRouter(RoutingSystem):
    """Shared shape: per-tier scores on calibration rows -> one threshold chosen by :func:`pick`."""

    def scores(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def fit(self, ctx: FitContext) -> None:
        super().fit(ctx)
        self.learn(ctx)
        calib = ctx.split.calib
        scores = self.scores(calib)
        scorer = RatioScorer(ctx.data, calib)
        candidates = [({"threshold": float(t)}, *scorer.score_single(cheapest_confident(scores, t)))
                      for t in knob_grid(scores)]
        self.operating_point = {**self.operating_point, **self.pick(candidates, scorer)}

    def learn(self, ctx: FitContext) -> None:
        raise NotImplementedError

    def route(self, rows: np.ndarray) -> Routes:
        tiers = cheapest_confident(self.scores(rows), self.operating_point["threshold"])
        return Routes.single(rows, tiers, self.ctx.data.K)

    def curve(self, rows: np.ndarray) -> list[Routes]:
        """Routes over the threshold grid (the APGR/CPT curve on 2-tier sets)."""
        scores = self.scores(rows)
        return [Routes.single(rows, cheapest_confident(scores, t), self.ctx.data.K) for t in knob_grid(scores)]


@register("RouteLLM")
class RouteLLM(_ThresholdRouter):
    def learn(self, ctx: FitContext) -> None:
        data, train = ctx.data, ctx.split.train
        self.predict = fit_classifier(data.embeddings[train], data.oracle_tier[train], data.K)

    def scores(self, rows: np.ndarray) -> np.ndarray:
        return np.minimum(np.cumsum(self.predict(self.ctx.data.embeddings[rows]), axis=1), 1.0)


@register("Hybrid LLM")
class HybridLLM(_ThresholdRouter):
    def learn(self, ctx: FitContext) -> None:
        data, train = ctx.data, ctx.split.train
        gap = float(self.settings.get("gap", 0.0))
        top = data.K - 1
        X = data.features(train)
        self.predictors = []
        for k in range(data.K - 1):
            label = (data.quality[train, k] >= data.quality[train, top] - gap).astype(np.int64)
            self.predictors.append(fit_classifier(X, label, 2))
        self.operating_point = {"gap": gap}

    def scores(self, rows: np.ndarray) -> np.ndarray:
        X = self.ctx.data.features(rows)
        columns = [predict(X)[:, 1] for predict in self.predictors] + [np.ones(len(rows))]
        return np.stack(columns, axis=1)


@register("kNN")
class KNNRouter(RoutingSystem):
    NEIGHBOURS = (5, 10, 25)

    def fit(self, ctx: FitContext) -> None:
        super().fit(ctx)
        calib = ctx.split.calib
        scorer = RatioScorer(ctx.data, calib)
        votes = self._votes(calib)
        candidates = []
        for k, vote in votes.items():
            for t in knob_grid(vote):
                candidates.append(({"k": k, "threshold": float(t)}, *scorer.score_single(cheapest_confident(vote, t))))
        self.operating_point = self.pick(candidates, scorer)

    def _votes(self, rows: np.ndarray) -> dict[int, np.ndarray]:
        """Acceptability vote share per tier among the k nearest same-task training queries."""
        data, train = self.ctx.data, self.ctx.split.train
        largest = max(self.NEIGHBOURS)
        out = {k: np.zeros((len(rows), data.K)) for k in self.NEIGHBOURS}
        for task in np.unique(data.task_ids[rows]):
            query_mask = data.task_ids[rows] == task
            pool = train[data.task_ids[train] == task]
            if len(pool) == 0:
                pool = train
            pool_embeddings = data.embeddings[pool]
            accept = data.acceptable[pool].astype(np.float64)
            query_rows = np.nonzero(query_mask)[0]
            for start in range(0, len(query_rows), 1024):
                chunk = query_rows[start:start + 1024]
                similarity = data.embeddings[rows[chunk]] @ pool_embeddings.T
                m = min(largest, len(pool))
                nearest = np.argpartition(-similarity, m - 1, axis=1)[:, :m]
                order = np.take_along_axis(similarity, nearest, axis=1).argsort(axis=1)[:, ::-1]
                nearest = np.take_along_axis(nearest, order, axis=1)
                for k in self.NEIGHBOURS:
                    out[k][chunk] = accept[nearest[:, :min(k, m)]].mean(axis=1)
        for vote in out.values():
            vote[:, -1] = 1.0
        return out

    def route(self, rows: np.ndarray) -> Routes:
        vote = self._votes(rows)[self.operating_point["k"]]
        return Routes.single(rows, cheapest_confident(vote, self.operating_point["threshold"]), self.ctx.data.K)

    def curve(self, rows: np.ndarray) -> list[Routes]:
        vote = self._votes(rows)[self.operating_point["k"]]
        return [Routes.single(rows, cheapest_confident(vote, t), self.ctx.data.K) for t in knob_grid(vote)]


def _answer_features(data: Any, rows: np.ndarray, tier: int) -> np.ndarray:
    u = data.uncertainty[rows, tier]
    missing = np.isnan(u)
    return np.concatenate([data.features(rows), np.where(missing, 0.0, u)[:, None], missing[:, None]], axis=1)


@register("FrugalGPT")
class FrugalGPT(RoutingSystem):
    QUANTILES = tuple(np.linspace(0.0, 0.9, 10))

    def fit(self, ctx: FitContext) -> None:
        super().fit(ctx)
        data, train, calib = ctx.data, ctx.split.train, ctx.split.calib
        K = data.K
        self.scorers = [fit_classifier(_answer_features(data, train, k), data.acceptable[train, k].astype(np.int64), 2)
                        for k in range(K - 1)]
        scores = self._scores(calib)
        scorer = RatioScorer(data, calib)
        candidates = []
        for size in range(K):
            for subset in itertools.combinations(range(K - 1), size):
                grids = [np.unique(np.quantile(scores[:, k], self.QUANTILES)) for k in subset]
                for thresholds in itertools.product(*grids):
                    tried, final = self._cascade(scores, subset, thresholds)
                    candidates.append(({"tiers": [data.tier_names[k] for k in subset] + [data.tier_names[-1]],
                                        "thresholds": [float(t) for t in thresholds]},
                                       *scorer.score(tried, final)))
        self.operating_point = self.pick(candidates, scorer)

    def _scores(self, rows: np.ndarray) -> np.ndarray:
        data = self.ctx.data
        columns = [self.scorers[k](_answer_features(data, rows, k))[:, 1] for k in range(data.K - 1)]
        return np.stack(columns + [np.ones(len(rows))], axis=1)

    def _cascade(self, scores: np.ndarray, subset: tuple[int, ...], thresholds: tuple[float, ...]):
        n, K = scores.shape
        tried = np.zeros((n, K), dtype=bool)
        final = np.full(n, K - 1, dtype=np.int64)
        pending = np.ones(n, dtype=bool)
        for k, threshold in zip(subset, thresholds):
            tried[pending, k] = True
            keep = pending & (scores[:, k] >= threshold)
            final[keep] = k
            pending &= ~keep
        tried[pending, K - 1] = True
        return tried, final

    def route(self, rows: np.ndarray) -> Routes:
        data = self.ctx.data
        subset = tuple(data.tier_names.index(name) for name in self.operating_point["tiers"][:-1])
        tried, final = self._cascade(self._scores(rows), subset, tuple(self.operating_point["thresholds"]))
        return Routes(rows=rows, tried=tried, final=final)


@register("AutoMix")
class AutoMix(RoutingSystem):
    BINS = 5
    MUS = tuple(np.round(np.concatenate([[0.0], np.geomspace(0.001, 10.0, 25)]), 6))

    def fit(self, ctx: FitContext) -> None:
        super().fit(ctx)
        data, train, calib = ctx.data, ctx.split.train, ctx.split.calib
        K, T = data.K, len(data.tasks)
        self.edges = np.zeros((T, K, self.BINS - 1))
        self.belief = np.zeros((T, K, self.BINS, K))   # P(tier j acceptable | task, u-bin at tier k)
        self.cost = np.zeros((T, K))                    # mean cost per tier / top tier's, per task
        for t in range(T):
            rows = train[data.task_ids[train] == t]
            if len(rows) == 0:
                rows = train
            accept = data.acceptable[rows].astype(np.float64)
            prior = (accept.sum(axis=0) + 1.0) / (len(rows) + 2.0)
            mean_cost = data.cost[rows].mean(axis=0)
            self.cost[t] = mean_cost / max(mean_cost[-1], 1e-300)
            for k in range(K):
                u = data.uncertainty[rows, k]
                known = ~np.isnan(u)
                self.edges[t, k] = np.quantile(u[known], np.linspace(0, 1, self.BINS + 1)[1:-1]) if known.sum() > self.BINS else np.inf
                bins = self._bin(u, t, k)
                for b in range(self.BINS):
                    in_bin = bins == b
                    # Laplace-style smoothing toward the task's prior (weight 2 pseudo-queries)
                    self.belief[t, k, b] = (accept[in_bin].sum(axis=0) + 2.0 * prior) / (in_bin.sum() + 2.0)
        scorer = RatioScorer(data, calib)
        candidates = [({"mu": float(mu)}, *scorer.score(*self._policy(calib, mu))) for mu in self.MUS]
        self.operating_point = self.pick(candidates, scorer)

    def _bin(self, u: np.ndarray, task: int, tier: int) -> np.ndarray:
        bins = np.searchsorted(self.edges[task, tier], np.where(np.isnan(u), np.inf, u), side="right")
        return np.minimum(bins, self.BINS - 1)

    def _policy(self, rows: np.ndarray, mu: float) -> tuple[np.ndarray, np.ndarray]:
        data = self.ctx.data
        n, K = len(rows), data.K
        tried = np.zeros((n, K), dtype=bool)
        final = np.full(n, -1, dtype=np.int64)
        at = np.zeros(n, dtype=np.int64)              # every query starts at T1
        tasks = data.task_ids[rows]
        for k in range(K):
            here = np.nonzero((at == k) & (final < 0))[0]
            if here.size == 0:
                continue
            tried[here, k] = True
            if k == K - 1:
                final[here] = k
                break
            bins = np.zeros(here.size, dtype=np.int64)
            for t in np.unique(tasks[here]):
                m = tasks[here] == t
                bins[m] = self._bin(data.uncertainty[rows[here[m]], k], t, k)
            belief = self.belief[tasks[here], k, bins]                    # (m, K)
            extra = self.cost[tasks[here]] * (np.arange(K) > k)           # cost of moving to j
            value = belief - mu * extra
            value[:, :k] = -np.inf
            action = value.argmax(axis=1)
            stay = action == k
            final[here[stay]] = k
            at[here[~stay]] = action[~stay]
        return tried, final

    def route(self, rows: np.ndarray) -> Routes:
        tried, final = self._policy(rows, self.operating_point["mu"])
        return Routes(rows=rows, tried=tried, final=final)

    def curve(self, rows: np.ndarray) -> list[Routes]:
        return [Routes(rows, *self._policy(rows, mu)) for mu in self.MUS]
