"""Paired bootstrap of RouteNLP against a baseline over the same test queries.

Both systems answered the same test queries of each seed, so each resample draws query indices
once and scores both systems on them (paired): the noise both share cancels out.  A resample draws
every seed's test set with replacement; the statistic is the difference of the volume-weighted
ratio (:mod:`coopt.bench.metrics`), averaged over seeds.

p-values (with the +1 correction, so never exactly 0):

* ``p_cost``: one-sided, H0 "RouteNLP costs at least as much as the baseline": the share of
  resamples where RouteNLP's cost ratio >= the baseline's.
* ``p_quality``: two-sided, H0 "same quality ratio".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class PairedSample:
    """One seed's test queries: per-query values of system A, system B and the reference (top tier)."""

    a: np.ndarray
    b: np.ndarray
    reference: np.ndarray
    task_ids: np.ndarray


def _ratio(counts: np.ndarray, values: np.ndarray, reference: np.ndarray, task_ids: np.ndarray) -> np.ndarray:
    """Volume-weighted ratio for each resample (row of ``counts``)."""
    total = np.zeros(counts.shape[0])
    n = counts.sum(axis=1)
    for task in np.unique(task_ids):
        mask = task_ids == task
        weight = counts[:, mask].sum(axis=1)
        numerator = counts[:, mask] @ values[mask]
        denominator = counts[:, mask] @ reference[mask]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0),
                             np.where(numerator == 0, 1.0, np.inf))
        total += weight / n * ratio
    return total


def paired_bootstrap(samples: Sequence[PairedSample], n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Bootstrap distribution of mean-over-seeds (ratio(A) - ratio(B)); see the module docstring.

    Returns the observed difference, its 95% percentile interval, the one-sided p-value that A is
    not below B (``p_lower``) and the two-sided p-value (``p_two_sided``).
    """
    if not samples:
        raise ValueError("no samples")
    rng = np.random.default_rng(seed)
    deltas = np.zeros(n_boot)
    observed = 0.0
    for sample in samples:
        n = len(sample.a)
        ones = np.ones((1, n))
        observed += (_ratio(ones, sample.a, sample.reference, sample.task_ids)
                     - _ratio(ones, sample.b, sample.reference, sample.task_ids))[0]
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
        deltas += (_ratio(counts, sample.a, sample.reference, sample.task_ids)
                   - _ratio(counts, sample.b, sample.reference, sample.task_ids))
    deltas /= len(samples)
    observed /= len(samples)
    at_least = (np.sum(deltas >= 0) + 1) / (n_boot + 1)
    at_most = (np.sum(deltas <= 0) + 1) / (n_boot + 1)
    return {"delta": float(observed), "ci95": [float(np.percentile(deltas, 2.5)), float(np.percentile(deltas, 97.5))],
            "p_lower": float(at_least), "p_two_sided": float(min(1.0, 2 * min(at_least, at_most)))}
