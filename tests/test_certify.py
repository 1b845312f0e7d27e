"""The certification core tested on its own, on simulated data whose answer is known.

Every coverage check below is one that can fail: the same checker is run on a deliberately invalid
rule (the sample mean as a "bound", or choosing lambda by the empirical ratio) and must flag it.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import binom, norm

from calibration.certify import (
    Certificate,
    certify_task,
    crc_choose,
    hb_p_value,
    ltt_fixed_sequence,
    quality_loss,
    upper_bound,
)

DELTA = 0.1
REPEATS = 600
METHODS = ("wsr", "hb", "hoeffding", "eb")


def miss_rate_ok(misses: np.ndarray, delta: float) -> bool:
    """Miss rate within delta plus three binomial standard errors (the slack for a finite number of draws)."""
    r = len(misses)
    return float(np.mean(misses)) <= delta + 3.0 * math.sqrt(delta * (1.0 - delta) / r)


# ------------------------------------------------------------------------------------ the bounds


def _draws(kind: str, rng: np.random.Generator, n: int) -> tuple[np.ndarray, float, float, float]:
    """REPEATS samples of n losses with a known mean, and the range [lo, hi] they live in."""
    if kind == "bernoulli":
        return rng.binomial(1, 0.3, (REPEATS, n)).astype(float), 0.3, 0.0, 1.0
    if kind == "beta":
        return rng.beta(2.0, 8.0, (REPEATS, n)), 0.2, 0.0, 1.0
    # the quality loss itself: q_top ~ Bern(0.8); ours = top's answer on 85% of rows, else Bern(0.6)
    target = 0.97
    q_top = rng.binomial(1, 0.8, (REPEATS, n)).astype(float)
    q_pol = np.where(rng.random((REPEATS, n)) < 0.15, rng.binomial(1, 0.6, (REPEATS, n)), q_top)
    mean = target * 0.8 - (0.85 * 0.8 + 0.15 * 0.6)
    return quality_loss(q_pol, q_top, target), mean, -1.0, target


@pytest.mark.parametrize("kind", ["bernoulli", "beta", "quality_loss"])
def test_each_bound_covers_the_true_mean(kind: str) -> None:
    rng = np.random.default_rng({"bernoulli": 1, "beta": 2, "quality_loss": 3}[kind])
    x, mean, lo, hi = _draws(kind, rng, n=150)
    for method in METHODS:
        ucb = np.array([upper_bound(row, DELTA, method, lo=lo, hi=hi) for row in x])
        misses = ucb < mean
        print(f"{kind} {method}: miss rate {misses.mean():.3f} (delta {DELTA})")
        assert miss_rate_ok(misses, DELTA), (kind, method, misses.mean())
        assert np.all(ucb <= hi + 1e-12)
    # the checker can fail: the sample mean is no bound and misses about half the time
    assert not miss_rate_ok(x.mean(axis=1) < mean, DELTA)


def test_empty_and_degenerate_inputs() -> None:
    for method in METHODS:
        assert upper_bound(np.array([]), DELTA, method, lo=-1.0, hi=0.97) == pytest.approx(0.97)
        # all losses at the bottom of the range: the bound is strictly inside the range
        assert upper_bound(np.full(200, -1.0), DELTA, method, lo=-1.0, hi=0.97) < 0.0
    with pytest.raises(ValueError, match="lie in"):
        upper_bound(np.array([0.5, 2.0]), DELTA, "wsr", lo=0.0, hi=1.0)
    with pytest.raises(ValueError, match="method"):
        upper_bound(np.array([0.5]), DELTA, "clt")
    with pytest.raises(ValueError, match="delta"):
        upper_bound(np.array([0.5]), 1.5)


def test_wsr_is_tighter_than_hoeffding_and_eb_on_low_variance_losses() -> None:
    rng = np.random.default_rng(4)
    x = rng.beta(50.0, 50.0, 400)  # sd 0.05
    wsr, hb, hoef, eb = (upper_bound(x, DELTA, m, lo=0.0, hi=1.0) for m in ("wsr", "hb", "hoeffding", "eb"))
    mean = x.mean()
    assert wsr - mean < 0.5 * (eb - mean) < 0.5 * (hoef - mean)
    assert hb <= hoef + 1e-12  # HB takes the min with the (tighter, KL) Hoeffding p-value


def test_wsr_width_matches_the_papers_asymptotic_width() -> None:
    """Waudby-Smith & Ramdas 2023: with the predictable plug-in bets tuned for a fixed n, the interval's
    half-width times sqrt(n) tends to the oracle Bernstein width sigma * sqrt(2 log(1/alpha)) per side
    (log(2/alpha) for their two-sided CI).  Our one-sided bound at delta must land near
    sigma * sqrt(2 log(1/delta) / n) on a large sample (and not far above it: it adapts to the variance)."""
    rng = np.random.default_rng(5)
    n = 4000
    sigma = math.sqrt(2.0 * 8.0 / (10.0**2 * 11.0))  # sd of Beta(2, 8)
    ratios = []
    for _ in range(20):
        x = rng.beta(2.0, 8.0, n)
        ratios.append((upper_bound(x, DELTA, "wsr", lo=0.0, hi=1.0) - x.mean()) / (sigma * math.sqrt(2 * math.log(1 / DELTA) / n)))
    assert 0.9 <= float(np.mean(ratios)) <= 1.3, np.mean(ratios)


def _hb_reference(mean: float, n: int, delta: float) -> float:
    """Bates et al. 2021 (RCPS, Prop. 3 and the HB bound): R+ = sup{R : min(exp(-n h1(mean ^ R, R)),
    e P(Bin(n, R) <= ceil(n mean))) >= delta}, evaluated here on a fine grid (independent of the
    bisection in the module)."""
    grid = np.linspace(mean, 1.0 - 1e-12, 200001)
    a = np.minimum(mean, grid)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(a > 0, a * np.log(a / grid), 0.0) + (1 - a) * np.log((1 - a) / (1 - grid))
    p = np.minimum(np.exp(-n * kl), math.e * binom.cdf(math.ceil(n * mean - 1e-9), n, grid))
    return float(grid[p >= delta].max())


@pytest.mark.parametrize("n,mean,delta", [(1000, 0.1, 0.1), (100, 0.05, 0.1), (500, 0.3, 0.05)])
def test_hb_matches_the_papers_formula(n: int, mean: float, delta: float) -> None:
    k = round(n * mean)
    x = np.r_[np.ones(k), np.zeros(n - k)]
    ours = upper_bound(x, delta, "hb", lo=0.0, hi=1.0)
    assert ours == pytest.approx(_hb_reference(k / n, n, delta), abs=2e-5)
    assert hb_p_value(np.array(k / n), n, np.array(ours)) == pytest.approx(delta, rel=1e-3)
    # the published ballpark: HB sits between the CLT interval and plain Hoeffding
    clt = mean + norm.ppf(1 - delta) * math.sqrt(mean * (1 - mean) / n)
    assert clt < ours < mean + math.sqrt(math.log(1 / delta) / (2 * n))


def test_wsr_ignores_the_order_rows_arrive_in() -> None:
    """Sorted rows (as a file grouped by difficulty gives them) get the same bound as shuffled ones: the
    bound sorts, then applies its own seeded permutation."""
    rng = np.random.default_rng(6)
    x = rng.beta(2.0, 8.0, 300)
    assert upper_bound(np.sort(x), DELTA) == pytest.approx(upper_bound(rng.permutation(x), DELTA))


# ----------------------------------------------------------------- simulated policies, known answer

TARGET = 0.97
S_GRID = np.linspace(0.0, 1.0, 21)  # share of rows the cheap model answers, safe -> cheap
P_TOP, AGREE, P_CHEAP_ELSE = 0.8, 0.8, 0.5
# The cheap model copies the top tier's verdict on AGREE of the rows and is right with P_CHEAP_ELSE on
# the rest, so E[q_cheap] = 0.8 * 0.8 + 0.2 * 0.5 = 0.74.  Candidate i hands a share S_GRID[i] of the rows
# to it: its true quality ratio is 1 - S * (1 - 0.74 / 0.8) = 1 - 0.075 S, decreasing in lambda, and it
# meets 0.97 exactly for S <= 0.4 (indices 0..8).
E_CHEAP = AGREE * P_TOP + (1 - AGREE) * P_CHEAP_ELSE
TRUE_RATIO = ((1 - S_GRID) * P_TOP + S_GRID * E_CHEAP) / P_TOP
TRUE_LOSS = TARGET * P_TOP - (1 - S_GRID) * P_TOP - S_GRID * E_CHEAP
FALLBACK_LOSS = (TARGET - 1.0) * P_TOP  # the top tier's own expected loss


def simulate(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    q_top = rng.binomial(1, P_TOP, n).astype(float)
    q_cheap = np.where(rng.random(n) < AGREE, q_top, rng.binomial(1, P_CHEAP_ELSE, n))
    u = rng.random(n)
    q_policy = np.where(u[None, :] < S_GRID[:, None], q_cheap[None, :], q_top[None, :])
    return q_policy, q_top


def test_the_simulated_family_has_the_stated_answer() -> None:
    assert np.all(np.diff(TRUE_RATIO) < 0)
    assert np.flatnonzero(TRUE_RATIO >= TARGET - 1e-12).max() == 8
    q_policy, q_top = simulate(np.random.default_rng(7), 200000)
    assert np.allclose(q_policy.mean(axis=1) / q_top.mean(), TRUE_RATIO, atol=0.004)


def test_ltt_keeps_the_target_in_all_but_delta_of_calibration_draws(capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(8)
    draws, n = 500, 600
    chosen = {m: [] for m in ("wsr", "hb", "eb")}
    naive = []
    for _ in range(draws):
        q_policy, q_top = simulate(rng, n)
        losses = quality_loss(q_policy, q_top, TARGET)
        for method in chosen:
            idx, ucbs = ltt_fixed_sequence(losses, DELTA, method, lo=-1.0, hi=TARGET)
            chosen[method].append(-1 if idx is None else idx)
            # tested = every certified candidate plus the first failure (if any is left)
            n_tested = 1 if idx is None else min(len(S_GRID), idx + 2)
            assert np.isfinite(ucbs[:n_tested]).all() and np.isnan(ucbs[n_tested:]).all()
        ok = np.cumprod(losses.mean(axis=1) <= 0).astype(bool)  # choose by the empirical ratio: invalid
        naive.append(int(np.flatnonzero(ok)[-1]) if ok.any() else -1)
    with capsys.disabled():
        for method, idx in chosen.items():
            idx = np.asarray(idx)
            realised = np.where(idx < 0, 1.0, TRUE_RATIO[np.maximum(idx, 0)])
            misses = realised < TARGET - 1e-12
            print(f"\nLTT-{method}: miss rate {misses.mean():.3f}, mean certified index {idx.mean():.2f} "
                  f"(true best 8), refused {np.mean(idx < 0):.3f}, mean realised ratio {realised.mean():.4f}")
            assert miss_rate_ok(misses, DELTA), (method, misses.mean())
        naive_misses = TRUE_RATIO[np.asarray(naive)] < TARGET - 1e-12
        print(f"naive empirical choice: miss rate {naive_misses.mean():.3f}")
    assert not miss_rate_ok(naive_misses, DELTA)
    # WSR is the tightest of the three on this low-variance loss
    assert np.mean(chosen["wsr"]) > np.mean(chosen["eb"]) and np.mean(chosen["wsr"]) > np.mean(chosen["hb"])


def test_crc_keeps_the_target_in_expectation(capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(9)
    draws, n = 2000, 60
    realised, naive_realised, idxs = [], [], []
    for _ in range(draws):
        q_policy, q_top = simulate(rng, n)
        losses = quality_loss(q_policy, q_top, TARGET)
        idx, adjusted = crc_choose(losses, B=TARGET, threshold=0.0, fallback=(TARGET - 1.0) * q_top)
        assert np.all(np.diff(adjusted) >= -1e-12)  # the monotone chain
        realised.append(FALLBACK_LOSS if idx is None else TRUE_LOSS[idx])
        idxs.append(-1 if idx is None else idx)
        # invalid: no B/(n+1) margin, no monotone chain, just the largest index whose empirical loss <= 0
        ok = np.flatnonzero(losses.mean(axis=1) <= 0)
        naive_realised.append(TRUE_LOSS[ok.max()] if ok.size else FALLBACK_LOSS)
    realised, naive_realised = np.asarray(realised), np.asarray(naive_realised)

    def mean_ok(values: np.ndarray) -> bool:
        return float(values.mean()) <= 3.0 * float(values.std(ddof=1)) / math.sqrt(len(values))

    with capsys.disabled():
        print(f"\nCRC: mean realised loss {realised.mean():+.5f} (threshold 0), mean index {np.mean(idxs):.2f}; "
              f"naive: {naive_realised.mean():+.5f}")
    assert mean_ok(realised)
    assert not mean_ok(naive_realised)


def test_crc_margin_and_monotone_chain() -> None:
    # two candidates, n = 9: loss 0 then a candidate whose mean is 0 but adjusted risk B/(n+1) > 0
    L = np.array([np.zeros(9), np.r_[np.full(4, 0.5), np.full(4, -0.5), 0.0]])
    idx, adjusted = crc_choose(L, B=1.0)
    assert idx is None and adjusted[0] == pytest.approx(0.1)
    idx, adjusted = crc_choose(L, B=1.0, threshold=0.1)
    assert idx == 0  # candidate 1's running max is 0.5 on four rows: (4*0.5 + 1)/10 = 0.3 > 0.1
    assert adjusted[1] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="fallback"):
        crc_choose(L, B=1.0, fallback=np.full(9, 0.5))


def test_ltt_stops_at_the_first_failure() -> None:
    rng = np.random.default_rng(10)
    good = rng.uniform(-1.0, -0.5, (1, 300))
    bad = rng.uniform(0.2, 0.9, (1, 300))
    idx, ucbs = ltt_fixed_sequence(np.vstack([good, good, bad, good]), DELTA, lo=-1.0, hi=1.0)
    assert idx == 1 and np.isfinite(ucbs[:3]).all() and np.isnan(ucbs[3]) and ucbs[2] > 0
    idx, ucbs = ltt_fixed_sequence(np.vstack([bad, good]), DELTA, lo=-1.0, hi=1.0)
    assert idx is None and np.isnan(ucbs[1])


# ----------------------------------------------------------------------------- certify_task, refusal


def test_certify_task_chooses_a_lambda_with_the_stated_guarantee() -> None:
    q_policy, q_top = simulate(np.random.default_rng(11), 1500)
    lambdas = list(S_GRID * 2.0)
    cert = certify_task("qa", lambdas, q_policy, q_top, TARGET)
    assert cert.certified and cert.method == "ltt-wsr" and cert.delta == 0.1 and cert.n == 1500
    assert cert.index is not None and cert.value == lambdas[cert.index] and cert.bound <= 0
    assert 3 <= cert.index <= 8, cert  # not trivial, and not beyond the true answer on this draw
    crc = certify_task("qa", lambdas, q_policy, q_top, TARGET, guarantee="crc")
    assert crc.certified and crc.delta is None and crc.method == "crc" and crc.bound <= 0


def test_refusal_names_task_n_and_bound() -> None:
    q_policy, q_top = simulate(np.random.default_rng(12), 20)
    cert = certify_task("summarization", list(S_GRID), q_policy, q_top, TARGET, min_n=30)
    assert not cert.certified and cert.index is None and cert.value is None
    assert "summarization" in cert.message and "n=20" in cert.message and cert.bound is not None
    assert f"{cert.bound:+.4f}" in cert.message
    # enough rows, but even the safest candidate fails (our answers all wrong)
    q_policy, q_top = simulate(np.random.default_rng(13), 400)
    cert = certify_task("ner", list(S_GRID), np.zeros_like(q_policy), q_top, TARGET, method="hb")
    assert not cert.certified and cert.method == "ltt-hb" and cert.bound > 0
    assert "ner" in cert.message and "n=400" in cert.message and f"{cert.bound:+.4f}" in cert.message
    crc = certify_task("ner", list(S_GRID), np.zeros_like(q_policy), q_top, TARGET, guarantee="crc")
    assert not crc.certified and "n=400" in crc.message and crc.bound > 0


def test_certify_task_rejects_bad_input() -> None:
    q_policy, q_top = simulate(np.random.default_rng(14), 100)
    with pytest.raises(ValueError, match="lambdas"):
        certify_task("qa", [0.0, 1.0], q_policy, q_top, TARGET)
    with pytest.raises(ValueError, match="q_policy"):
        certify_task("qa", list(S_GRID), q_policy * 2.0, q_top, TARGET)
    with pytest.raises(ValueError, match="guarantee"):
        certify_task("qa", list(S_GRID), q_policy, q_top, TARGET, guarantee="pac")
    with pytest.raises(ValueError, match="target"):
        certify_task("qa", list(S_GRID), q_policy, q_top, 1.2)


def test_certificate_round_trips_through_json() -> None:
    q_policy, q_top = simulate(np.random.default_rng(15), 800)
    for guarantee in ("ltt", "crc"):
        cert = certify_task("qa", list(S_GRID), q_policy, q_top, TARGET, guarantee=guarantee)
        back = Certificate.from_dict(json.loads(json.dumps(cert.to_dict())))
        assert back == cert
    refused = certify_task("qa", list(S_GRID), q_policy[:, :5], q_top[:5], TARGET)
    assert Certificate.from_dict(json.loads(json.dumps(refused.to_dict()))) == refused
    raw = cert.to_dict()
    raw.pop("bound")
    with pytest.raises(ValueError, match="missing \\['bound'\\]"):
        Certificate.from_dict(raw)
