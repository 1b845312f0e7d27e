"""One decision policy for start tier and escalation, shared by the proxy, calibration, bench and evaluate.

A request is decided in two kinds of step, and both live here so that every caller decides the same way:

* :meth:`DecisionPolicy.start` -- before any call: which tier answers first, from the router's
  estimates (:class:`StartState` -> :class:`StartDecision`);
* :meth:`DecisionPolicy.step` -- after each answer: stop and return the best answer so far, or ask a
  tier above every tier tried (tiers may be skipped) (:class:`StepState` -> :class:`StepDecision`).

Tiers are numbered 1..K, cheapest first, everywhere in this module (the bench's 0-based arrays convert
at one place, :func:`coopt.bench.routenlp.policy_routes`).  The proxy's :func:`cascade.run_cascade`
drives :meth:`step` with live answers; offline code drives it with recorded ones.  Money limits (a
key's budget) and provider failures stay in ``run_cascade``: they are not quality decisions.

Entries of :data:`POLICIES` (``register_policy("name")``):

``conformal_thresholds``
    The paper's rule, exactly as the proxy ran it before this module: the start tier is the cheapest
    available tier whose cumulative route probability reaches ``route_confidence``
    (:func:`routing.choose_tier`); after an answer at tier k, escalate to the next available tier
    while u > delta[k][task]; no threshold never escalates; no uncertainty follows
    ``no_logprobs_policy``; at most ``max_hops`` escalations.  The kept answer is the last one.

``cascade_routing``
    Dekoninck, Baader and Vechev, "A Unified Approach to Routing and Cascading for LLMs" (ICML 2025),
    written from the decision rule of their ``CascadeRouter`` (eth-sri/cascade-routing), not copied.
    With q_j the current estimate that tier j's answer is acceptable (the router's ex-ante estimate
    before any answer; the posterior estimator's after answers, which reads u, margin and agreement),
    every set J of untried tiers above the last one tried is scored by
    ``E[max(best estimate among tried, X_j for j in J)] - lambda_task * sum_{j in J} c_task,j``:
    the "supermodel" lookahead.  Untried tiers' future estimates are X_j ~ N(q_j, sigma_task,j^2)
    clipped to [0, 1] (sigma fitted offline as the spread of how much an answer moves its tier's
    estimate); tried tiers' estimates are known.  J = {} means stop; otherwise the cheapest tier of
    the best J is asked next (the paper's ``force_order``).  At the start the tried set is empty and
    J must be non-empty.  The answer returned is the tried one with the highest estimate.  c is the
    task's mean cost per tier over the calibration rows divided by the top tier's, so lambda is
    scale-free.  A task whose lambda could not be certified (``lambda: null``) goes to the top tier.

``posterior_threshold``
    The same estimates, a simpler monotone rule with one knob per task (:class:`PosteriorThreshold`):
    start at the cheapest tier below the top whose ex-ante estimate reaches the task's threshold t;
    after its answer stop if its posterior estimate reaches t, else ask the top tier and keep its
    answer.  t = 1 is the top tier for every query, so the certificate's fixed sequence starts at
    a safe point and every step down the grid only trades quality for cost.  The benchmark's
    default ``RouteNLP`` (README "Certified routing on the shared sets").
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Optional, Protocol, Sequence

import numpy as np

from .routers import spec_record
from .routing import choose_tier, next_tier_above

NO_LOGPROBS_POLICIES = ("trust_router", "escalate")
#: format of the policy file written by ``calibration.calibrate``: 1 = thresholds only (the paper's
#: rule), 2 = policy name, per-task lambda + certificate, costs, posterior estimator, fitted-under
POLICY_FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)


class PolicyError(ValueError):
    """A policy file or policy setting is malformed (the message names the file and field)."""


# ----------------------------------------------------------------------------------------- typed I/O


@dataclass(frozen=True)
class PolicyAnswer:
    """What a policy may read of one answer (same field names as ``quality_estimates.AnswerSignals``)."""

    tier: int                               # 1-based
    uncertainty: Optional[float]            # the one uncertainty function u; None: no logprobs
    margin: Optional[float] = None          # top-token margin where logprobs exist
    text: Optional[str] = None              # for agreement between answers
    cost_usd: float = 0.0


@dataclass(frozen=True)
class StartState:
    """Before any call: the router's outputs for one request and the tiers that may answer it."""

    task: Optional[str]
    available_tiers: tuple[int, ...]
    route_probabilities: Optional[tuple[float, ...]] = None   # p_k = P(cheapest acceptable = k)
    acceptance: Optional[tuple[float, ...]] = None            # ex-ante P(tier k acceptable), k = 1..K


