"""Fit the post-answer quality estimators (issue 14 item 2) offline, on calibration rows.

:func:`fit_posterior` fits one L2-regularised logistic regression per (task, answered set S,
target tier j) on the features of :func:`litellm_routenlp.quality_estimates.features`,
standardised, with logit(ex-ante) as an offset so that the penalty shrinks the cell towards the
ex-ante estimate (:class:`OffsetLogistic`; without the offset it is scikit-learn's liblinear L2
logistic, which the tests check it against).  Standardisation is folded into the stored weights so
serving is numpy only.  Isotonic regression was considered
and not used: it calibrates one score, and these cells combine several signals (ex-ante logit, u,
agreement); the logistic model stays calibrated on held-out rows (see benchmarks/posterior_quality.py).

Which model serves a (task, S, j) (rule stored in the JSON ``info``), chosen by 3-fold
out-of-fold log-loss on the calibration rows so that a cell with little data cannot do worse than
what it replaces: a pooled cell (every task's rows; the task enters through the ex-ante logit) is
fitted when the rows have >= ``min_rows`` and >= ``min_per_class`` of each class, and kept only if
it beats the ex-ante estimate; a task gets its own cell (logistic, or the identity = ex-ante) when
that has a lower out-of-fold log-loss on the task's rows than what the task gets otherwise (the
pooled cell, else the ex-ante estimate); "lower" means by more than one standard error of the
per-row difference (so noise-fitting cells are not kept); the L2 strength is the ``Cs`` value
with the lowest out-of-fold log-loss.
With no cell, the tier keeps its ex-ante estimate.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from litellm_routenlp.quality_estimates import (LOGIT_CLIP, POOLED, AnswerSignals, PosteriorEstimator, cell_key, feature_names,
                                                features, signals_of_row)

MIN_ROWS = 40
MIN_PER_CLASS = 8
CS_DEFAULT = (0.03, 0.3, 3.0)  # inverse L2 strengths tried per cell (C * sum of log-losses + |theta|^2 / 2)
N_FOLDS = 3
RULE = ("per (answered set S, tier j): a pooled cell (all tasks) is fitted when the rows have >= min_rows and "
        ">= min_per_class of each class, and kept only if its out-of-fold log-loss beats the ex-ante estimate by "
        "more than one standard error; a task gets its own cell (logistic, or the identity = ex-ante) when that "
        "choice beats, by more than one standard error of out-of-fold log-loss on the task's rows, what the task "
        "would get otherwise (pooled cell, else ex-ante); a task cell needs the same row counts within the task. "
        "No cell: the ex-ante estimate.")


def all_sets(n_tiers: int, max_size: Optional[int] = None) -> list[tuple[int, ...]]:
    """Every non-empty set of 1-based tiers up to ``max_size`` answers (all of them by default)."""
    top = n_tiers if max_size is None else min(max_size, n_tiers)
    return [combo for size in range(1, top + 1) for combo in combinations(range(1, n_tiers + 1), size)]


class OffsetLogistic:
    """L2 logistic regression on standardised features, shrunk towards the ex-ante estimate.

    z = logit(ex-ante) + w . standardise(x) + b, minimising  C * sum(log-loss) + (|w|^2 + b^2) / 2.
    WHY not plain ``LogisticRegression``: its unpenalised intercept moves every cell to the
    calibration rows' acceptance rate, which on a few hundred rows is noisier than the router's
    estimate from the (larger) training split; here, with no evidence, the cell *is* the ex-ante
    estimate (column 0 of the features is logit(ex-ante), used as the offset).  With
    ``offset=False`` this is exactly scikit-learn's liblinear L2 logistic with a penalised intercept
    (``intercept_scaling=1``) after ``StandardScaler``; tests/test_quality_estimates.py checks that.
    Solved with scipy's L-BFGS (analytic gradient).
    """

    def __init__(self, C: float = 1.0, offset: bool = True) -> None:
        self.C, self.offset = float(C), offset

    def fit(self, X: np.ndarray, y: np.ndarray) -> "OffsetLogistic":
        from scipy.optimize import minimize

        X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
        self.mean_ = X.mean(axis=0)
        std = X.std(axis=0)
        self.scale_ = np.where(std > 1e-12, std, 1.0)
        Z = np.hstack([(X - self.mean_) / self.scale_, np.ones((len(X), 1))])
        base = X[:, 0] if self.offset else np.zeros(len(X))

        def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
            z = base + Z @ theta
            # log(1 + e^z) - y z, stably
            loss = np.sum(np.logaddexp(0.0, z) - y * z)
            gradient = Z.T @ (1.0 / (1.0 + np.exp(-z)) - y)
            return self.C * loss + 0.5 * theta @ theta, self.C * gradient + theta

        result = minimize(objective, np.zeros(Z.shape[1]), jac=True, method="L-BFGS-B",
                          options={"maxiter": 1000, "gtol": 1e-10})
        self.coef_, self.intercept_ = result.x[:-1], float(result.x[-1])
        return self

    def folded(self) -> tuple[np.ndarray, float]:
        """(weights, bias) on the raw features: what the serving cell stores."""
        weights = self.coef_ / self.scale_
        if self.offset:
            weights = weights.copy()
            weights[0] += 1.0
        return weights, float(self.intercept_ - np.sum(self.coef_ * self.mean_ / self.scale_))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        z = (X[:, 0] if self.offset else 0.0) + ((X - self.mean_) / self.scale_) @ self.coef_ + self.intercept_
        p = 1.0 / (1.0 + np.exp(-z))
        return np.stack([1.0 - p, p], axis=1)


def _fit_cell(X: np.ndarray, y: np.ndarray, C: float, seed: int):
    model = OffsetLogistic(C=C).fit(X, y)
    weights, bias = model.folded()
    return model, weights, bias


def _enough(y: np.ndarray, min_rows: int, min_per_class: int) -> bool:
    positives = int(y.sum())
    return len(y) >= min_rows and min(positives, len(y) - positives) >= min_per_class


def _fill_values(X: np.ndarray) -> np.ndarray:
    """Per column, the mean where present (0 for a column never present): what a missing value reads as."""
    present = ~np.isnan(X)
    sums = np.where(present, X, 0.0).sum(axis=0)
    counts = present.sum(axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)


def _filled(X: np.ndarray, fill: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(X), fill[None, :], X)


def _row_losses(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def _clearly_better(candidate: np.ndarray, baseline: np.ndarray, y: np.ndarray) -> bool:
    """One-standard-error rule: the candidate's out-of-fold log-loss is lower by more than one SE.

    WHY: choosing on the calibration rows alone favours fitting their own noise (a cell that only
    re-estimates the acceptance rate from ~200 rows loses to the router's estimate on new rows).
    """
    difference = _row_losses(candidate, y) - _row_losses(baseline, y)
    se = difference.std(ddof=1) / np.sqrt(len(difference)) if len(difference) > 1 else np.inf
    return bool(difference.mean() + se < 0.0)


def _logloss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def _out_of_fold(X: np.ndarray, y: np.ndarray, folds: np.ndarray, n_folds: int, C: float, seed: int) -> np.ndarray:
    """Out-of-fold P(acceptable) of a cell's logistic model (a fold with one class predicts its rate)."""
    out = np.empty(len(y))
    for fold in range(n_folds):
        held, kept = folds == fold, folds != fold
        if not held.any():
            continue
        if len(np.unique(y[kept])) < 2:
            out[held] = y[kept].mean() if kept.any() else 0.5
            continue
        out[held] = _fit_cell(X[kept], y[kept], C, seed)[0].predict_proba(X[held])[:, 1]
    return out


def fit_posterior_models(tasks: Sequence[str], ex_ante: np.ndarray, acceptable: np.ndarray,
                         uncertainty: Optional[np.ndarray] = None, outputs: Optional[Sequence[Sequence[Optional[str]]]] = None,
                         margins: Optional[np.ndarray] = None, sets: Optional[Iterable[Sequence[int]]] = None,
                         min_rows: int = MIN_ROWS, min_per_class: int = MIN_PER_CLASS, Cs: Sequence[float] = CS_DEFAULT,
                         n_folds: int = N_FOLDS, seed: int = 0) -> tuple[PosteriorEstimator, dict[str, Any]]:
    """:func:`fit_posterior`, also returning the fitted sklearn pipelines by cell key (for tests).

    Identity cells (the ex-ante estimate chosen by cross-validation) have no pipeline.
    """
    ex_ante = np.asarray(ex_ante, dtype=np.float64)
    acceptable = np.asarray(acceptable).astype(bool)
    n, K = ex_ante.shape
    if acceptable.shape != (n, K) or len(tasks) != n:
        raise ValueError(f"ex_ante {ex_ante.shape}, acceptable {acceptable.shape} and {len(tasks)} tasks must match")
    if uncertainty is None:
        uncertainty = np.full((n, K), np.nan)
    uncertainty = np.asarray(uncertainty, dtype=np.float64)
    if uncertainty.shape != (n, K):
        raise ValueError(f"uncertainty has shape {uncertainty.shape}, expected {(n, K)}")
    if outputs is not None and len(outputs) != n:
        raise ValueError(f"{len(outputs)} output rows for {n} rows")
    task_array = np.asarray(list(tasks))
    task_names = sorted(set(task_array.tolist()))
    folds = np.random.default_rng([seed, 14]).permutation(n) % n_folds
    chosen = [tuple(sorted(s)) for s in (sets if sets is not None else all_sets(K))]
    cells: dict[str, dict[str, Any]] = {}
    models: dict[str, Any] = {}
    counts = {"task": 0, "pooled": 0, "ex_ante": 0}
    base = np.clip(ex_ante, LOGIT_CLIP, 1 - LOGIT_CLIP)  # what an identity cell serves

    def store(task: str, answered: tuple[int, ...], j: int, X: np.ndarray, y: np.ndarray,
              C: Optional[float], fill: np.ndarray) -> None:
        key = cell_key(task, answered, j)
        names = feature_names(answered)
        if C is None:  # identity: sigmoid(logit(ex-ante)) is the ex-ante estimate
            weights, bias, fill = np.eye(1, len(names))[0], 0.0, np.zeros(len(names))
            counts["ex_ante"] += 1
        else:
            models[key], weights, bias = _fit_cell(X, y, C, seed)
            counts["pooled" if task == POOLED else "task"] += 1
        cells[key] = {"weights": weights.tolist(), "bias": bias, "fill": fill.tolist(), "features": names}

    for answered in chosen:
        X = np.stack([features(ex_ante[row], signals_of_row(uncertainty[row], None if outputs is None else outputs[row],
                                                            answered, None if margins is None else margins[row]))
                      for row in range(n)])  # (n, K, d)
        for j in range(1, K + 1):
            y, ex = acceptable[:, j - 1].astype(int), base[:, j - 1]
            if not _enough(y, min_rows, min_per_class):
                continue  # no pooled cell: every task keeps its ex-ante estimate
            pooled_fill = _fill_values(X[:, j - 1])
            Xj = _filled(X[:, j - 1], pooled_fill)
            pooled_oof = {C: _out_of_fold(Xj, y, folds, n_folds, C, seed) for C in Cs}
            pooled_C = min(Cs, key=lambda C: _logloss(pooled_oof[C], y))
            pooled_wins = _clearly_better(pooled_oof[pooled_C], ex, y)
            store(POOLED, answered, j, Xj, y, pooled_C if pooled_wins else None, pooled_fill)
            for task in task_names if len(task_names) > 1 else ():  # one task: its rows are the pooled rows
                mask = task_array == task
                if not _enough(y[mask], min_rows, min_per_class):
                    continue  # too few rows to choose for this task: the pooled cell (or ex-ante) serves it
                task_fill = _fill_values(X[mask, j - 1])
                Xt = _filled(X[mask, j - 1], task_fill)
                # what this task's rows get without a cell of their own
                fallback = pooled_oof[pooled_C][mask] if pooled_wins else ex[mask]
                predictions: dict[Optional[float], np.ndarray] = {None: ex[mask]}
                for C in Cs:
                    predictions[C] = _out_of_fold(Xt, y[mask], folds[mask], n_folds, C, seed)
                best = min(predictions, key=lambda C: _logloss(predictions[C], y[mask]))
                if _clearly_better(predictions[best], fallback, y[mask]):
                    store(task, answered, j, Xt, y[mask], best, task_fill)
    info = {"fitted_by": "calibration.quality_estimators.fit_posterior", "n_rows": int(n), "Cs": list(Cs),
            "n_folds": n_folds, "min_rows": min_rows, "min_per_class": min_per_class, "cells": counts,
            "rule": RULE}
    return PosteriorEstimator(K, cells, info), models


def fit_posterior(tasks: Sequence[str], ex_ante: np.ndarray, acceptable: np.ndarray,
                  uncertainty: Optional[np.ndarray] = None, outputs: Optional[Sequence[Sequence[Optional[str]]]] = None,
                  margins: Optional[np.ndarray] = None, sets: Optional[Iterable[Sequence[int]]] = None,
                  min_rows: int = MIN_ROWS, min_per_class: int = MIN_PER_CLASS, Cs: Sequence[float] = CS_DEFAULT,
                  n_folds: int = N_FOLDS, seed: int = 0) -> PosteriorEstimator:
    """Fit P(tier j acceptable | task, ex-ante, answers of S) on calibration rows.

    ``tasks`` (n,), ``ex_ante`` (n, K) the router's acceptance estimates (out of sample for these
    rows), ``acceptable`` (n, K) the labels (quality >= tau), ``uncertainty`` (n, K) u per tier
    (NaN: that tier gives no logprobs), ``outputs`` n rows of K answer texts (None: unknown),
    ``margins`` (n, K) top-token margins (NaN: unknown); ``sets`` the answered sets to fit (default
    every non-empty subset of the tiers).  See the module docstring for the small-cell rule.
    """
    return fit_posterior_models(tasks, ex_ante, acceptable, uncertainty, outputs, margins, sets, min_rows,
                                min_per_class, Cs, n_folds, seed)[0]


def bench_outputs(data: Any) -> list[list[Optional[str]]]:
    """Per row of a :class:`coopt.bench.data.BenchData`, each tier's recorded answer text."""
    return [[record.tiers[name].output for name in data.tier_names] for record in data.records]


def posterior_signals(data: Any, row: int, answered: Sequence[int], outputs: Optional[list] = None) -> list[AnswerSignals]:
    """The AnswerSignals the proxy would see for ``row`` after tiers ``answered`` of BenchData ``data``."""
    return signals_of_row(data.uncertainty[row], None if outputs is None else outputs[row], answered)
