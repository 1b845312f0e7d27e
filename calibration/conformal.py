"""Conformal thresholds for the cascade: when is a tier's answer kept, when is it escalated.

A tier k answering a query of task t keeps its answer when its uncertainty u <= delta[k][t] and
escalates otherwise.  Two rules to pick delta from calibration queries are implemented; both are
distribution-free and valid when calibration and live queries reaching the tier are exchangeable.

``fit_delta`` (DESIGN §3, the paper's rule; "coverage"): delta is the ceil((1-alpha)(n0+1))-th
smallest uncertainty among the n0 correctly handled queries.  Guarantee: a new *correct* answer is
kept with probability >= 1 - alpha, i.e. at most alpha of the good answers are escalated needlessly.
It does NOT bound the rate of *wrong* answers kept.  Measured on cascades_9llm MedMCQA (all 1,000
queries, alpha 0.05): Pr[q < tau and u <= delta] = 0.60 / 0.42 / 0.21 / 0.18 for
llama3.2-1b / llama3.1-8b / llama3.1-70b / gpt-4o, because log-probabilities separate right from
wrong answers only weakly.

``fit_delta_risk`` (conformal risk control, Angelopoulos et al. 2022; "risk"): the loss of a query
is 1[q < tau and u <= delta], non-decreasing in delta and bounded by 1, so the largest delta with
(n * R_hat(delta) + 1) / (n + 1) <= alpha guarantees E[violation] <= alpha on a new query.  This is
the guarantee the reported violation rate Pr[q < tau and u <= delta] speaks about; on the same data
it gives 0.049 for every tier, at the price of escalating more.

:func:`violation_rate` and :func:`wilson_interval` measure what either rule achieved.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

#: delta when no threshold can be certified: escalate everything except answers with zero
#: uncertainty.  The proxy's thresholds reader accepts non-negative numbers only, and 0.0 is the
#: smallest; it fails safe (costs more, never keeps an uncertain answer unchecked).
ESCALATE_ALL_DELTA = 0.0


class InsufficientCalibrationError(ValueError):
    """Too few usable calibration queries for the requested alpha (the message says how many)."""


def _as_arrays(uncertainties: Sequence[Optional[float]], other: Sequence[float], name: str) -> tuple[np.ndarray, np.ndarray]:
    u = np.asarray([np.nan if value is None else value for value in uncertainties], dtype=np.float64)
    o = np.asarray(other, dtype=np.float64)
    if u.shape != o.shape or u.ndim != 1:
        raise ValueError(f"uncertainties and {name} must be 1-d and of equal length, got {u.shape} and {o.shape}")
    if np.any(u[~np.isnan(u)] < 0):
        raise ValueError("uncertainties must be >= 0")
    return u, o


def conformal_rank(n: int, alpha: float) -> int:
    """ceil((1 - alpha)(n + 1)): the order statistic a split-conformal quantile uses."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    # a tiny tolerance so that e.g. (1 - 0.05) * 20 = 19.000000000000004 does not round up to 20
    return int(math.ceil((1.0 - alpha) * (n + 1) - 1e-9))


def fit_delta(uncertainties: Sequence[Optional[float]], correct: Sequence[bool], alpha: float = 0.05) -> float:
    """The paper's rule: the ceil((1-alpha)(n0+1))-th smallest uncertainty among correct queries.

    Queries without an uncertainty (None/NaN) are ignored: no threshold can act on them.
    When the rank exceeds n0 (n0 < (1 - alpha) / alpha, e.g. fewer than 19 correct answers at
    alpha = 0.05) the conformal quantile is +infinity: keep every answer.  That is valid for this
    rule's guarantee but unsafe for quality, so this raises :class:`InsufficientCalibrationError`
    instead and lets the caller decide (``calibrate`` then escalates everything, delta = 0.0).
    """
    u, c = _as_arrays(uncertainties, correct, "correct")
    usable = ~np.isnan(u)
    correct_u = np.sort(u[usable & (c > 0)])
    n0 = len(correct_u)
    if n0 == 0:
        raise InsufficientCalibrationError("no correctly handled query with an uncertainty")
    rank = conformal_rank(n0, alpha)
    if rank > n0:
        raise InsufficientCalibrationError(
            f"{n0} correctly handled queries; alpha={alpha} needs at least {math.ceil((1 - alpha) / alpha)}")
    return float(correct_u[rank - 1])


def fit_delta_risk(uncertainties: Sequence[Optional[float]], quality: Sequence[float], tau: float,
                   alpha: float = 0.05) -> float:
    """Conformal risk control of Pr[q < tau and u <= delta]: the largest safe observed uncertainty.

    Loss L_i(delta) = 1[q_i < tau and u_i <= delta].  delta is the largest observed u_j such that
    #{i : q_i < tau, u_i <= u_j} + 1 <= alpha (n + 1), which gives E[L_new(delta)] <= alpha.
    Raises :class:`InsufficientCalibrationError` when not even the smallest uncertainty is safe
    (always when n < 1/alpha - 1: nothing can be certified from so few queries).
    """
    u, q = _as_arrays(uncertainties, quality, "quality")
    usable = ~np.isnan(u)
    u, q = u[usable], q[usable]
    n = len(u)
    if n == 0:
        raise InsufficientCalibrationError("no calibration query with an uncertainty")
    budget = alpha * (n + 1) - 1.0  # how many bad answers may be kept
    order = np.argsort(u, kind="stable")
    u_sorted, bad_sorted = u[order], (q[order] < tau)
    # number of bad answers kept at delta = u_sorted[j] counts every tie of u_sorted[j]
    bad_cumulative = np.cumsum(bad_sorted)
    last_of_value = np.searchsorted(u_sorted, u_sorted, side="right") - 1
    bad_kept = bad_cumulative[last_of_value]
    safe = np.nonzero(bad_kept <= budget + 1e-9)[0]
    if len(safe) == 0:
        raise InsufficientCalibrationError(
            f"{n} queries; alpha={alpha} cannot certify any threshold "
            f"(needs n >= {math.ceil(1 / alpha - 1)} and a low-uncertainty correct answer)")
    return float(u_sorted[safe[-1]])


def violation_rate(uncertainties: Sequence[Optional[float]], quality: Sequence[float], tau: float,
                   delta: Optional[float]) -> float:
    """Pr[q < tau and u <= delta]: the share of queries whose bad answer the tier keeps.

    ``delta=None`` means the tier never escalates (the top tier).  A query without uncertainty is
    kept (the proxy cannot threshold it), so it counts as a violation when its quality is low.
    """
    u, q = _as_arrays(uncertainties, quality, "quality")
    if len(u) == 0:
        return 0.0
    kept = np.ones_like(u, dtype=bool) if delta is None else (np.isnan(u) | (u <= delta))
    return float(np.mean(kept & (q < tau)))


def wilson_interval(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k / n; (0, 1) when n = 0."""
    if n <= 0:
        return 0.0, 1.0
    if k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)