@dataclass(frozen=True)
class StartDecision:
    tier: int
    reason: str
    estimates: Optional[tuple[float, ...]] = None
    lam: Optional[float] = None
    threshold: Optional[float] = None        # posterior_threshold: the task's certified threshold


@dataclass(frozen=True)
class StepState:
    """After the answers so far (cost order): what the next decision reads."""

    task: Optional[str]
    answers: tuple[PolicyAnswer, ...]
    available_tiers: tuple[int, ...]
    hops: int                                    # escalations made so far
    tier_names: Mapping[int, str] = field(default_factory=dict)
    acceptance: Optional[tuple[float, ...]] = None   # ex-ante estimates (cascade_routing)


#: why a policy stopped (``StepDecision.stop_reason``)
STOP_REASONS = ("confident", "no_threshold", "no_logprobs", "max_hops", "no_tier_above", "lookahead",
                "uncertified_task", "unknown_task")


@dataclass(frozen=True)
class StepDecision:
    """``ask`` a tier, or stop and return ``answer_tier``; ``reason`` says why in words."""

    action: str                                  # "stop" | "ask"
    answer_tier: int                             # best answer so far (returned when stopping)
    next_tier: Optional[int] = None
    stop_reason: Optional[str] = None
    reason: str = ""
    threshold: Optional[float] = None            # conformal_thresholds: delta used
    lam: Optional[float] = None                  # cascade_routing: lambda of the task
    estimates: Optional[tuple[float, ...]] = None  # cascade_routing: per-tier estimate after the answers

    @property
    def stop(self) -> bool:
        return self.action == "stop"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["estimates"] = None if self.estimates is None else [round(float(v), 6) for v in self.estimates]
        return out


class DecisionPolicy(Protocol):
    name: ClassVar[str]

    def start(self, state: StartState) -> StartDecision: ...

    def step(self, state: StepState) -> StepDecision: ...


POLICIES: dict[str, type] = {}


def register_policy(name: str) -> Callable[[type], type]:
    """Class decorator: ``@register_policy("mine")`` makes ``policy: mine`` loadable from a policy file."""

    def decorate(cls: type) -> type:
        cls.name = name
        POLICIES[name] = cls
        return cls

    return decorate


# ----------------------------------------------------------------------------------------- paper rule


def should_escalate(uncertainty: Optional[float], delta: Optional[float], no_logprobs_policy: str) -> bool:
    """u > delta escalates; no threshold never does; no uncertainty follows the declared policy."""
    if delta is None:
        return False
    if uncertainty is None:
        return no_logprobs_policy == "escalate"
    return uncertainty > delta


