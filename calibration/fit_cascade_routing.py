"""Fit and certify a certified policy family on calibration rows (issue 14 items 3-5).

Two families share everything below (replay, cross-fitting, certificate); only the policy object and
its knob differ (:data:`FAMILIES`): ``cascade_routing`` (lambda, rising from safe to cheap) and
``posterior_threshold`` (threshold t, falling from 1 = the top tier for every query).

Input: the calibration rows as arrays (tier k at column k - 1): the router's ex-ante acceptance
estimates (the router never trained on these rows), quality, acceptability, uncertainty, answer
texts and cost per tier.  Output: a :class:`litellm_routenlp.policy.CascadeRouting` and the part of
the policy file that describes it.

What is held apart, and why (cross-fitting):

* The **router** is trained on the training rows only, so its ex-ante estimates on the calibration
  rows are out of sample.
* The **posterior estimator** (and the per-tier spread ``sigma`` and cost table the lookahead uses)
  are fitted on calibration rows, which the certificate is also computed on.  Scoring a policy on
  rows its estimator was fitted on would make the decisions look better than on new traffic, and
  the bound would then certify an optimistic loss.  So the rows are split into ``folds`` folds: for
  each fold the estimator, sigmas and costs are fitted on the other folds and the policy's
  decisions on the held-out fold are replayed for every lambda of the grid.  Every calibration row
  thus gets decisions from estimators that never saw it, and all of them count in the certificate
  (no row is spent on fitting alone).
* The **final** estimator, sigmas and costs are fitted on all calibration rows (more data, the
  usual cross-fitting practice); the certified lambda is the one chosen on the out-of-fold
  decisions.  The guarantee is therefore exact for the fold estimators and holds for the final one
  to the extent that fitting on 100% instead of (folds-1)/folds of the rows does not make its
  decisions worse -- the same approximation as cross-validated model selection; the bench measures
  it on test rows the policy never saw.

Certification (per task, :func:`calibration.certify.certify_task`): the lambda grid is ordered
safe -> cheap (0 first: every tier that max_hops allows is asked and the best-estimated answer is
kept), the quality of each candidate's out-of-fold decisions is compared with the top tier's, and
Learn-then-Test fixed-sequence testing with a Waudby-Smith-Ramdas betting bound ("ltt", probability
1 - delta over the calibration draw) or conformal risk control ("crc", in expectation) picks the
cheapest certified lambda.  A refused task gets ``lambda: null``: the policy sends it to the top tier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from calibration.certify import certify_task
from calibration.quality_estimators import fit_posterior
from litellm_routenlp.policy import CascadeRouting, PolicyAnswer, PosteriorThreshold, TaskPolicy, decide_start, replay

#: lambda candidates, safe -> cheap (costs are normalised by the top tier's mean cost).  lambda = 0
#: is left out: it asks every tier max_hops allows (costlier than the top tier alone) and gains
#: nothing over 1e-3, while a failure there would end the fixed sequence.
LAMBDA_GRID = tuple(float(v) for v in np.round(np.geomspace(1e-3, 10.0, 21), 6))
#: posterior_threshold's candidates, safe -> cheap: 1.0 asks the top tier for every query (no estimate
#: reaches it), then ever lower thresholds: geometric near 1, then every 0.0025.  WHY this fine: where
#: the router's estimates barely vary within a task (no per-query signal), a whole task's rows cross
#: the threshold within ~0.01, and a coarser grid jumped from "all to the top tier" to "most to a
#: cheaper tier" in one step (routerbench arc_challenge: cost 0.87 -> 0.59), skipping the cheapest
#: point the certificate would accept.  Fixed-sequence testing pays nothing for more candidates (each
#: is tested at the full delta), and replay_threshold_grid replays a row once per group of
#: thresholds, not once per threshold.
THRESHOLD_GRID = (1.0,) + tuple(sorted({float(np.round(1.0 - v, 6)) or 0.0 for v in np.concatenate(
    [np.geomspace(1e-4, 0.05, 80), np.arange(0.05, 1.0 + 1e-9, 0.0025)])}, reverse=True))
#: the policy families this module fits: name -> (the knob's grid, safe -> cheap)
FAMILIES = {"cascade_routing": LAMBDA_GRID, "posterior_threshold": THRESHOLD_GRID}
#: families whose knob is a threshold compared as ``estimate >= t`` (replayed by replay_threshold_grid)
THRESHOLD_FAMILIES = ("posterior_threshold",)
#: one L2 strength for the posterior cells (fit_posterior's default tries three by inner CV, 3x the time)
POSTERIOR_CS = (0.3,)
GUARANTEES = ("ltt", "crc")


@dataclass
class CalibrationRows:
    """The arrays a cascade-routing fit reads (n rows, K tiers; tier k at column k - 1)."""

    tasks: np.ndarray                  # (n,) task names
    ex_ante: np.ndarray                # (n, K) router's P(tier k acceptable), out of sample
    quality: np.ndarray                # (n, K)
    acceptable: np.ndarray             # (n, K) bool: quality >= tau
    uncertainty: np.ndarray            # (n, K) NaN: no logprobs
    cost: np.ndarray                   # (n, K) USD
    outputs: Optional[list] = None     # n rows of K answer texts (agreement), or None
    available: Mapping[str, Sequence[int]] = field(default_factory=dict)  # task -> 1-based tiers serving it

    def __post_init__(self) -> None:
        self.tasks = np.asarray(self.tasks)
        n, K = np.shape(self.quality)
        for name in ("ex_ante", "acceptable", "uncertainty", "cost"):
            if np.shape(getattr(self, name)) != (n, K):
                raise ValueError(f"{name} has shape {np.shape(getattr(self, name))}, expected {(n, K)}")

    @property
    def K(self) -> int:
        return int(np.shape(self.quality)[1])

    def tiers_for(self, task: str) -> list[int]:
        return list(self.available.get(task) or range(1, self.K + 1))

    def subset(self, rows: np.ndarray) -> "CalibrationRows":
        return CalibrationRows(self.tasks[rows], self.ex_ante[rows], self.quality[rows], self.acceptable[rows],
                               self.uncertainty[rows], self.cost[rows],
                               None if self.outputs is None else [self.outputs[i] for i in rows], self.available)


class RowCache:
    """Memoises the estimator per (row, answered set): the posterior does not depend on lambda."""

    def __init__(self, estimator: Any) -> None:
        self.estimator, self.row, self.memo = estimator, -1, {}

    def predict(self, task: str, ex_ante: np.ndarray, answers: Sequence[Any]) -> np.ndarray:
        key = (self.row, tuple(a.tier for a in answers))
        value = self.memo.get(key)
        if value is None:
            value = self.memo[key] = self.estimator.predict(task, ex_ante, answers)
        return value


def row_answer(data: CalibrationRows, row: int, tier: int) -> PolicyAnswer:
    """Tier ``tier``'s recorded answer on ``row`` as the policy sees it (u, text, cost)."""
    u = float(data.uncertainty[row, tier - 1])
    return PolicyAnswer(tier=tier, uncertainty=None if math.isnan(u) else u,
                        text=None if data.outputs is None else data.outputs[row][tier - 1],
                        cost_usd=float(data.cost[row, tier - 1]))


