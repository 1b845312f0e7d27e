"""Fit the cascade thresholds delta[tier][task] on calibration queries and write thresholds JSON.

Exchangeability only holds for the queries that actually reach a tier: the router sends harder
queries to higher tiers, so a threshold fitted on all queries under-covers the routed ones
(DESIGN §3).  With a router artifact, the cascade is replayed in cost order by the proxy's own
decision policy (:class:`litellm_routenlp.policy.ConformalThresholds`, with the proxy's
``route_confidence``, ``max_hops`` and ``no_logprobs_policy``): each calibration query starts at the
tier the router picks; tier k's threshold is fitted on the queries that reach k (routed there, or
escalated there by the thresholds already fitted below it).  Without a router every tier is fitted
on all calibration queries of the task.  Tiers are 1-based here, as in the policy.

Output (read by :mod:`litellm_routenlp.thresholds`)::

    {"format_version": 1, "alpha": 0.05, "rule": "risk", "route_confidence": 0.5,
     "data_sha256": "...", "router_artifact": "..." | null, "created": "...",
     "thresholds": {"T1": {"banking77": {"delta": 0.31, "n": 480, "n_correct": 450,
                                         "violation": 0.041, "wilson_95": [0.025, 0.065]}}, ...}}

``violation`` is Pr[q < tau and u <= delta] on the queries that reached the tier (in-sample); the
top tier is listed with ``delta: null`` (it never escalates) and its plain error rate.  A cell that
cannot be certified (too few queries for alpha) gets delta = 0.0: escalate everything.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from calibration.conformal import (ESCALATE_ALL_DELTA, InsufficientCalibrationError, fit_delta, fit_delta_risk,
                                   violation_rate, wilson_interval)
from routenlp_core.allpairs import (AllPairsRecord, Portfolio, data_sha256, load_portfolio, read_allpairs,
                            records_sha256, tier_values)
from litellm_routenlp.config import RouterSettings
from litellm_routenlp.policy import (POLICY_FORMAT_VERSION, ConformalThresholds, PolicyAnswer, fitted_under, replay,
                                     router_sha256, should_escalate)
from litellm_routenlp.routers import Router, load_router, predict_served
from litellm_routenlp.routing import choose_tier
from litellm_routenlp.thresholds import Thresholds

FORMAT_VERSION = 2  # litellm_routenlp.policy.POLICY_FORMAT_VERSION; format 1 files still load
MIN_QUERIES_WARNING = 100
RULES = ("risk", "coverage")
PathLike = Union[str, os.PathLike[str]]
#: ``routenlp_settings.router`` shape: ``{kind, module, options}`` (litellm_routenlp.config.RouterSettings)
RouterSpec = Union[RouterSettings, Mapping[str, Any]]
logger = logging.getLogger(__name__)


def select_calibration_queries(records: Sequence[AllPairsRecord], n_calib: int, seed: int = 0) -> list[AllPairsRecord]:
    """Up to ``n_calib`` records per task, a seeded random sample (all of them when fewer)."""
    rng = np.random.default_rng(seed)
    chosen: list[AllPairsRecord] = []
    for task in sorted({record.task for record in records}):
        rows = [record for record in records if record.task == task]
        order = rng.permutation(len(rows))[:n_calib]
        chosen.extend(rows[i] for i in sorted(order))
    return chosen


def calibration_router(router_artifact: Union[PathLike, Router], router: Optional[RouterSpec] = None,
                       encoder_dir: Optional[PathLike] = None, router_quantized: bool = True) -> Router:
    """The router calibration replays: a :class:`~litellm_routenlp.routers.Router` as given, or the one
    the proxy's registry builds from ``router_artifact`` and ``router`` (``{kind, module, options}``,
    default kind ``encoder_head``) -- the same factory the proxy serves from, so any kind the proxy
    can serve can be calibrated."""
    if isinstance(router_artifact, (str, os.PathLike)):
        return load_router(router_artifact, router, encoder_dir=encoder_dir, router_quantized=router_quantized)
    if router is not None:
        raise ValueError("router settings are for building a router from router_artifact; a built router was given")
    if not isinstance(router_artifact, Router):
        raise TypeError(f"a {type(router_artifact).__name__} is not a router: a Router (litellm_routenlp.routers) has "
                        "tiers / tasks / artifact_dir / max_chars / blocking / predict(texts, tasks)")
    return router_artifact


def _router_identity(router: Router) -> tuple[Optional[str], Optional[str]]:
    """(``router_artifact``, ``fitted_under.router_sha256``) of the router: its artifact directory and
    the sha256 of its ``router.json`` (what the proxy hashes when it checks the file against the router
    it serves); None for a kind without an artifact."""
    artifact_dir = router.artifact_dir
    if artifact_dir is None:
        return None, None
    has_metadata = (Path(artifact_dir) / "router.json").is_file()
    return str(artifact_dir), router_sha256(artifact_dir) if has_metadata else None


def router_start_tiers(records: Sequence[AllPairsRecord], router: Router, route_confidence: float = 0.5) -> np.ndarray:
    """1-based tier the router sends each record to, decided as the proxy decides it."""
    probabilities = predict_served(router, [record.prompt for record in records],
                                   [record.task for record in records]).route
    every_tier = list(range(1, probabilities.shape[1] + 1))
    return np.array([choose_tier(row, every_tier, route_confidence)[0] for row in probabilities], dtype=np.int64)


def recorded_answer(record: AllPairsRecord, names: Sequence[str]) -> Any:
    """``answer(tier)`` for :func:`litellm_routenlp.policy.replay`: the record's answer at a 1-based tier."""
    def answer(tier: int) -> PolicyAnswer:
        result = record.tiers[names[tier - 1]]
        return PolicyAnswer(tier=tier, uncertainty=result.uncertainty, text=result.output, cost_usd=result.cost_usd)

    return answer