@register_policy("conformal_thresholds")
class ConformalThresholds:
    """The paper's rule (module docstring); ``thresholds`` is a :class:`thresholds.Thresholds` or None."""

    name: ClassVar[str]

    def __init__(self, thresholds: Any = None, route_confidence: float = 0.5, max_hops: int = 3,
                 no_logprobs_policy: str = "trust_router") -> None:
        if no_logprobs_policy not in NO_LOGPROBS_POLICIES:
            raise PolicyError(f"no_logprobs_policy must be one of {NO_LOGPROBS_POLICIES}, got {no_logprobs_policy!r}")
        self.thresholds = thresholds
        self.route_confidence = float(route_confidence)
        self.max_hops = int(max_hops)
        self.no_logprobs_policy = no_logprobs_policy

    def start(self, state: StartState) -> StartDecision:
        if state.route_probabilities is None:
            raise ValueError("conformal_thresholds starts from the router's route probabilities")
        tier, reason = choose_tier(state.route_probabilities, state.available_tiers, self.route_confidence)
        return StartDecision(tier=tier, reason=reason)

    def pre_check(self, state: StepState) -> Optional[StepDecision]:
        """The stop decisions that need no tier-health lookup (``run_cascade`` asks this first)."""
        current = state.answers[-1]
        name = state.tier_names.get(current.tier, f"T{current.tier}")
        delta = self._delta(state)

        def stop(code: str, why: str) -> StepDecision:
            return StepDecision("stop", current.tier, stop_reason=code, reason=why, threshold=delta)

        if state.hops >= self.max_hops:
            return stop("max_hops", f"{state.hops} escalations = max_hops")
        if not should_escalate(current.uncertainty, delta, self.no_logprobs_policy):
            if delta is None:
                return stop("no_threshold", f"no threshold for {name}/{state.task}: keep")
            if current.uncertainty is None:
                return stop("no_logprobs", f"no uncertainty, no_logprobs_policy={self.no_logprobs_policy}")
            return stop("confident", f"u={current.uncertainty:.4f}<=delta={delta:.4f}")
        return None

    def _delta(self, state: StepState) -> Optional[float]:
        current = state.answers[-1]
        name = state.tier_names.get(current.tier, f"T{current.tier}")
        return (self.thresholds.delta(name, state.task)
                if (self.thresholds is not None and state.task is not None) else None)

    def step(self, state: StepState) -> StepDecision:
        early = self.pre_check(state)
        if early is not None:
            return early
        current = state.answers[-1]
        delta = self._delta(state)
        target = next_tier_above(current.tier, state.available_tiers)
        if target is None:
            return StepDecision("stop", current.tier, stop_reason="no_tier_above", reason="no available tier above",
                                threshold=delta)
        why = ("no uncertainty, no_logprobs_policy=escalate" if current.uncertainty is None
               else f"u={current.uncertainty:.4f}>delta={delta:.4f}")
        return StepDecision("ask", current.tier, next_tier=target, reason=why, threshold=delta)

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.name, "route_confidence": self.route_confidence, "max_hops": self.max_hops,
                "no_logprobs_policy": self.no_logprobs_policy}


# ----------------------------------------------------------------------------------------- cascade routing

#: midpoints of the integration grid of E[max(c, X_J)] (error <= (1 - c) / (2 * GRID), the same for
#: every candidate set, so comparisons between sets are not biased by it)
GRID = 64
_MIDPOINTS = (np.arange(GRID) + 0.5) / GRID


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    """Phi(z) without scipy: erf by Abramowitz-Stegun 7.1.26 (absolute error < 1.5e-7)."""
    x = np.abs(z) / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf = 1.0 - poly * np.exp(-x * x)
    return 0.5 * (1.0 + np.sign(z) * erf)


def expected_best(known: float, means: Sequence[float], sigmas: Sequence[float]) -> np.ndarray:
    """E[max(known, X_J)] for every subset J of the untried tiers (bit i of the row index = tier i in J).

    X_j ~ N(means[j], sigmas[j]^2) clipped to [0, 1], independent.  Row 0 (J empty) is ``known``.
    E[max(c, Y)] = c + int_c^1 P(Y > x) dx, with P(Y > x) = 1 - prod_j Phi((x - mu_j) / sigma_j),
    integrated by the midpoint rule on [c, 1].
    """
    m = len(means)
    c = min(max(float(known), 0.0), 1.0)
    xs = c + (1.0 - c) * _MIDPOINTS                                   # (G,)
    mu = np.asarray(means, dtype=np.float64)[:, None]
    sd = np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-6)[:, None]
    log_cdf = np.log(np.maximum(_normal_cdf((xs[None, :] - mu) / sd), 1e-300))   # (m, G)
    subsets = ((np.arange(2 ** m)[:, None] >> np.arange(m)[None, :]) & 1).astype(np.float64)  # (2^m, m)
    below = np.exp(subsets @ log_cdf)                                  # P(Y <= x) per subset
    return c + (1.0 - c) * (1.0 - below).mean(axis=1)


@dataclass(frozen=True)
class TaskPolicy:
    """cascade_routing's per-task numbers: lambda (None: not certified -> top tier), costs, sigmas."""

    lam: Optional[float]
    costs: tuple[float, ...]          # mean cost per tier / the top tier's (1-based tier k at index k-1)
    sigmas: tuple[float, ...]         # spread of an answer's effect on its tier's estimate
    certificate: Optional[dict[str, Any]] = None
    #: posterior_threshold's knob: stop at a tier whose estimate reaches it (None: not certified)
    threshold: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        out = {"lambda": self.lam, "costs": list(self.costs), "sigmas": list(self.sigmas),
               "certificate": self.certificate}
        if self.threshold is not None or self.lam is None:
            out["threshold"] = self.threshold
        return out