def replay_row(policy: Any, data: CalibrationRows, row: int, route_probabilities: Optional[np.ndarray] = None,
               start: Optional[int] = None) -> tuple[list[int], int, Any]:
    """One row through ``policy``: (tiers tried, kept tier, last decision), all 1-based."""
    cache = policy.estimator if isinstance(getattr(policy, "estimator", None), RowCache) else None
    if cache is not None:
        cache.row = row
    task = str(data.tasks[row])
    tiers = data.tiers_for(task)
    if start is not None:  # a start tier that does not serve the task moves up, as in the proxy
        first = next((t for t in tiers if t >= int(start)), tiers[-1])
    else:
        first = decide_start(policy, task, tiers, route_probabilities, data.ex_ante[row]).tier
    names = {k: f"T{k}" for k in range(1, data.K + 1)}
    return replay(policy, task, first, lambda tier: row_answer(data, row, tier), tiers, names, data.ex_ante[row])


def replay_rows(policy: Any, data: CalibrationRows, route_probabilities: Optional[np.ndarray] = None,
                starts: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, list[Optional[str]]]:
    """Every row through ``policy`` (start + steps) on its recorded answers.

    ``starts`` (1-based) replaces the policy's start decision (a caller that already routed);
    otherwise :meth:`start` decides from ``route_probabilities`` / the ex-ante estimates.

    Returns (kept tier 1-based (n,), tiers tried (n, K) bool, stop reason per row).  The one offline
    replay of the policy: calibration, the bench and ``coopt evaluate`` call it.
    """
    n, K = data.quality.shape
    kept = np.zeros(n, dtype=np.int64)
    tried = np.zeros((n, K), dtype=bool)
    reasons: list[Optional[str]] = []
    for row in range(n):
        path, final, decision = replay_row(policy, data, row,
                                           None if route_probabilities is None else route_probabilities[row],
                                           None if starts is None else int(starts[row]))
        kept[row] = final
        tried[row, [t - 1 for t in path]] = True
        reasons.append(decision.stop_reason)
    return kept, tried, reasons