def replay_paths(records: Sequence[AllPairsRecord], rows: np.ndarray, names: Sequence[str], start_tiers: np.ndarray,
                 available: Sequence[int], policy: Any) -> list[list[int]]:
    """1-based tiers each of ``rows`` tries under ``policy`` from its start tier (the proxy's loop).

    A start tier that does not serve the task moves to the next that does, as the proxy's
    eligibility does."""
    tier_names = {k + 1: name for k, name in enumerate(names)}
    paths = []
    for row in rows:
        start = next(t for t in available if t >= int(start_tiers[row]))
        tried, _, _ = replay(policy, records[row].task, start, recorded_answer(records[row], names), available,
                             tier_names)
        paths.append(tried)
    return paths


def _cell(u: np.ndarray, q: np.ndarray, tau: float, delta: Optional[float],
          no_logprobs_policy: str = "trust_router") -> dict[str, Any]:
    """Diagnostics of one (tier, task) cell, with the calibration-time escalation rate.

    ``escalation_rate`` is the share of the queries reaching the tier whose answer the rule would
    escalate (u > delta, or no u under ``no_logprobs_policy: escalate``): the baseline of the paper's
    drift alert, which ``routenlp check`` compares live traffic against (issue 13)."""
    n = len(u)
    violation = violation_rate(list(u), list(q), tau, delta) if n else 0.0
    low, high = wilson_interval(round(violation * n), n)
    escalated = [should_escalate(None if np.isnan(value) else float(value), delta, no_logprobs_policy) for value in u]
    return {"delta": delta, "n": int(n), "n_correct": int(np.sum(q >= tau)),
            "violation": round(violation, 6), "wilson_95": [round(low, 6), round(high, 6)],
            "escalation_rate": round(float(np.mean(escalated)), 6) if n else None}


def check_not_degenerate(u: np.ndarray, q: np.ndarray, tau: float, tier: str, task: str) -> None:
    """Refuse data no threshold can be fitted on, whatever the routing: say which tier and task."""
    where = f"tier {tier}, task {task}"
    usable = ~np.isnan(u)
    if not usable.any():
        raise ValueError(f"calibration {where}: every uncertainty is null; this tier returns no logprobs, "
                         "so no threshold can be fitted (serve it with a no-logprobs policy instead)")
    if not np.any(q[usable] >= tau):
        raise ValueError(f"calibration {where}: no correctly handled query (quality >= {tau}) among {len(u)}; "
                         "the tier never meets the task's bar, remove it from the task or relabel")


def _fit_cell(u: np.ndarray, q: np.ndarray, tau: float, alpha: float, rule: str, tier: str, task: str) -> float:
    """delta for the queries reaching (tier, task); escalate-all (0.0) when it cannot be certified."""
    where = f"tier {tier}, task {task}"
    if len(u) < MIN_QUERIES_WARNING:
        message = (f"calibration {where}: only {len(u)} queries reach this tier "
                   f"(< {MIN_QUERIES_WARNING}); the threshold is loose")
        warnings.warn(message, stacklevel=3)
        logger.warning(message)
    usable = ~np.isnan(u)
    if np.any(~usable):
        logger.warning("calibration %s: %d queries without uncertainty are kept, not thresholded", where,
                       int(np.sum(~usable)))
    try:
        if rule == "risk":
            return fit_delta_risk(list(u), list(q), tau, alpha)
        return fit_delta(list(u), list(q >= tau), alpha)
    except InsufficientCalibrationError as error:
        message = f"calibration {where}: {error}; escalating everything (delta = {ESCALATE_ALL_DELTA})"
        warnings.warn(message, stacklevel=3)
        logger.warning(message)
        return ESCALATE_ALL_DELTA