def _as_signals(answers: Sequence[PolicyAnswer]) -> list[Any]:
    """The posterior estimator's own answer type when it is installed (duck-typed otherwise)."""
    try:
        from .quality_estimates import AnswerSignals
    except ImportError:  # pragma: no cover - the module ships with the package
        return list(answers)
    return [AnswerSignals(tier=a.tier, uncertainty=a.uncertainty, margin=a.margin, text=a.text) for a in answers]


#: which answer cascade_routing returns: the paper's (highest estimate among the answers) or the
#: most capable tier's answer (a cascade's; the lookahead still decides whether to ask)
ANSWER_RULES = ("best_estimate", "last")


@register_policy("cascade_routing")
class CascadeRouting:
    """Cascade routing (module docstring).  ``estimator.predict(task, ex_ante, answers) -> (K,)``."""

    name: ClassVar[str]

    def __init__(self, tasks: Mapping[str, TaskPolicy], estimator: Any = None, max_hops: int = 3,
                 no_logprobs_policy: str = "trust_router", memo: Optional[dict] = None,
                 answer_rule: str = "best_estimate") -> None:
        if no_logprobs_policy not in NO_LOGPROBS_POLICIES:
            raise PolicyError(f"no_logprobs_policy must be one of {NO_LOGPROBS_POLICIES}, got {no_logprobs_policy!r}")
        if answer_rule not in ANSWER_RULES:
            raise PolicyError(f"answer_rule must be one of {ANSWER_RULES}, got {answer_rule!r}")
        self.answer_rule = answer_rule
        self.tasks = dict(tasks)
        self.estimator = estimator
        self.max_hops = int(max_hops)
        self.no_logprobs_policy = no_logprobs_policy
        #: offline replays over a lambda grid pass a dict: E[max] per (estimates, sigmas) does not
        #: depend on lambda, so it is computed once per row and state (the proxy passes none)
        self.memo = memo

    # -- estimates
    def estimates(self, task: str, acceptance: Sequence[float], answers: Sequence[PolicyAnswer]) -> np.ndarray:
        """Per-tier P(acceptable) after ``answers`` (the ex-ante estimate when there are none)."""
        ex_ante = np.clip(np.asarray(acceptance, dtype=np.float64), 0.0, 1.0)
        if not answers or self.estimator is None:
            return ex_ante
        return np.clip(np.asarray(self.estimator.predict(task, ex_ante, _as_signals(answers)), dtype=np.float64),
                       0.0, 1.0)

    def lookahead(self, spec: TaskPolicy, estimates: np.ndarray, tried: Sequence[int],
                  candidates: Sequence[int], max_new: int) -> tuple[tuple[int, ...], float, float]:
        """Best set of tiers to add (empty: stop), its value and the value of stopping."""
        known = max((float(estimates[t - 1]) for t in tried), default=0.0)
        cands = list(candidates)
        means, sigmas = [float(estimates[t - 1]) for t in cands], [spec.sigmas[t - 1] for t in cands]
        if self.memo is None:
            values = expected_best(known, means, sigmas)
        else:
            key = (known, tuple(means), tuple(sigmas))
            values = self.memo.get(key)
            if values is None:
                values = self.memo[key] = expected_best(known, means, sigmas)
        best, best_value, best_cost = (), -math.inf, math.inf
        for index in range(len(values)):
            chosen = tuple(t for bit, t in enumerate(cands) if index >> bit & 1)
            if len(chosen) > max_new or (not tried and not chosen):
                continue
            cost = sum(spec.costs[t - 1] for t in chosen)
            value = round(float(values[index]) - spec.lam * cost, 10)
            if value > best_value or (value == best_value and cost < best_cost):
                best, best_value, best_cost = chosen, value, cost
        stop_value = float(values[0]) if tried else -math.inf
        return best, best_value, stop_value

    def _spec(self, task: Optional[str]) -> Optional[TaskPolicy]:
        return self.tasks.get(task) if task is not None else None

    def start(self, state: StartState) -> StartDecision:
        tiers = sorted(set(state.available_tiers))
        if not tiers:
            raise ValueError("no tier is available")
        spec = self._spec(state.task)
        if spec is None or spec.lam is None or state.acceptance is None:
            why = ("unknown task" if spec is None else "lambda not certified for the task" if spec.lam is None
                   else "no ex-ante estimate")
            return StartDecision(tier=tiers[-1], reason=f"{why}: top available tier",
                                 lam=None if spec is None else spec.lam)
        estimates = self.estimates(state.task, state.acceptance, ())
        chosen, value, _ = self.lookahead(spec, estimates, (), tiers, self.max_hops + 1)
        return StartDecision(tier=chosen[0], reason=f"lookahead set {list(chosen)} value {value:.4f}",
                             estimates=tuple(float(v) for v in estimates), lam=spec.lam)

    def pre_check(self, state: StepState) -> Optional[StepDecision]:
        """Stop decisions that need neither tier health nor the posterior (``run_cascade`` asks first)."""
        spec = self._spec(state.task)
        current = state.answers[-1]
        if spec is None or spec.lam is None or state.acceptance is None:
            code = "unknown_task" if spec is None else "uncertified_task"
            return StepDecision("stop", current.tier, stop_reason=code,
                                reason="no certified lambda or no ex-ante estimate: keep the answer")
        if len(state.answers) == 1 and state.hops >= self.max_hops:
            return StepDecision("stop", current.tier, stop_reason="max_hops", lam=spec.lam,
                                reason=f"{state.hops} escalations = max_hops")
        return None

    def step(self, state: StepState) -> StepDecision:
        early = self.pre_check(state)
        if early is not None:
            return early
        spec = self._spec(state.task)
        tried = [a.tier for a in state.answers]
        current = state.answers[-1]
        estimates = self.estimates(state.task, state.acceptance, state.answers)
        best_answer = (max(tried, key=lambda t: (float(estimates[t - 1]), t)) if self.answer_rule == "best_estimate"
                       else max(tried))
        as_tuple = tuple(float(v) for v in estimates)

        def stop(code: str, why: str) -> StepDecision:
            return StepDecision("stop", best_answer, stop_reason=code, reason=why, lam=spec.lam, estimates=as_tuple)

        if state.hops >= self.max_hops:
            return stop("max_hops", f"{state.hops} escalations = max_hops")
        above = [t for t in sorted(set(state.available_tiers)) if t > max(tried)]
        if not above:
            return stop("no_tier_above", "no available tier above")
        if current.uncertainty is None and self.no_logprobs_policy == "escalate":
            return StepDecision("ask", best_answer, next_tier=above[0], lam=spec.lam, estimates=as_tuple,
                                reason="no uncertainty, no_logprobs_policy=escalate")
        chosen, value, stop_value = self.lookahead(spec, estimates, tried, above, self.max_hops - state.hops)
        if not chosen:
            return stop("lookahead", f"stop value {stop_value:.4f} >= any set of tiers above")
        return StepDecision("ask", best_answer, next_tier=chosen[0], lam=spec.lam, estimates=as_tuple,
                            reason=f"set {list(chosen)} value {value:.4f} > stop {stop_value:.4f}")

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.name, "max_hops": self.max_hops, "no_logprobs_policy": self.no_logprobs_policy,
                "answer_rule": self.answer_rule, "tasks": {task: spec.to_dict() for task, spec in self.tasks.items()}}