def threshold_breakpoints(policy: Any, data: CalibrationRows, row: int) -> np.ndarray:
    """Every estimate a threshold policy compares its knob t with on ``row``, sorted.

    posterior_threshold compares t only with the ex-ante estimates (the start) and with the start
    tier's posterior after its answer (the stop), always as ``estimate >= t``; so its decisions on
    the row are the same for every t with the same number of these values at or above it."""
    task = str(data.tasks[row])
    cache = policy.estimator if isinstance(getattr(policy, "estimator", None), RowCache) else None
    if cache is not None:
        cache.row = row
    values = list(policy.estimates(task, data.ex_ante[row], ()))
    for tier in data.tiers_for(task)[:-1]:
        values.append(float(policy.estimates(task, data.ex_ante[row], [row_answer(data, row, tier)])[tier - 1]))
    return np.unique(np.asarray(values, dtype=np.float64))


def replay_threshold_grid(policies: Sequence[Any], thresholds: Sequence[float],
                          data: CalibrationRows) -> tuple[np.ndarray, np.ndarray]:
    """``replay_rows`` for every threshold of a grid at once: kept (m, n) and tried (m, n, K).

    ``policies[i]`` is the threshold family's policy at ``thresholds[i]`` (same estimator).  The
    decisions come from the policies themselves; a row is replayed once per group of thresholds
    that fall between the same two of its :func:`threshold_breakpoints` (at most 2K - 1 + 1 groups)
    instead of once per threshold, so a fine grid costs no more replays than a coarse one.
    tests/test_policy.py checks the result against ``replay_rows`` at every threshold."""
    grid = np.asarray(thresholds, dtype=np.float64)
    m, (n, K) = len(grid), data.quality.shape
    kept = np.zeros((m, n), dtype=np.int64)
    tried = np.zeros((m, n, K), dtype=bool)
    for row in range(n):
        points = threshold_breakpoints(policies[0], data, row)
        at_or_above = len(points) - np.searchsorted(points, grid, side="left")
        _, first, group = np.unique(at_or_above, return_index=True, return_inverse=True)
        for index, knob in enumerate(first):
            path, final, _ = replay_row(policies[knob], data, row)
            members = group == index
            kept[members, row] = final
            tried[np.ix_(members, [row], [t - 1 for t in path])] = True
    return kept, tried


def cost_table(data: CalibrationRows, task: str) -> tuple[float, ...]:
    """Mean cost per tier on the task's rows / the top tier's mean cost (lambda is then scale-free)."""
    rows = data.tasks == task
    mean = data.cost[rows].mean(axis=0) if rows.any() else data.cost.mean(axis=0)
    return tuple(float(v) for v in mean / max(float(mean[-1]), 1e-300))


def sigma_table(estimator: Any, data: CalibrationRows, task: str) -> tuple[float, ...]:
    """Per tier j: std over the task's rows of (estimate of j once j has answered - its ex-ante estimate).

    How far one answer moves its own tier's estimate: the spread the lookahead gives an untried
    tier's future estimate (the paper's sigma)."""
    rows = np.nonzero(data.tasks == task)[0]
    K = data.K
    if len(rows) < 2:
        return tuple(0.0 for _ in range(K))
    out = []
    for j in range(1, K + 1):
        moves = []
        for row in rows:
            u = float(data.uncertainty[row, j - 1])
            text = None if data.outputs is None else data.outputs[row][j - 1]
            signal = PolicyAnswer(tier=j, uncertainty=None if math.isnan(u) else u, text=text)
            posterior = CascadeRouting({}, estimator).estimates(task, data.ex_ante[row], [signal])
            moves.append(float(posterior[j - 1] - data.ex_ante[row, j - 1]))
        out.append(float(np.std(moves)))
    return tuple(out)


