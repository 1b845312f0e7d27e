"""Certify a cost knob lambda per task: the task keeps its quality bar against the top tier on new traffic.

The guarantee a user sets is "this task keeps ``target`` of the top tier's quality".  Per calibration
query the loss ``l = target * q_top - q_policy`` has E[l] <= 0 exactly when the task's expected quality
ratio E[q_policy] / E[q_top] is at least ``target``; a query where our answer is right and the top
tier's is wrong is a gain (negative loss) and counts.

Two strengths of guarantee over a grid of candidates ordered from safe to cheap:

* **Learn-then-Test** (Angelopoulos, Bates, Candes, Jordan, Lei 2021, "Learn then Test", with
  fixed-sequence testing as the family-wise error control): with probability >= 1 - delta over the calibration draw,
  E[loss] <= threshold at the chosen candidate.  Each candidate is tested at the full level delta with a
  finite-sample upper confidence bound (UCB); testing stops at the first candidate not certified, so
  the family-wise error is <= delta.  No monotonicity is needed and the fallback (None -> top tier)
  has E[loss] = (target - 1) E[q_top] <= 0, so a refusal is always safe.
* **Conformal risk control** (Angelopoulos, Bates, Fisch, Lei, Schuster 2022, Thm 1): in expectation
  over the calibration draw and the new query, E[loss] <= threshold, at a margin of only B/(n+1).

Library check (2026-12): ``confseq`` (Waudby-Smith & Ramdas' own code for the betting bound) does not
build here: its sdist needs the Boost C++ headers (CMake "Could NOT find Boost"), which no pip install
provides.  MAPIE 1.6.0 (``mapie.risk_control``) has the Hoeffding-Bentkus p-value and an RCPS WSR bound,
but pulls in scikit-learn, ties the WSR grid of candidate means to the parameter grid and truncates bets
at 1; ``crepes`` is conformal classification and has no risk bounds.  So the bounds are implemented here
with numpy/scipy, each next to the paper equation it follows, and tests/test_certify.py checks their
coverage by simulation and their values against the papers' formulas.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional, Sequence

import numpy as np
from scipy.stats import binom

#: methods accepted by :func:`upper_bound`
METHODS = ("wsr", "hb", "hoeffding", "eb")
#: guarantees accepted by :func:`certify_task`
GUARANTEES = ("ltt", "crc")

# Bisection iterations for the bound inversions: 2^-50 of the unit interval is far below float
# resolution of any loss we see; the upper end of the final bracket is returned (conservative).
_BISECT_ITERS = 50


def quality_loss(q_policy: np.ndarray, q_top: np.ndarray, target: float) -> np.ndarray:
    """Per-query loss ``target * q_top - q_policy`` (qualities in [0, 1]).

    E[l] <= 0  <=>  E[q_policy] >= target * E[q_top], i.e. the task's expected quality ratio against the
    top tier is at least ``target``.  Gains (ours right, top wrong) give negative loss and count.
    Broadcasts: ``q_policy`` (m, n) against ``q_top`` (n,) gives an (m, n) loss matrix in [-1, target].
    """
    if not 0.0 < float(target) <= 1.0:
        raise ValueError(f"target must lie in (0, 1], got {target!r}")
    qp = np.asarray(q_policy, dtype=np.float64)
    qt = np.asarray(q_top, dtype=np.float64)
    for name, q in (("q_policy", qp), ("q_top", qt)):
        if not np.all(np.isfinite(q)) or np.any(q < 0.0) or np.any(q > 1.0):
            raise ValueError(f"{name} must hold finite qualities in [0, 1]")
    return float(target) * qt - qp


def _check_delta(delta: float) -> float:
    if not 0.0 < float(delta) < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta!r}")
    return float(delta)


def _rescale(losses: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map losses from [lo, hi] to [0, 1] (every bound below is stated for [0, 1] variables)."""
    if not hi > lo:
        raise ValueError(f"need hi > lo, got lo={lo!r}, hi={hi!r}")
    x = np.asarray(losses, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("losses must be finite")
    tol = 1e-9 * (hi - lo)
    if np.any(x < lo - tol) or np.any(x > hi + tol):
        raise ValueError(f"losses must lie in [lo, hi] = [{lo}, {hi}]; got range [{x.min()}, {x.max()}]")
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


# ----------------------------------------------------------------------------------------- bounds
# Each *_rows function takes an (k, n) array of [0, 1] observations (one row per candidate) and returns
# the k upper confidence bounds on the [0, 1] scale.  Vectorised over rows because LTT bounds every
# candidate of a grid and the tests repeat that hundreds of times.


def _hoeffding_rows(x: np.ndarray, delta: float) -> np.ndarray:
    """Hoeffding: mean + sqrt(log(1/delta) / (2n))."""
    n = x.shape[1]
    return np.minimum(1.0, x.mean(axis=1) + math.sqrt(math.log(1.0 / delta) / (2.0 * n)))


def _eb_rows(x: np.ndarray, delta: float) -> np.ndarray:
    """Empirical Bernstein, Maurer & Pontil 2009 Thm 4 (one-sided, [0, 1] variables, n >= 2):
    mean + sqrt(2 V_n log(2/delta) / n) + 7 log(2/delta) / (3 (n - 1)), V_n the unbiased sample variance."""
    n = x.shape[1]
    if n < 2:
        return np.ones(x.shape[0])
    log_term = math.log(2.0 / delta)
    var = x.var(axis=1, ddof=1)
    return np.minimum(1.0, x.mean(axis=1) + np.sqrt(2.0 * var * log_term / n) + 7.0 * log_term / (3.0 * (n - 1)))


def _h1(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KL divergence of Bernoulli(a) from Bernoulli(b), 0 log 0 = 0 (Bates et al. 2021, h1 in the HB bound)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = np.where(a > 0, a * np.log(a / b), 0.0)
        t2 = np.where(a < 1, (1.0 - a) * np.log((1.0 - a) / (1.0 - b)), 0.0)
    return t1 + t2


def hb_p_value(mean: np.ndarray, n: int, m: np.ndarray) -> np.ndarray:
    """Hoeffding-Bentkus p-value for H0: E[loss] >= m, losses in [0, 1] (Bates, Angelopoulos, Lei, Malik,
    Jordan 2021 "Distribution-free, risk-controlling prediction sets", the HB bound; restated as the
    p-value p^HB in Learn then Test):
    p = min(exp(-n h1(min(mean, m), m)), e * P(Bin(n, m) <= ceil(n * mean)))."""
    mean = np.asarray(mean, dtype=np.float64)
    m = np.asarray(m, dtype=np.float64)
    hoeffding = np.exp(-n * _h1(np.minimum(mean, m), m))
    # tiny tolerance: n * mean computed as 12.000000000001 must not round up to 13
    k = np.ceil(n * mean - 1e-9)
    bentkus = math.e * binom.cdf(k, n, m)
    return np.minimum(hoeffding, bentkus)


def _hb_rows(x: np.ndarray, delta: float) -> np.ndarray:
    """HB UCB = sup{m : p_HB(m) > delta}; p_HB decreases in m on [mean, 1], so bisection is exact."""
    n = x.shape[1]
    mean = x.mean(axis=1)
    lo = mean.copy()  # p(mean) = 1 > delta: inside the confidence set
    hi = np.ones_like(mean)
    for _ in range(_BISECT_ITERS):
        mid = 0.5 * (lo + hi)
        inside = hb_p_value(mean, n, mid) > delta
        lo = np.where(inside, mid, lo)
        hi = np.where(inside, hi, mid)
    return hi


def _wsr_log_capital(x: np.ndarray, lam: np.ndarray, m: np.ndarray, c: float) -> np.ndarray:
    """log K_n^-(m) = sum_t log(1 + lambda_t(m) (m - x_t)) per row, for a candidate mean m per row, with the
    paper's truncation lambda_t(m) = min(lambda_t, c / (1 - m)) for the capital that bets against m."""
    with np.errstate(divide="ignore"):
        cap = c / (1.0 - m[:, None])
    return np.log1p(np.minimum(lam, cap) * (m[:, None] - x)).sum(axis=1)


def _wsr_bets(x: np.ndarray, delta: float) -> np.ndarray:
    """Predictable plug-in bets (Waudby-Smith & Ramdas 2023, JRSS-B, "Estimating means of bounded random
    variables by betting", the predictable plug-in tuned for a fixed sample size n, as for their CIs):
        mu_t = (1/2 + sum_{i<=t} x_i) / (t + 1),   sigma2_t = (1/4 + sum_{i<=t} (x_i - mu_i)^2) / (t + 1),
        lambda_t = sqrt(2 log(1/delta) / (n sigma2_{t-1}))   (truncated per candidate mean, see below).
    The paper's two-sided CI uses log(2/alpha) and splits alpha over the two capital processes; our bound
    is one-sided at level delta, so log(1/delta) is the matching tuning (as in Bates et al.'s RCPS WSR
    bound).  Any predictable bet keeps validity; the tuning only decides tightness."""
    k, n = x.shape
    t = np.arange(1, n + 1, dtype=np.float64)
    mu = (0.5 + np.cumsum(x, axis=1)) / (t + 1.0)
    sigma2 = (0.25 + np.cumsum((x - mu) ** 2, axis=1)) / (t + 1.0)
    sigma2_prev = np.concatenate([np.full((k, 1), 0.25), sigma2[:, :-1]], axis=1)
    return np.sqrt(2.0 * math.log(1.0 / delta) / (n * sigma2_prev))


def _wsr_rows(x: np.ndarray, delta: float, c: float = 0.5, seed: Optional[int] = 0) -> np.ndarray:
    """One-sided WSR betting UCB: sup{m in [0, 1] : K_n^-(m) < 1/delta}.

    K^-(m) = prod_t (1 - lambda_t (x_t - m)) is the capital of a gambler betting that the mean is below m
    (the "negative" half of the paper's hedged capital process); under H0: E[x] = m it is a
    nonnegative martingale with K_0 = 1, so by Ville's / Markov's inequality P(K_n^-(mu) >= 1/delta) <= delta.
    Only the process that bets against large means is used, at the full level delta (the hedge weight
    theta of the two-sided hedged-capital CI is 0 here).  The bets are truncated as in the paper,
    lambda_t(m) = min(lambda_t, c / (1 - m)) with c = 1/2 (the paper suggests 1/2 or 3/4; 3/4 measured no
    tighter on our losses), so each factor 1 + lambda_t(m) (m - x_t) >= 1 - c > 0 and is nondecreasing in
    m (in both branches of the min; (m - x) / (1 - m) increases in m).  K^-(m) is therefore monotone, the
    confidence set is an interval [0, u), and u is found by bisection to float precision instead of on
    the paper's grid of candidate means: exact, and cheaper.

    Order: the bets are predictable, so the capital is a martingale for observations that are i.i.d. *in
    the order used*, and calibration rows may arrive in any order (grouped by difficulty, source file,
    sorted by loss).  Each row is therefore first sorted (a canonical order: the bound becomes a function of
    the sample alone, identical for any order the caller passes) and then put in the fixed pseudo-random
    order ``np.random.default_rng(seed).permutation(n)``, chosen before and independently of the data.
    For i.i.d. rows, sorting then applying a *uniformly random* permutation gives an i.i.d. sequence, so
    the miss probability averaged over the permutation is <= delta; a fixed seed is the usual "randomise
    once" reading of that, and the tests check the miss rate with the fixed seed over many draws.
    ``seed=None`` keeps the given order (exactly valid when that order is itself exchangeable).
    """
    k, n = x.shape
    if seed is not None:
        x = np.sort(x, axis=1)[:, np.random.default_rng(seed).permutation(n)]
    lam = _wsr_bets(x, delta)
    log_thresh = math.log(1.0 / delta)
    lo = np.zeros(k)
    hi = np.ones(k)
    # K^-(1) < 1/delta: even m = 1 is not rejected and the bound is trivial
    trivial = _wsr_log_capital(x, lam, hi, c) < log_thresh
    for _ in range(_BISECT_ITERS):
        mid = 0.5 * (lo + hi)
        inside = _wsr_log_capital(x, lam, mid, c) < log_thresh
        lo = np.where(inside, mid, lo)
        hi = np.where(inside, hi, mid)
    # K^-(0) = prod(1 - lambda_t x_t) <= 1 < 1/delta, so m = 0 is never rejected and [0, u) is never empty
    return np.where(trivial, 1.0, hi)


_ROWS = {"wsr": _wsr_rows, "hb": _hb_rows, "hoeffding": _hoeffding_rows, "eb": _eb_rows}


def _upper_bound_rows(x01: np.ndarray, delta: float, method: str) -> np.ndarray:
    if method not in _ROWS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if x01.shape[1] == 0:
        return np.ones(x01.shape[0])
    return _ROWS[method](x01, delta)


def upper_bound(losses: np.ndarray, delta: float, method: str = "wsr", lo: float = -1.0, hi: float = 1.0) -> float:
    """(1 - delta) upper confidence bound on E[loss] for i.i.d. losses in [lo, hi].

    method: "wsr" (Waudby-Smith-Ramdas betting, one-sided; the tightest on low-variance losses), "hb"
    (Hoeffding-Bentkus), "hoeffding", "eb" (empirical Bernstein, Maurer-Pontil).  Losses are rescaled to
    [0, 1], bounded there and mapped back; a narrower [lo, hi] gives a tighter bound.  Returns ``hi``
    (the trivial bound) when there are no losses.
    """
    delta = _check_delta(delta)
    x = _rescale(np.asarray(losses, dtype=np.float64).reshape(1, -1), float(lo), float(hi))
    u01 = float(_upper_bound_rows(x, delta, method)[0])
    return float(lo) + u01 * (float(hi) - float(lo))


# ------------------------------------------------------------------------------- choosing lambda


def _as_loss_matrix(loss_matrix: np.ndarray) -> np.ndarray:
    L = np.asarray(loss_matrix, dtype=np.float64)
    if L.ndim == 1:
        L = L.reshape(1, -1)
    if L.ndim != 2 or L.shape[0] == 0:
        raise ValueError(f"loss_matrix must be (m candidates, n queries) with m >= 1, got shape {L.shape}")
    return L


def ltt_fixed_sequence(
    loss_matrix: np.ndarray,
    delta: float,
    method: str = "wsr",
    lo: float = -1.0,
    hi: float = 1.0,
    threshold: float = 0.0,
) -> tuple[Optional[int], np.ndarray]:
    """Learn-then-Test with fixed-sequence testing (Angelopoulos et al. 2021).

    ``loss_matrix`` is (m, n): row i holds the per-query losses of the i-th candidate, candidates ordered
    from safe to cheap.  H0_i: E[loss_i] > threshold is rejected when the (1 - delta) UCB is <= threshold
    (the UCB's confidence set then excludes every mean above the threshold); testing goes in order at
    level delta each and stops at the first non-rejection, which keeps the family-wise error <= delta.

    Returns (index of the last certified candidate, or None if the first fails; the UCB of every
    candidate tested, nan for those never reached).
    """
    delta = _check_delta(delta)
    L = _as_loss_matrix(loss_matrix)
    x = _rescale(L, float(lo), float(hi))
    # All rows are bounded at once (vectorised); only those the sequence reaches are reported.
    ucb_all = float(lo) + _upper_bound_rows(x, delta, method) * (float(hi) - float(lo))
    ucbs = np.full(L.shape[0], np.nan)
    chosen: Optional[int] = None
    for i, ucb in enumerate(ucb_all):
        ucbs[i] = ucb
        if not ucb <= threshold:
            break
        chosen = i
    return chosen, ucbs


def crc_choose(
    loss_matrix: np.ndarray,
    B: float,
    threshold: float = 0.0,
    fallback: Optional[np.ndarray] = None,
) -> tuple[Optional[int], np.ndarray]:
    """Conformal risk control in expectation (Angelopoulos et al. 2022, Thm 1).

    The loss is made monotone along the sequence (per query, running max over candidates 0..i; with
    ``fallback`` — the per-query loss of what runs when None is returned — at the head of the chain), then
    the last index i is chosen with (n/(n+1)) mean(loss_i) + B/(n+1) <= threshold for i and every earlier
    index.  B bounds the loss from above.  Guarantee: E[loss at chosen] <= threshold over the calibration
    draw and the new query; the real loss is <= the monotone one, so it is guaranteed too.

    The theorem needs the fallback's loss <= threshold on every query and <= the chain after it.  Without
    ``fallback`` that holds only if candidate 0 is itself safe pointwise; passing the fallback makes it
    exact, at a price: the chain can never fall below the fallback's loss, so gains over it do not count.

    Returns (chosen index or None, the adjusted risk (n/(n+1)) mean + B/(n+1) of every candidate).
    """
    L = _as_loss_matrix(loss_matrix)
    n = L.shape[1]
    if n == 0:
        return None, np.full(L.shape[0], np.nan)
    if np.any(L > B + 1e-12):
        raise ValueError(f"losses exceed B = {B}: max {L.max()}")
    if fallback is not None:
        f = np.asarray(fallback, dtype=np.float64).reshape(1, -1)
        if f.shape[1] != n:
            raise ValueError(f"fallback has {f.shape[1]} queries, loss_matrix {n}")
        if np.any(f > threshold + 1e-12):
            raise ValueError("the fallback's loss must be <= threshold on every query for the CRC guarantee")
        chain = np.maximum.accumulate(np.vstack([f, L]), axis=0)[1:]
    else:
        chain = np.maximum.accumulate(L, axis=0)
    adjusted = (n / (n + 1.0)) * chain.mean(axis=1) + B / (n + 1.0)
    ok = np.cumprod(adjusted <= threshold).astype(bool)
    chosen = int(np.nonzero(ok)[0][-1]) if ok.any() else None
    return chosen, adjusted


# ------------------------------------------------------------------------------- the certificate


@dataclass(frozen=True)
class Certificate:
    """What was certified for one task, stored next to the policy (JSON-safe via :meth:`to_dict`)."""

    task: str
    method: str  # "ltt-wsr", "ltt-hb", "ltt-eb", "ltt-hoeffding", "crc"
    target: float
    delta: Optional[float]  # None for CRC (a guarantee in expectation)
    n: int
    index: Optional[int]  # chosen candidate index (None: refused -> top tier)
    value: Optional[float]  # its lambda
    bound: Optional[float]  # the loss bound at the chosen candidate (or the best reached when refused)
    certified: bool
    message: str

    def to_dict(self) -> dict:
        raw = asdict(self)
        for key in ("target", "delta", "value", "bound"):
            v = raw[key]
            raw[key] = None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)
        return raw

    @classmethod
    def from_dict(cls, raw: dict) -> "Certificate":
        if not isinstance(raw, dict):
            raise ValueError(f"certificate must be a mapping, got {type(raw).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [k for k in names if k not in raw]
        unknown = [k for k in raw if k not in names]
        if missing or unknown:
            raise ValueError(f"certificate fields: missing {missing}, unknown {unknown}")

        def opt_float(key: str) -> Optional[float]:
            return None if raw[key] is None else float(raw[key])

        return cls(
            task=str(raw["task"]),
            method=str(raw["method"]),
            target=float(raw["target"]),
            delta=opt_float("delta"),
            n=int(raw["n"]),
            index=None if raw["index"] is None else int(raw["index"]),
            value=opt_float("value"),
            bound=opt_float("bound"),
            certified=bool(raw["certified"]),
            message=str(raw["message"]),
        )


def certify_task(
    task: str,
    lambdas: Sequence[float],
    q_policy: np.ndarray,
    q_top: np.ndarray,
    target: float,
    guarantee: str = "ltt",
    delta: float = 0.1,
    method: str = "wsr",
    min_n: int = 30,
    knob: str = "lambda",
) -> Certificate:
    """Choose the cheapest certified lambda for one task (``knob`` names the parameter in messages).

    ``q_policy`` is (m, n): the quality of each candidate lambda's decisions on the n calibration rows,
    candidates ordered safe -> cheap (``lambdas`` in the same order); ``q_top`` (n,) the top tier's.
    guarantee "ltt": with probability >= 1 - delta over the calibration draw, E[q_policy] >= target *
    E[q_top] at the chosen lambda (bound ``method``, losses bounded on [-1, target]).  guarantee "crc":
    the same in expectation, with the top tier as the head of the monotone chain.

    Refuses (certified=False, message naming task, n and the best bound reached) when n < min_n or the
    first candidate fails; the caller then falls back to the top tier for that task.
    """
    if guarantee not in GUARANTEES:
        raise ValueError(f"guarantee must be one of {GUARANTEES}, got {guarantee!r}")
    if guarantee == "ltt" and method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    qp = np.asarray(q_policy, dtype=np.float64)
    if qp.ndim == 1:
        qp = qp.reshape(1, -1)
    qt = np.asarray(q_top, dtype=np.float64).reshape(-1)
    lam = [float(v) for v in lambdas]
    if qp.ndim != 2 or qp.shape[1] != qt.shape[0]:
        raise ValueError(f"q_policy must be (m, n) with n = len(q_top) = {qt.shape[0]}, got {qp.shape}")
    if len(lam) != qp.shape[0]:
        raise ValueError(f"{len(lam)} lambdas for {qp.shape[0]} candidate rows of q_policy")
    losses = quality_loss(qp, qt, target)
    n = int(qt.shape[0])
    label = f"ltt-{method}" if guarantee == "ltt" else "crc"
    d = _check_delta(delta) if guarantee == "ltt" else None

    def refuse(bound: Optional[float], why: str) -> Certificate:
        shown = "none" if bound is None or not math.isfinite(bound) else f"{bound:+.4f}"
        msg = (f"task {task!r}: not certified ({label}, target {target}, n={n}): {why}; best bound reached "
               f"{shown} (must be <= 0); falling back to the top tier")
        return Certificate(task, label, float(target), d, n, None, None, bound, False, msg)

    if n < min_n:
        bound = None
        if n > 0 and guarantee == "ltt":
            bound = upper_bound(losses[0], d, method, lo=-1.0, hi=float(target))
        elif n > 0:
            bound = float(crc_choose(losses[:1], B=float(target), fallback=(float(target) - 1.0) * qt)[1][0])
        return refuse(bound, f"n={n} calibration rows < min_n={min_n}")

    if guarantee == "ltt":
        idx, bounds = ltt_fixed_sequence(losses, d, method, lo=-1.0, hi=float(target), threshold=0.0)
    else:
        # The top tier (the refusal fallback) heads the monotone chain: its loss (target - 1) q_top <= 0.
        idx, bounds = crc_choose(losses, B=float(target), threshold=0.0, fallback=(float(target) - 1.0) * qt)
    if idx is None:
        return refuse(float(bounds[0]), f"the safest candidate ({knob}={lam[0]}) fails")
    bound = float(bounds[idx])
    what = f"P >= {1 - d:.3g} over the calibration draw" if d is not None else "in expectation"
    msg = (f"task {task!r}: certified {knob}={lam[idx]} (candidate {idx} of {len(lam)}, {label}, n={n}): "
           f"E[target*q_top - q] <= {bound:+.4f} <= 0, i.e. quality ratio >= {target} {what}")
    return Certificate(task, label, float(target), d, n, idx, lam[idx], bound, True, msg)