@register_policy("posterior_threshold")
class PosteriorThreshold(CascadeRouting):
    """A threshold cascade on the per-tier estimates, one certified knob per task (module docstring).

    Start at the cheapest available tier below the top whose ex-ante estimate reaches the task's
    threshold t (else the top tier); after its answer, stop when the tier's posterior estimate
    reaches t, otherwise ask the top available tier (tiers in between are skipped) and return its
    answer.  WHY this family next to ``cascade_routing``: for a certificate against the top tier the
    family must be monotone with the top tier at its safe end (t -> 1 asks the top tier for every
    query) and must not pay for tiers in between; the lookahead's independence assumption makes
    cascade routing ask 2-3 tiers at small lambda (cost above the top tier's), so its certified
    lambdas bought little (README "Certified cascade routing").  Same estimates as cascade routing
    (ex-ante + posterior), same interface, same replay."""

    name: ClassVar[str]

    def _threshold(self, task: Optional[str]) -> Optional[float]:
        spec = self._spec(task)
        return None if spec is None else spec.threshold

    def start(self, state: StartState) -> StartDecision:
        tiers = sorted(set(state.available_tiers))
        if not tiers:
            raise ValueError("no tier is available")
        spec = self._spec(state.task)
        t = self._threshold(state.task)
        if spec is None or t is None or state.acceptance is None:
            why = ("unknown task" if spec is None else "threshold not certified for the task" if t is None
                   else "no ex-ante estimate")
            return StartDecision(tier=tiers[-1], reason=f"{why}: top available tier")
        estimates = self.estimates(state.task, state.acceptance, ())
        tier = next((k for k in tiers[:-1] if float(estimates[k - 1]) >= t), tiers[-1])
        return StartDecision(tier=tier, reason=f"cheapest tier with ex-ante estimate >= {t:.4f}",
                             estimates=tuple(float(v) for v in estimates), threshold=t)

    def pre_check(self, state: StepState) -> Optional[StepDecision]:
        current = state.answers[-1]
        if self._spec(state.task) is None or self._threshold(state.task) is None or state.acceptance is None:
            code = "unknown_task" if self._spec(state.task) is None else "uncertified_task"
            return StepDecision("stop", current.tier, stop_reason=code,
                                reason="no certified threshold or no ex-ante estimate: keep the answer")
        if state.hops >= self.max_hops:
            return StepDecision("stop", current.tier, stop_reason="max_hops", reason=f"{state.hops} escalations = max_hops")
        return None

    def step(self, state: StepState) -> StepDecision:
        early = self.pre_check(state)
        if early is not None:
            return early
        t = float(self._threshold(state.task))
        current = state.answers[-1]
        estimates = self.estimates(state.task, state.acceptance, state.answers)
        as_tuple = tuple(float(v) for v in estimates)
        above = [k for k in sorted(set(state.available_tiers)) if k > current.tier]
        if not above:
            return StepDecision("stop", current.tier, stop_reason="no_tier_above", reason="no available tier above",
                                threshold=t, estimates=as_tuple)
        if current.uncertainty is None and self.no_logprobs_policy == "escalate":
            return StepDecision("ask", current.tier, next_tier=above[-1], threshold=t, estimates=as_tuple,
                                reason="no uncertainty, no_logprobs_policy=escalate")
        estimate = float(estimates[current.tier - 1])
        if estimate >= t:
            return StepDecision("stop", current.tier, stop_reason="confident", threshold=t, estimates=as_tuple,
                                reason=f"estimate {estimate:.4f} >= threshold {t:.4f}")
        return StepDecision("ask", current.tier, next_tier=above[-1], threshold=t, estimates=as_tuple,
                            reason=f"estimate {estimate:.4f} < threshold {t:.4f}: ask the top available tier")


