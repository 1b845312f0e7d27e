"""Fit the post-answer quality estimators (issue 14 item 2) offline, on calibration rows.

:func:`fit_posterior` fits one L2-regularised logistic regression (scikit-learn's
``LogisticRegression``: maintained, exact ``predict_proba`` we can reproduce with a dot product) per
(task, answered set S, target tier j) on the features of
:func:`litellm_routenlp.quality_estimates.features`, standardised by ``StandardScaler``; the scaler
is folded into the stored weights so serving is numpy only.  Isotonic regression was considered
and not used: it calibrates one score, and these cells combine several signals (ex-ante logit, u,
agreement); the logistic model stays calibrated on held-out rows (see benchmarks/posterior_quality.py).

Rule for small cells (documented in the JSON ``info``): a (task, S, j) cell is fitted only when the
task has at least ``min_rows`` calibration rows and each class (acceptable / not) has at least
``min_per_class`` of them; otherwise the task's rows are served by the pooled cell (every task's
rows together, the task entering only through the ex-ante logit), fitted under the same rule; and
when that too is short, the tier keeps its ex-ante estimate (no model is stored).
"""

from __future__ import annotations

from itertools import combinations
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from litellm_routenlp.quality_estimates import (POOLED, AnswerSignals, PosteriorEstimator, cell_key, feature_names,
                                                features, signals_of_row)

MIN_ROWS = 40
MIN_PER_CLASS = 8
C_DEFAULT = 1.0


def all_sets(n_tiers: int, max_size: Optional[int] = None) -> list[tuple[int, ...]]:
    """Every non-empty set of 1-based tiers up to ``max_size`` answers (all of them by default)."""
    top = n_tiers if max_size is None else min(max_size, n_tiers)
    return [combo for size in range(1, top + 1) for combo in combinations(range(1, n_tiers + 1), size)]


def _fit_cell(X: np.ndarray, y: np.ndarray, C: float, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000, random_state=seed))  # L2: the default
    model.fit(X, y)
    scaler, logistic = model[0], model[1]
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    weights = logistic.coef_[0] / scale
    bias = float(logistic.intercept_[0] - np.sum(logistic.coef_[0] * scaler.mean_ / scale))
    return model, weights, bias


def _enough(y: np.ndarray, min_rows: int, min_per_class: int) -> bool:
    positives = int(y.sum())
    return len(y) >= min_rows and min(positives, len(y) - positives) >= min_per_class


def fit_posterior_models(tasks: Sequence[str], ex_ante: np.ndarray, acceptable: np.ndarray,
                         uncertainty: Optional[np.ndarray] = None, outputs: Optional[Sequence[Sequence[Optional[str]]]] = None,
                         margins: Optional[np.ndarray] = None, sets: Optional[Iterable[Sequence[int]]] = None,
                         min_rows: int = MIN_ROWS, min_per_class: int = MIN_PER_CLASS, C: float = C_DEFAULT,
                         seed: int = 0) -> tuple[PosteriorEstimator, dict[str, Any]]:
    """:func:`fit_posterior`, also returning the fitted sklearn pipelines by cell key (for tests)."""
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
    chosen = [tuple(sorted(s)) for s in (sets if sets is not None else all_sets(K))]
    cells: dict[str, dict[str, Any]] = {}
    models: dict[str, Any] = {}
    counts = {"task": 0, "pooled": 0}
    for answered in chosen:
        X = np.stack([features(ex_ante[row], signals_of_row(uncertainty[row], None if outputs is None else outputs[row],
                                                            answered, None if margins is None else margins[row]))
                      for row in range(n)])  # (n, K, d)
        for j in range(1, K + 1):
            y = acceptable[:, j - 1]
            groups = [(POOLED, np.ones(n, bool))] + [(task, task_array == task) for task in sorted(set(tasks))]
            for task, mask in groups:
                if not _enough(y[mask], min_rows, min_per_class):
                    continue
                model, weights, bias = _fit_cell(X[mask, j - 1], y[mask].astype(int), C, seed)
                key = cell_key(task, answered, j)
                cells[key] = {"weights": weights.tolist(), "bias": bias, "features": feature_names(answered)}
                models[key] = model
                counts["pooled" if task == POOLED else "task"] += 1
    info = {"fitted_by": "calibration.quality_estimators.fit_posterior", "n_rows": int(n), "C": C,
            "min_rows": min_rows, "min_per_class": min_per_class, "cells": counts,
            "rule": "task cell if the task has >= min_rows rows and >= min_per_class of each class; else the "
                    "pooled cell (all tasks) under the same rule; else the ex-ante estimate"}
    return PosteriorEstimator(K, cells, info), models


def fit_posterior(tasks: Sequence[str], ex_ante: np.ndarray, acceptable: np.ndarray,
                  uncertainty: Optional[np.ndarray] = None, outputs: Optional[Sequence[Sequence[Optional[str]]]] = None,
                  margins: Optional[np.ndarray] = None, sets: Optional[Iterable[Sequence[int]]] = None,
                  min_rows: int = MIN_ROWS, min_per_class: int = MIN_PER_CLASS, C: float = C_DEFAULT,
                  seed: int = 0) -> PosteriorEstimator:
    """Fit P(tier j acceptable | task, ex-ante, answers of S) on calibration rows.

    ``tasks`` (n,), ``ex_ante`` (n, K) the router's acceptance estimates (out of sample for these
    rows), ``acceptable`` (n, K) the labels (quality >= tau), ``uncertainty`` (n, K) u per tier
    (NaN: that tier gives no logprobs), ``outputs`` n rows of K answer texts (None: unknown),
    ``margins`` (n, K) top-token margins (NaN: unknown); ``sets`` the answered sets to fit (default
    every non-empty subset of the tiers).  See the module docstring for the small-cell rule.
    """
    return fit_posterior_models(tasks, ex_ante, acceptable, uncertainty, outputs, margins, sets, min_rows,
                                min_per_class, C, seed)[0]


def bench_outputs(data: Any) -> list[list[Optional[str]]]:
    """Per row of a :class:`coopt.bench.data.BenchData`, each tier's recorded answer text."""
    return [[record.tiers[name].output for name in data.tier_names] for record in data.records]


def posterior_signals(data: Any, row: int, answered: Sequence[int], outputs: Optional[list] = None) -> list[AnswerSignals]:
    """The AnswerSignals the proxy would see for ``row`` after tiers ``answered`` of BenchData ``data``."""
    return signals_of_row(data.uncertainty[row], None if outputs is None else outputs[row], answered)