NOT_SERVED_PREFIX = "not served"


def served_tiers(records: Sequence[AllPairsRecord], rows: np.ndarray, names: Sequence[str]) -> list[bool]:
    """Whether each tier serves the task at all: a tier whose every answer is a ``not served`` error
    (``model_info.routenlp_tasks`` excludes the task) is skipped by the proxy, so it is not part of the
    task's cascade and gets no threshold; queries routed there go on to the next tier."""
    out = []
    for name in names:
        errors = [records[i].tiers[name].error or "" for i in rows]
        out.append(not all(error.startswith(NOT_SERVED_PREFIX) for error in errors))
    return out


def fit_thresholds(records: Sequence[AllPairsRecord], portfolio: Portfolio, start_tiers: Optional[np.ndarray] = None,
                   alpha: float = 0.05, rule: str = "risk", max_hops: int = 3,
                   no_logprobs_policy: str = "trust_router") -> dict[str, dict[str, dict[str, Any]]]:
    """The ``thresholds`` mapping: per tier, per task, delta and its in-sample diagnostics.

    ``start_tiers`` (1-based, one per record) replays the routed cascade through the policy, tier by
    tier: tier k is fitted on the queries that reach it under the thresholds fitted below it.  None
    fits every tier on every record of the task.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    names = portfolio.tier_names
    quality = tier_values(records, names, "quality")
    uncertainty = tier_values(records, names, "uncertainty")
    tasks = np.array([record.task for record in records])
    thresholds: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in names}
    for task in sorted(set(tasks.tolist())):
        rows = np.nonzero(tasks == task)[0]
        tau = portfolio.tau(task)
        served = served_tiers(records, rows, names)
        for k, name in enumerate(names[:-1]):
            if served[k]:
                check_not_degenerate(uncertainty[rows, k], quality[rows, k], tau, name, task)
        available = [k + 1 for k in range(len(names)) if served[k] or k == len(names) - 1]
        for tier in available:
            k, name, top = tier - 1, names[tier - 1], tier == len(names)
            if start_tiers is None:
                reach = np.ones(len(rows), dtype=bool)
            else:  # replay with the thresholds fitted so far (tier k has none yet: it keeps every answer)
                policy = ConformalThresholds(Thresholds.from_cells(thresholds), max_hops=max_hops,
                                             no_logprobs_policy=no_logprobs_policy)
                paths = replay_paths(records, rows, names, start_tiers, available, policy)
                reach = np.array([tier in path for path in paths], dtype=bool)
            u, q = uncertainty[rows[reach], k], quality[rows[reach], k]
            delta = None if top else _fit_cell(u, q, tau, alpha, rule, name, task)
            thresholds[name][task] = _cell(u, q, tau, delta, no_logprobs_policy)
    return thresholds


def evaluate_thresholds(records: Sequence[AllPairsRecord], portfolio: Portfolio,
                        deltas: dict[str, dict[str, Optional[float]]],
                        start_tiers: Optional[np.ndarray] = None, max_hops: int = 3,
                        no_logprobs_policy: str = "trust_router") -> dict[str, dict[str, dict[str, Any]]]:
    """Replay fixed thresholds on (held-out) records: per tier and task, n, violation, Wilson 95%.

    Same replay as :func:`fit_thresholds` (the policy); a missing delta means the tier never escalates.
    """
    names = portfolio.tier_names
    quality = tier_values(records, names, "quality")
    uncertainty = tier_values(records, names, "uncertainty")
    tasks = np.array([record.task for record in records])
    fixed = Thresholds(deltas={tier: {task: float(d) for task, d in per_task.items() if d is not None}
                               for tier, per_task in deltas.items()})
    policy = ConformalThresholds(fixed, max_hops=max_hops, no_logprobs_policy=no_logprobs_policy)
    report: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in names}
    for task in sorted(set(tasks.tolist())):
        rows = np.nonzero(tasks == task)[0]
        tau = portfolio.tau(task)
        served = served_tiers(records, rows, names)
        available = [k + 1 for k in range(len(names)) if served[k] or k == len(names) - 1]
        paths = None if start_tiers is None else replay_paths(records, rows, names, start_tiers, available, policy)
        for tier in available:
            k, name = tier - 1, names[tier - 1]
            reach = (np.ones(len(rows), dtype=bool) if paths is None
                     else np.array([tier in path for path in paths], dtype=bool))
            delta = None if tier == len(names) else fixed.delta(name, task)
            report[name][task] = _cell(uncertainty[rows[reach], k], quality[rows[reach], k], tau, delta)
    return report


def deltas_of(document: dict[str, Any]) -> dict[str, dict[str, Optional[float]]]:
    """delta per tier and task from a thresholds document (as written by :func:`calibrate`)."""
    return {tier: {task: cell["delta"] for task, cell in per_task.items()}
            for tier, per_task in document["thresholds"].items()}


def _calibration_records(allpairs_path: Any, portfolio: Any) -> tuple[Portfolio, list[AllPairsRecord], str]:
    """(portfolio, records, sha256 of the data) from a path or records; no records is an error."""
    if not isinstance(portfolio, Portfolio):
        portfolio = load_portfolio(portfolio)
    if isinstance(allpairs_path, (str, os.PathLike)):
        records, data_hash = read_allpairs(allpairs_path, portfolio), data_sha256(allpairs_path)
    else:
        records = list(allpairs_path)
        data_hash = records_sha256(records)
    if not records:
        raise ValueError("no calibration records")
    return portfolio, records, data_hash


def _write_policy_file(document: dict[str, Any], out: Path, indent: int) -> None:
    """Write atomically (a temporary sibling, then ``os.replace``): a proxy never reads half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + ".tmp")
    temporary.write_text(json.dumps(document, indent=indent, allow_nan=False) + "\n")
    os.replace(temporary, out)