# ----------------------------------------------------------------------------------------- the file


def read_policy_document(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The policy file as a dict; a missing, truncated or non-object file is a :class:`PolicyError`."""
    return _read_json(Path(path))


def _read_json(path: Path) -> dict[str, Any]:
    from .json_files import read_json_object

    return read_json_object(path, PolicyError, "policy file", " (run `routenlp calibrate`)")


def format_version(document: Mapping[str, Any], where: str) -> int:
    version = document.get("format_version", 1)
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise PolicyError(f"{where}: format_version {version!r} is not one this version reads "
                          f"({', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); re-run `routenlp calibrate`")
    return int(version)


def _number(value: Any, where: str, low: float = 0.0) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) or value < low:
        raise PolicyError(f"{where}: must be a number >= {low}, got {value!r}")
    return float(value)


def task_policies(document: Mapping[str, Any], where: str) -> dict[str, TaskPolicy]:
    """``tasks`` of a cascade_routing file, validated (the message names file and field)."""
    raw = document.get("tasks")
    if not isinstance(raw, dict) or not raw:
        raise PolicyError(f"{where}: cascade_routing needs a non-empty `tasks` mapping")
    out = {}
    for task, entry in raw.items():
        at = f"{where}: tasks.{task}"
        if not isinstance(entry, dict):
            raise PolicyError(f"{at}: expected an object")
        lam = entry.get("lambda")
        lam = None if lam is None else _number(lam, f"{at}.lambda")
        threshold = entry.get("threshold")
        threshold = None if threshold is None else _number(threshold, f"{at}.threshold")
        if threshold is not None and threshold > 1.0 + 1e-6:
            raise PolicyError(f"{at}.threshold: must lie in [0, 1], got {threshold!r}")
        vectors = {}
        for key in ("costs", "sigmas"):
            values = entry.get(key)
            if not isinstance(values, list) or not values:
                raise PolicyError(f"{at}.{key}: expected a list with one number per tier")
            vectors[key] = tuple(_number(v, f"{at}.{key}[{i}]") for i, v in enumerate(values))
        if len(vectors["costs"]) != len(vectors["sigmas"]):
            raise PolicyError(f"{at}: costs and sigmas must have one entry per tier")
        out[task] = TaskPolicy(lam=lam, costs=vectors["costs"], sigmas=vectors["sigmas"],
                               certificate=entry.get("certificate"), threshold=threshold)
    return out


def load_estimator(document: Mapping[str, Any], base: Optional[Path], where: str) -> Any:
    """The posterior estimator a policy file names: inline JSON or a sibling file checked by sha256."""
    raw = document.get("posterior")
    if raw is None:
        return None
    from .quality_estimates import PosteriorEstimator

    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: posterior must be an object ({{inline: ...}} or {{path, sha256}})")
    if "inline" in raw:
        return PosteriorEstimator.from_dict(raw["inline"])
    if "path" not in raw:
        raise PolicyError(f"{where}: posterior needs `inline` or `path`")
    from routenlp_core.hashing import sha256_file

    path = Path(raw["path"])
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.is_file():
        raise PolicyError(f"{where}: posterior.path {path} not found")
    if raw.get("sha256") and sha256_file(path) != raw["sha256"]:
        raise PolicyError(f"{where}: posterior.sha256 does not match {path} (file changed after calibration)")
    return PosteriorEstimator.load(path)


def _setting(settings: Any, key: str, default: Any = None) -> Any:
    if settings is None:
        return default
    if isinstance(settings, Mapping):
        return settings.get(key, default)
    return getattr(settings, key, default)


def policy_from_document(document: Mapping[str, Any], settings: Any = None, where: str = "policy",
                         base: Optional[Path] = None) -> Any:
    """The policy object a (validated) policy document describes; ``settings`` supply the serving knobs."""
    from .thresholds import Thresholds

    format_version(document, where)
    name = document.get("policy", "conformal_thresholds")
    if name not in POLICIES:
        raise PolicyError(f"{where}: policy {name!r} unknown; registered: {', '.join(POLICIES)}")
    fitted = document.get("fitted_under") or {}
    max_hops = _setting(settings, "max_hops", fitted.get("max_hops", 3))
    no_logprobs = _setting(settings, "no_logprobs_policy", fitted.get("no_logprobs_policy", "trust_router"))
    if name == "conformal_thresholds":
        thresholds = Thresholds.from_document(document, where) if document.get("thresholds") else None
        return ConformalThresholds(thresholds, route_confidence=_setting(
            settings, "route_confidence", document.get("route_confidence") or 0.5), max_hops=max_hops,
            no_logprobs_policy=no_logprobs)
    if name == "posterior_threshold":
        return PosteriorThreshold(task_policies(document, where), load_estimator(document, base, where),
                                  max_hops=max_hops, no_logprobs_policy=no_logprobs)
    if name == "cascade_routing":
        rule = document.get("answer_rule", "best_estimate")
        if rule not in ANSWER_RULES:
            raise PolicyError(f"{where}: answer_rule must be one of {ANSWER_RULES}, got {rule!r}")
        return CascadeRouting(task_policies(document, where), load_estimator(document, base, where),
                              max_hops=max_hops, no_logprobs_policy=no_logprobs, answer_rule=rule)
    return POLICIES[name].from_document(document, settings)  # a user's registered policy


def load_policy(source: Any) -> Any:
    """A policy from a file path, or from settings (``thresholds_path`` plus the serving knobs)."""
    if isinstance(source, (str, os.PathLike)):
        path, settings = Path(source), None
    else:
        path = _setting(source, "policy_path") or _setting(source, "thresholds_path")
        settings = source
        if path is None:
            return ConformalThresholds(None, route_confidence=_setting(source, "route_confidence", 0.5),
                                       max_hops=_setting(source, "max_hops", 3),
                                       no_logprobs_policy=_setting(source, "no_logprobs_policy", "trust_router"))
        path = Path(path)
    return policy_from_document(_read_json(path), settings, where=str(path), base=path.parent)


def router_sha256(artifact_dir: str | os.PathLike[str]) -> str:
    """The router's identity: sha256 of its ``router.json`` (which pins every graph's sha256)."""
    from routenlp_core.hashing import sha256_file

    return sha256_file(Path(artifact_dir) / "router.json")


def fitted_under(router_sha: Optional[str], router_quantized: Optional[bool], no_logprobs_policy: str,
                 max_hops: int, tasks: Mapping[str, Mapping[str, Any]],
                 route_confidence: Optional[float] = None,
                 router: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The ``fitted_under`` block of a policy file: what the decisions were fitted under.

    ``router`` is the router's ``{kind, options}`` (``routers.spec_record``; None: not known, e.g. a
    router object built outside the registry)."""
    return {"router_sha256": router_sha, "router": None if router is None else dict(router),
            "router_quantized": router_quantized,
            "no_logprobs_policy": no_logprobs_policy, "max_hops": int(max_hops),
            "route_confidence": route_confidence,
            "tasks": {task: {"tau": float(spec["tau"]), "kind": str(spec["kind"])} for task, spec in tasks.items()}}