def fit_parts(data: CalibrationRows, seed: int = 0) -> tuple[Any, dict[str, tuple[float, ...]], dict[str, tuple[float, ...]]]:
    """Posterior estimator, sigmas and costs per task, fitted on ``data``."""
    estimator = fit_posterior(list(map(str, data.tasks)), data.ex_ante, data.acceptable, data.uncertainty,
                              data.outputs, seed=seed, Cs=POSTERIOR_CS)
    tasks = sorted(set(map(str, data.tasks)))
    return estimator, {t: sigma_table(estimator, data, t) for t in tasks}, {t: cost_table(data, t) for t in tasks}


def assign_folds(tasks: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold of each row, stratified by task, seeded."""
    fold_of = np.zeros(len(tasks), dtype=np.int64)
    rng = np.random.default_rng([seed, 5])
    for task in sorted(set(map(str, tasks))):
        rows = np.nonzero(np.asarray(tasks) == task)[0]
        fold_of[rows[rng.permutation(len(rows))]] = np.arange(len(rows)) % folds
    return fold_of


def task_policy(family: str, knob: Optional[float], costs: tuple[float, ...], sigmas: tuple[float, ...],
                certificate: Optional[dict] = None) -> TaskPolicy:
    """One task's numbers with ``knob`` in the family's field (lambda or threshold)."""
    if family == "posterior_threshold":
        return TaskPolicy(lam=None, costs=costs, sigmas=sigmas, certificate=certificate, threshold=knob)
    return TaskPolicy(lam=knob, costs=costs, sigmas=sigmas, certificate=certificate)


def family_policy(family: str, specs: Mapping[str, TaskPolicy], estimator: Any, max_hops: int,
                  no_logprobs_policy: str, memo: Optional[dict] = None) -> Any:
    """The policy object of ``family`` (the same classes the proxy serves)."""
    if family == "posterior_threshold":
        return PosteriorThreshold(specs, estimator, max_hops=max_hops, no_logprobs_policy=no_logprobs_policy)
    if family == "cascade_routing":
        return CascadeRouting(specs, estimator, max_hops=max_hops, no_logprobs_policy=no_logprobs_policy, memo=memo)
    raise ValueError(f"family must be one of {tuple(FAMILIES)}, got {family!r}")


def out_of_fold_quality(data: CalibrationRows, lambdas: Sequence[float], folds: int, seed: int, max_hops: int,
                        no_logprobs_policy: str, fold_of: Optional[np.ndarray] = None,
                        family: str = "cascade_routing") -> tuple[np.ndarray, np.ndarray]:
    """(m, n) quality and (m, n) cost of each knob value's decisions, every row decided out of fold.

    ``lambdas`` are the family's knob values (lambda, or threshold for posterior_threshold);
    ``fold_of`` reuses the folds of an outer cross-fit (e.g. the router's); default: seeded folds."""
    n = len(data.tasks)
    if fold_of is None:
        fold_of = assign_folds(data.tasks, folds, seed)
    folds = int(fold_of.max()) + 1
    quality = np.zeros((len(lambdas), n))
    cost = np.zeros((len(lambdas), n))
    for fold in range(folds):
        held = np.nonzero(fold_of == fold)[0]
        fit = np.nonzero(fold_of != fold)[0]
        if held.size == 0:
            continue
        estimator, sigmas, costs = fit_parts(data.subset(fit), seed)
        part = data.subset(held)
        cache, memo = RowCache(estimator), {}
        policies = [family_policy(family, {task: task_policy(family, float(lam), costs[task], sigmas[task])
                                           for task in sigmas}, cache, max_hops, no_logprobs_policy, memo)
                    for lam in lambdas]
        if family in THRESHOLD_FAMILIES:
            kept, tried = replay_threshold_grid(policies, lambdas, part)
        else:
            runs = [replay_rows(policy, part)[:2] for policy in policies]
            kept, tried = np.stack([r[0] for r in runs]), np.stack([r[1] for r in runs])
        quality[:, held] = np.take_along_axis(part.quality[None, :, :], kept[:, :, None] - 1, axis=2)[:, :, 0]
        cost[:, held] = (part.cost[None, :, :] * tried).sum(axis=2)
    return quality, cost


def cheapest_certified(cert: Any, lambdas: Sequence[float], cost: np.ndarray, top_cost: np.ndarray) -> Any:
    """Among the candidates fixed-sequence testing certified (0..index), the cheapest on the rows; the
    top tier itself when it is cheaper than all of them (then ``value`` is None: serve the top tier).

    Valid for LTT: fixed-sequence testing controls the family-wise error over every candidate it
    rejects, so any of them -- picked by cost, not by loss -- keeps the guarantee; the top tier's
    own loss (target - 1) * q_top is never positive."""
    import dataclasses

    if not cert.certified or cert.index is None:
        return cert
    means = cost[:cert.index + 1].mean(axis=1)
    best = int(np.argmin(means))
    if means[best] >= float(top_cost.mean()):
        return dataclasses.replace(cert, index=None, value=None, message=cert.message + (
            f"; every certified lambda costs >= the top tier on these rows ({means[best]:.4g} >= "
            f"{float(top_cost.mean()):.4g}): the top tier serves the task"))
    if best == cert.index:
        return cert
    return dataclasses.replace(cert, index=best, value=float(lambdas[best]), message=cert.message + (
        f"; cheapest of the certified candidates 0..{cert.index} on these rows: {lambdas[best]}"))


@dataclass
class CascadeRoutingFit:
    policy: CascadeRouting
    document: dict[str, Any]
    oof_quality: np.ndarray      # (m, n) out-of-fold quality per lambda (diagnostics)
    oof_cost: np.ndarray
    final: tuple = ()            # (estimator, sigmas, costs) fitted on every row


def fit_cascade_routing(data: CalibrationRows, targets: Mapping[str, float], guarantee: str = "ltt",
                        delta: float = 0.1, method: str = "wsr", lambdas: Sequence[float] = LAMBDA_GRID,
                        folds: int = 5, seed: int = 0, max_hops: int = 3, no_logprobs_policy: str = "trust_router",
                        min_n: int = 30, fold_of: Optional[np.ndarray] = None,
                        oof: Optional[tuple[np.ndarray, np.ndarray]] = None,
                        final: Optional[tuple[Any, dict, dict]] = None,
                        family: str = "cascade_routing") -> CascadeRoutingFit:
    """Cross-fitted, certified cascade routing on calibration rows (module docstring).

    ``oof`` / ``final`` reuse the out-of-fold decisions and the final estimator of an earlier call
    on the same rows and grid (the two guarantees differ only in the certificate)."""
    if guarantee not in GUARANTEES:
        raise ValueError(f"guarantee must be one of {GUARANTEES}, got {guarantee!r}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {tuple(FAMILIES)}, got {family!r}")
    lambdas = [float(v) for v in lambdas]
    safe_to_cheap = sorted(lambdas) if family == "cascade_routing" else sorted(lambdas, reverse=True)
    if lambdas != safe_to_cheap:
        raise ValueError("the knob values must be ordered safe -> cheap (lambda increasing, threshold decreasing)")
    quality, cost = oof if oof is not None else out_of_fold_quality(data, lambdas, folds, seed, max_hops,
                                                                     no_logprobs_policy, fold_of, family)
    top = data.K - 1
    certificates = {}
    for task in sorted(set(map(str, data.tasks))):
        rows = np.nonzero(data.tasks == task)[0]
        cert = certify_task(task, lambdas, quality[:, rows], data.quality[rows, top],
                            float(targets.get(task, 0.97)), guarantee=guarantee, delta=delta, method=method, min_n=min_n,
                            knob="lambda" if family == "cascade_routing" else "threshold")
        certificates[task] = cheapest_certified(cert, lambdas, cost[:, rows], data.cost[rows, top]) if guarantee == "ltt" else cert
    estimator, sigmas, costs = final if final is not None else fit_parts(data, seed)
    specs = {task: task_policy(family, cert.value if cert.certified else None, costs[task], sigmas[task],
                               cert.to_dict()) for task, cert in certificates.items()}
    policy = family_policy(family, specs, estimator, max_hops, no_logprobs_policy)
    document = {
        "policy": family, "guarantee": guarantee, "delta": delta if guarantee == "ltt" else None,
        "bound": method if guarantee == "ltt" else "crc", "targets": dict(targets),
        ("lambda_grid" if family == "cascade_routing" else "threshold_grid"): lambdas,
        "folds": folds, "n_calibration": int(len(data.tasks)),
        "tasks": {task: {**spec.to_dict(), "target": float(targets.get(task, 0.97))} for task, spec in specs.items()},
        "posterior": {"inline": estimator.to_dict()},
    }
    return CascadeRoutingFit(policy, document, quality, cost, (estimator, sigmas, costs))