def calibrate(allpairs_path: Union[PathLike, Sequence[AllPairsRecord]], portfolio: Union[Portfolio, PathLike],
              router_artifact: Optional[Union[PathLike, Any]] = None, alpha: float = 0.05, n_calib: int = 500,
              out_path: Optional[PathLike] = None, rule: str = "risk", route_confidence: float = 0.5,
              seed: int = 0, encoder_dir: Optional[PathLike] = None, router_quantized: bool = True,
              max_hops: int = 3, no_logprobs_policy: str = "trust_router",
              router: Optional[RouterSpec] = None) -> dict[str, Any]:
    """Fit delta[tier][task] on up to ``n_calib`` calibration queries per task; write ``out_path``.

    ``router_artifact`` is the directory ``routenlp train`` wrote (built into a router by the proxy's
    registry under ``router``, the ``routenlp_settings.router`` shape; default kind ``encoder_head``),
    or an already built :class:`~litellm_routenlp.routers.Router`.  The records must not have been
    used to train the router.  ``rule="risk"`` (default) controls
    the violation rate Pr[q < tau and u <= delta] <= alpha (conformal risk control);
    ``rule="coverage"`` is DESIGN §3's quantile of correct answers' uncertainties, which bounds
    needless escalations of correct answers instead (see :mod:`calibration.conformal`).
    ``router_quantized``, ``max_hops`` and ``no_logprobs_policy`` should match the proxy's so the
    replayed cascade is the served one; they are recorded under ``fitted_under`` (with the router's
    sha256 and the task specs) and checked by :func:`litellm_routenlp.policy.check_fitted_under`.
    Returns the document written.
    """
    portfolio, records, data_hash = _calibration_records(allpairs_path, portfolio)
    chosen = select_calibration_queries(records, n_calib, seed)
    start_tiers, router_name, router_sha = None, None, None
    if router_artifact is not None:
        router_used = calibration_router(router_artifact, router, encoder_dir, router_quantized)
        router_name, router_sha = _router_identity(router_used)
        if list(router_used.tiers) != portfolio.tier_names:
            raise ValueError(f"router {router_name} has tiers {router_used.tiers}, the portfolio {portfolio.tier_names}")
        start_tiers = router_start_tiers(chosen, router_used, route_confidence)
    document = {
        "format_version": FORMAT_VERSION,
        "policy": "conformal_thresholds",
        "alpha": alpha,
        "rule": rule,
        "route_confidence": route_confidence if router_artifact is not None else None,
        "data_sha256": data_hash,
        "router_artifact": router_name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "fitted_under": fitted_under(router_sha, router_quantized if router_artifact is not None else None,
                                     no_logprobs_policy, max_hops,
                                     {task: {"tau": spec.tau, "kind": spec.kind} for task, spec in portfolio.tasks.items()},
                                     route_confidence if router_artifact is not None else None,
                                     router=getattr(router_used, "router_spec", None) if router_artifact is not None
                                     else None),
        "thresholds": fit_thresholds(chosen, portfolio, start_tiers, alpha, rule, max_hops, no_logprobs_policy),
    }
    if out_path is not None:
        _write_policy_file(document, Path(out_path), indent=2)
    return document