def check_fitted_under(document: Mapping[str, Any], settings: Any, router_sha: Optional[str]) -> list[str]:
    """Fields whose serving value differs from the one the policy file was fitted under.

    ``settings`` is the proxy's settings (object or dict: router_quantized, no_logprobs_policy,
    max_hops, route_confidence, tasks {name: {tau, kind}}).  A field the file does not record (a
    format-1 file records none of them) is not checked.  Returns names such as ``router_sha256`` or
    ``tasks.banking77.tau``; empty when everything matches.
    """
    fitted = document.get("fitted_under") or {}
    out = []
    if fitted.get("router_sha256") is not None and router_sha is not None and fitted["router_sha256"] != router_sha:
        out.append("router_sha256")
    recorded_router = fitted.get("router")
    if isinstance(recorded_router, Mapping):  # the kind (and options) the decisions were replayed with
        served_router = spec_record(_setting(settings, "router"))
        for key in ("kind", "options"):
            if recorded_router.get(key) is not None and recorded_router.get(key) != served_router[key]:
                out.append(f"router.{key}")
    for key in ("router_quantized", "no_logprobs_policy", "max_hops", "route_confidence"):
        recorded = fitted.get(key)
        if recorded is None or (key == "route_confidence" and document.get("policy") in ("cascade_routing", "posterior_threshold")):
            continue
        current = _setting(settings, key)
        if current is not None and current != recorded:
            out.append(key)
    served = _setting(settings, "tasks") or {}
    for task, spec in (fitted.get("tasks") or {}).items():
        if task not in served:
            out.append(f"tasks.{task}")
            continue
        for key in ("tau", "kind"):
            value = _setting(served[task], key)
            if value is not None and spec.get(key) is not None and value != spec[key]:
                out.append(f"tasks.{task}.{key}")
    return out


def decide_start(policy: Any, task: Optional[str], available_tiers: Sequence[int],
                 route_probabilities: Optional[Sequence[float]] = None,
                 acceptance: Optional[Sequence[float]] = None) -> StartDecision:
    """Convenience: build the :class:`StartState` and ask ``policy`` for the first tier."""
    return policy.start(StartState(task=task, available_tiers=tuple(available_tiers),
                                   route_probabilities=None if route_probabilities is None
                                   else tuple(float(p) for p in route_probabilities),
                                   acceptance=None if acceptance is None else tuple(float(p) for p in acceptance)))


def replay(policy: Any, task: str, start: int, answer: Callable[[int], PolicyAnswer], available_tiers: Sequence[int],
           tier_names: Mapping[int, str], acceptance: Optional[Sequence[float]] = None,
           ) -> tuple[list[int], int, StepDecision]:
    """Run ``policy`` over recorded answers (no I/O): the tiers tried, the kept tier, the last decision.

    The synchronous twin of :func:`cascade.run_cascade` for offline callers; the decisions come from
    the same ``policy.step``.
    """
    answers = [answer(start)]
    available = tuple(available_tiers)
    ex_ante = None if acceptance is None else tuple(float(p) for p in acceptance)
    hops = 0
    while True:
        decision = policy.step(StepState(task=task, answers=tuple(answers), available_tiers=available, hops=hops,
                                         tier_names=tier_names, acceptance=ex_ante))
        if decision.stop:
            return [a.tier for a in answers], decision.answer_tier, decision
        answers.append(answer(decision.next_tier))
        hops += 1


__all__ = ["POLICIES", "register_policy", "load_policy", "policy_from_document", "check_fitted_under",
           "fitted_under", "router_sha256", "ConformalThresholds", "CascadeRouting", "PosteriorThreshold", "TaskPolicy", "PolicyAnswer",
           "StartState", "StartDecision", "StepState", "StepDecision", "PolicyError", "should_escalate",
           "expected_best", "decide_start", "replay"]