def calibrate_cascade_routing(allpairs_path: Union[PathLike, Sequence[AllPairsRecord]],
                              portfolio: Union[Portfolio, PathLike], router_artifact: Union[PathLike, Any],
                              out_path: Optional[PathLike] = None, guarantee: str = "ltt", delta: float = 0.1,
                              method: str = "wsr", target: float = 0.97, folds: int = 5, seed: int = 0,
                              encoder_dir: Optional[PathLike] = None, router_quantized: bool = True,
                              max_hops: int = 3, no_logprobs_policy: str = "trust_router",
                              family: str = "cascade_routing", router: Optional[RouterSpec] = None) -> dict[str, Any]:
    """Fit and certify ``family`` (``cascade_routing`` or ``posterior_threshold``) on calibration
    records; write the policy file (format 2).

    The records must not have been used to train the router (its ex-ante estimates must be out of
    sample); the posterior estimator is cross-fitted on them (:mod:`calibration.fit_cascade_routing`,
    which says what is held apart).  ``target`` is the quality ratio every task must keep against the
    top tier.  ``router_artifact`` and ``router`` are as for :func:`calibrate`; the router must give
    acceptance estimates.  The document records the policy, per-task lambda + certificate, costs,
    sigmas, the posterior estimator (inline) and ``fitted_under``;
    :func:`litellm_routenlp.policy.load_policy` reads it back.
    """
    # local: certification pulls in scipy.stats (~1.2 s), which the paper rule (calibrate, coopt evaluate) never needs
    from calibration.fit_cascade_routing import FAMILIES, CalibrationRows, fit_cascade_routing

    portfolio, records, data_hash = _calibration_records(allpairs_path, portfolio)
    router_used = calibration_router(router_artifact, router, encoder_dir, router_quantized)
    router_name, router_sha = _router_identity(router_used)
    names = portfolio.tier_names
    if list(router_used.tiers) != names:
        raise ValueError(f"router has tiers {router_used.tiers}, the portfolio {names}")
    tasks = np.array([record.task for record in records])
    available = {}
    for task in sorted(set(tasks.tolist())):
        served = served_tiers(records, np.nonzero(tasks == task)[0], names)
        available[task] = [k + 1 for k, ok in enumerate(served) if ok or k == len(names) - 1]
    quality = tier_values(records, names, "quality")
    ex_ante = predict_served(router_used, [r.prompt for r in records], list(tasks)).acceptance
    if ex_ante is None:
        raise ValueError(f"router {router_name or type(router_used).__name__} gives no acceptance estimates; "
                         f"policy {family} starts and stops on them (use the conformal_thresholds policy)")
    rows = CalibrationRows(tasks=tasks, ex_ante=ex_ante,
                           quality=quality, acceptable=quality >= np.array([portfolio.tau(t) for t in tasks])[:, None],
                           uncertainty=tier_values(records, names, "uncertainty"),
                           cost=tier_values(records, names, "cost_usd"),
                           outputs=[[r.tiers[name].output for name in names] for r in records], available=available)
    fitted = fit_cascade_routing(rows, {task: target for task in available}, guarantee=guarantee, delta=delta,
                                 method=method, folds=folds, seed=seed, max_hops=max_hops,
                                 no_logprobs_policy=no_logprobs_policy, family=family,
                                 lambdas=FAMILIES[family])
    document = {
        "format_version": POLICY_FORMAT_VERSION,
        **fitted.document,
        "target": target,
        "data_sha256": data_hash,
        "router_artifact": router_name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "fitted_under": fitted_under(router_sha, router_quantized, no_logprobs_policy, max_hops,
                                     {task: {"tau": spec.tau, "kind": spec.kind} for task, spec in portfolio.tasks.items()},
                                     router=getattr(router_used, "router_spec", None)),
    }
    for task, entry in document["tasks"].items():
        if not entry["certificate"]["certified"]:
            logger.warning("%s", entry["certificate"]["message"])
    if out_path is not None:
        _write_policy_file(document, Path(out_path), indent=1)
    return document
