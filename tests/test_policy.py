"""The decision-policy interface: the paper rule unchanged, cascade routing's rule, the policy file."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest

from litellm_routenlp.cascade import TierAnswer, run_cascade
from litellm_routenlp.policy import (POLICIES, CascadeRouting, ConformalThresholds, PolicyAnswer, PolicyError,
                                     StartState, StepState, TaskPolicy, check_fitted_under, expected_best,
                                     fitted_under, load_policy, replay)
from litellm_routenlp.quality_estimates import PosteriorEstimator
from litellm_routenlp.routers import RouterEstimates
from litellm_routenlp.thresholds import Thresholds

NAMES = {1: "T1", 2: "T2", 3: "T3", 4: "T4"}


def test_registry_names_both_policies():
    assert {"conformal_thresholds", "cascade_routing"} <= set(POLICIES)


def test_paper_rule_replay_equals_the_proxy_cascade_on_random_cases():
    """policy.replay (offline) and run_cascade (proxy) walk the same tiers for 300 random requests."""
    rng = np.random.default_rng(3)
    for case in range(300):
        deltas = {f"T{k}": {"t": float(rng.uniform(0.1, 0.6))} for k in range(1, 4) if rng.random() < 0.8}
        u = {k: (None if rng.random() < 0.15 else float(rng.uniform(0, 1))) for k in range(1, 5)}
        available = sorted({1, 4} | {k for k in (2, 3) if rng.random() < 0.7})
        max_hops = int(rng.integers(0, 4))
        no_logprobs = "escalate" if case % 2 else "trust_router"
        start = int(rng.choice(available))
        policy = ConformalThresholds(Thresholds(deltas=deltas), max_hops=max_hops, no_logprobs_policy=no_logprobs)
        path, kept, _ = replay(policy, "t", start, lambda k: PolicyAnswer(k, u[k]), available, NAMES)

        async def ask(k):
            return TierAnswer(k, f"a{k}", u[k], 0.0, 1.0)

        async def healthy():
            return available

        result = asyncio.run(run_cascade(TierAnswer(start, f"a{start}", u[start], 0.0, 1.0), "t",
                                         Thresholds(deltas=deltas), NAMES, healthy, ask, max_hops, no_logprobs))
        assert result.path == path and result.final.tier == kept == path[-1], (case, deltas, u, available)


def test_paper_rule_start_is_choose_tier():
    policy = ConformalThresholds(route_confidence=0.5)
    decision = policy.start(StartState(task="t", available_tiers=(1, 2, 3, 4), route_probabilities=(0.1, 0.3, 0.4, 0.2)))
    assert decision.tier == 3


def test_expected_best_matches_the_normal_formula():
    # E[max(c, X)], X ~ N(0.4, 0.1^2): c + (mu - c)(1 - Phi(z)) + sigma phi(z), z = (c - mu) / sigma = 1
    phi, Phi = math.exp(-0.5) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    exact = 0.5 + (0.4 - 0.5) * (1 - Phi) + 0.1 * phi
    values = expected_best(0.5, [0.4], [0.1])
    assert values[0] == pytest.approx(0.5)
    assert values[1] == pytest.approx(exact, abs=1e-3)
    # with no spread the lookahead is deterministic: max(c, mu)
    assert expected_best(0.9, [0.95], [0.0])[1] == pytest.approx(0.95, abs=1e-9)


def _routing(lam, sigmas=(0.0, 0.0, 0.0), costs=(0.05, 0.1, 1.0)):
    return CascadeRouting({"t": TaskPolicy(lam=lam, costs=costs, sigmas=sigmas)}, estimator=None)


def test_cascade_routing_stops_or_asks_by_quality_minus_lambda_cost():
    """T1 answered; estimates (0.9, -, 0.95) with no spread: asking T3 gains 0.05 for cost 1.0 x lambda."""
    state = StepState(task="t", answers=(PolicyAnswer(1, 0.2),), available_tiers=(1, 3), hops=0,
                      acceptance=(0.9, 0.5, 0.95))
    stop = _routing(0.1).step(state)           # 0.95 - 0.1 = 0.85 < 0.9: stop
    assert stop.stop and stop.stop_reason == "lookahead" and stop.answer_tier == 1
    go = _routing(0.01).step(state)            # 0.95 - 0.01 = 0.94 > 0.9: ask T3
    assert go.action == "ask" and go.next_tier == 3


def test_cascade_routing_skips_a_tier_and_returns_the_best_estimated_answer():
    """Estimates 0.5 / 0.6 / 0.95, costs 0.05 / 0.1 / 1, lambda 0.2: {T3} (0.75) beats {T2} (0.58),
    {T2, T3} (0.73) and stopping (0.5), so T2 is skipped."""
    state = StepState(task="t", answers=(PolicyAnswer(1, 0.9),), available_tiers=(1, 2, 3), hops=0,
                      acceptance=(0.5, 0.6, 0.95))
    decision = _routing(0.2).step(state)
    assert decision.action == "ask" and decision.next_tier == 3
    # after T3 answered nothing is left above: stop with the highest estimate among the answers
    after = StepState(task="t", answers=(PolicyAnswer(1, 0.9), PolicyAnswer(3, 0.1)), available_tiers=(1, 2, 3),
                      hops=1, acceptance=(0.97, 0.6, 0.95))
    final = _routing(0.2).step(after)
    assert final.stop and final.stop_reason == "no_tier_above" and final.answer_tier == 1


def test_cascade_routing_start_and_uncertified_task():
    policy = _routing(0.2)
    start = policy.start(StartState(task="t", available_tiers=(1, 2, 3), acceptance=(0.5, 0.6, 0.95)))
    assert start.tier == 3  # value 0.95 - 0.2 beats 0.5 - 0.01 and 0.6 - 0.02
    uncertified = CascadeRouting({"t": TaskPolicy(lam=None, costs=(0.1, 1.0), sigmas=(0.0, 0.0))})
    assert uncertified.start(StartState(task="t", available_tiers=(1, 2), acceptance=(0.99, 0.5))).tier == 2
    assert uncertified.start(StartState(task="other", available_tiers=(1, 2), acceptance=(0.99, 0.5))).tier == 2


def test_cascade_routing_with_spread_values_information():
    """Known best 0.5, T2 estimate 0.45 with spread 0.2: asking can pay although the mean is lower."""
    state = StepState(task="t", answers=(PolicyAnswer(1, 0.9),), available_tiers=(1, 2), hops=0,
                      acceptance=(0.5, 0.45))
    spread = CascadeRouting({"t": TaskPolicy(lam=0.01, costs=(0.1, 1.0), sigmas=(0.0, 0.2))}).step(state)
    flat = CascadeRouting({"t": TaskPolicy(lam=0.01, costs=(0.1, 1.0), sigmas=(0.0, 0.0))}).step(state)
    assert spread.action == "ask" and flat.stop


def _document(tmp_path):
    estimator = PosteriorEstimator(3, {})
    return {
        "format_version": 2, "policy": "cascade_routing", "guarantee": "ltt", "delta": 0.1, "target": 0.97,
        "tasks": {"t": {"lambda": 0.2, "costs": [0.05, 0.1, 1.0], "sigmas": [0.0, 0.1, 0.0],
                        "certificate": {"task": "t", "certified": True}}},
        "posterior": {"inline": estimator.to_dict()},
        "fitted_under": fitted_under("abc", True, "trust_router", 3, {"t": {"tau": 0.5, "kind": "structured"}}),
    }


def test_policy_file_round_trips_and_checks_what_it_was_fitted_under(tmp_path):
    document = _document(tmp_path)
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(document))
    policy = load_policy(path)
    assert isinstance(policy, CascadeRouting) and policy.tasks["t"].lam == 0.2
    assert policy.to_dict()["tasks"]["t"]["sigmas"] == [0.0, 0.1, 0.0]
    settings = {"router_quantized": True, "no_logprobs_policy": "trust_router", "max_hops": 3,
                "tasks": {"t": {"tau": 0.5, "kind": "structured"}}}
    assert check_fitted_under(document, settings, "abc") == []
    assert check_fitted_under(document, {**settings, "max_hops": 1}, "abc") == ["max_hops"]
    assert check_fitted_under(document, settings, "other") == ["router_sha256"]
    changed = {**settings, "tasks": {"t": {"tau": 0.6, "kind": "structured"}}}
    assert check_fitted_under(document, changed, "abc") == ["tasks.t.tau"]
    assert check_fitted_under(document, {**settings, "tasks": {}}, "abc") == ["tasks.t"]


def test_old_thresholds_files_load_as_the_paper_rule_and_bad_files_name_the_field(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"alpha": 0.05, "thresholds": {"T1": {"t": {"delta": 0.3}}}}))
    policy = load_policy(path)
    assert isinstance(policy, ConformalThresholds) and policy.thresholds.delta("T1", "t") == 0.3
    path.write_text(json.dumps({"format_version": 9, "thresholds": {}}))
    with pytest.raises(PolicyError, match="format_version 9"):
        load_policy(path)
    bad = _document(tmp_path)
    bad["tasks"]["t"]["costs"] = [0.1, "x", 1.0]
    path.write_text(json.dumps(bad))
    with pytest.raises(PolicyError, match=r"tasks\.t\.costs\[1\]"):
        load_policy(path)
    bad = _document(tmp_path)
    bad["policy"] = "nope"
    path.write_text(json.dumps(bad))
    with pytest.raises(PolicyError, match="policy 'nope' unknown"):
        load_policy(path)


def test_calibrated_cascade_routing_file_loads_and_decides(tmp_path, data_dir):
    """calibrate_cascade_routing on real cascades_9llm rows writes a policy file load_policy serves."""
    from calibration.calibrate import calibrate_cascade_routing
    from coopt.multimodel import combine, load_cascades_9llm
    from litellm_routenlp.policy import decide_start

    records, portfolio = combine(load_cascades_9llm("medmcqa", limit=120, data_dir=data_dir),
                                 load_cascades_9llm("truthfulqa", limit=60, data_dir=data_dir))

    class PriorRouter:  # a router whose ex-ante estimate is each tier's training acceptance rate
        tiers, tasks, artifact_dir, max_chars, blocking = portfolio.tier_names, (), None, None, False

        def predict(self, texts, tasks):  # the Router protocol (litellm_routenlp.routers)
            acceptance = np.tile([0.4, 0.55, 0.7, 0.8], (len(texts), 1))
            return RouterEstimates(route=np.full(acceptance.shape, 0.25), acceptance=acceptance)

    path = tmp_path / "policy.json"
    document = calibrate_cascade_routing(records, portfolio, PriorRouter(), out_path=path, folds=2)
    assert document["format_version"] == 2 and document["policy"] == "cascade_routing"
    assert set(document["tasks"]) == {"medmcqa", "truthfulqa"}
    for task, entry in document["tasks"].items():
        assert entry["certificate"]["task"] == task and len(entry["costs"]) == 4 and entry["costs"][-1] == 1.0
        assert (entry["lambda"] is None) == (not entry["certificate"]["certified"])
    policy = load_policy(path)
    assert isinstance(policy, CascadeRouting) and policy.estimator is not None
    start = decide_start(policy, "medmcqa", [1, 2, 3, 4], acceptance=[0.4, 0.55, 0.7, 0.8])
    assert 1 <= start.tier <= 4
    assert check_fitted_under(document, {"max_hops": 3, "no_logprobs_policy": "trust_router",
                                         "router_quantized": True, "tasks": {t: {"tau": s.tau, "kind": s.kind}
                                                                             for t, s in portfolio.tasks.items()}},
                              None) == []


def test_cheapest_certified_keeps_the_guarantee_and_prefers_the_top_tier_when_cheaper():
    from calibration.certify import Certificate
    from calibration.fit_cascade_routing import cheapest_certified

    cert = Certificate("t", "ltt-wsr", 0.97, 0.1, 100, 2, 0.3, -0.01, True, "ok")
    cost = np.array([[2.0] * 4, [0.5] * 4, [0.8] * 4, [0.1] * 4])   # candidate 3 was not certified
    chosen = cheapest_certified(cert, [0.1, 0.2, 0.3, 0.4], cost, np.ones(4))
    assert chosen.index == 1 and chosen.value == 0.2 and chosen.certified
    top = cheapest_certified(cert, [0.1, 0.2, 0.3, 0.4], cost + 1.0, np.ones(4))
    assert top.value is None and top.certified and "top tier serves" in top.message


def test_answer_rule_last_returns_the_most_capable_answer():
    after = StepState(task="t", answers=(PolicyAnswer(1, 0.9), PolicyAnswer(3, 0.1)), available_tiers=(1, 2, 3),
                      hops=1, acceptance=(0.97, 0.6, 0.95))
    spec = {"t": TaskPolicy(lam=0.2, costs=(0.05, 0.1, 1.0), sigmas=(0.0, 0.0, 0.0))}
    assert CascadeRouting(spec, answer_rule="last").step(after).answer_tier == 3
    with pytest.raises(PolicyError, match="answer_rule"):
        CascadeRouting(spec, answer_rule="vote")


# ----------------------------------------------------------------------------- posterior_threshold


def _threshold(t, tiers=3):
    from litellm_routenlp.policy import PosteriorThreshold

    return PosteriorThreshold({"t": TaskPolicy(lam=None, costs=(0.05, 0.1, 1.0)[-tiers:], sigmas=(0.0,) * tiers,
                                               threshold=t)}, estimator=None)


def test_posterior_threshold_starts_at_the_cheapest_tier_whose_estimate_reaches_the_threshold():
    assert "posterior_threshold" in POLICIES
    start = _threshold(0.6).start(StartState(task="t", available_tiers=(1, 2, 3), acceptance=(0.5, 0.65, 0.9)))
    assert start.tier == 2 and start.threshold == 0.6
    # nothing below the top reaches it: the top tier; an uncertified or unknown task: the top tier too
    assert _threshold(0.95).start(StartState(task="t", available_tiers=(1, 2, 3), acceptance=(0.5, 0.65, 0.9))).tier == 3
    assert _threshold(None).start(StartState(task="t", available_tiers=(1, 2, 3), acceptance=(0.99,) * 3)).tier == 3
    assert _threshold(0.1).start(StartState(task="x", available_tiers=(1, 2, 3), acceptance=(0.99,) * 3)).tier == 3


def test_posterior_threshold_stops_when_confident_and_otherwise_skips_to_the_top_tier():
    policy = _threshold(0.6)
    answered = (PolicyAnswer(1, 0.2),)
    confident = policy.step(StepState(task="t", answers=answered, available_tiers=(1, 2, 3), hops=0,
                                      acceptance=(0.7, 0.8, 0.9)))
    assert confident.stop and confident.stop_reason == "confident" and confident.answer_tier == 1
    unsure = policy.step(StepState(task="t", answers=answered, available_tiers=(1, 2, 3), hops=0,
                                   acceptance=(0.55, 0.8, 0.9)))
    assert unsure.action == "ask" and unsure.next_tier == 3   # T2 is skipped
    top = policy.step(StepState(task="t", answers=answered + (PolicyAnswer(3, 0.9),), available_tiers=(1, 2, 3),
                                hops=1, acceptance=(0.55, 0.8, 0.1)))
    assert top.stop and top.stop_reason == "no_tier_above" and top.answer_tier == 3   # the top tier's answer
    capped = policy.step(StepState(task="t", answers=answered, available_tiers=(1, 2, 3), hops=3,
                                   acceptance=(0.1, 0.8, 0.9)))
    assert capped.stop and capped.stop_reason == "max_hops"


def test_posterior_threshold_file_round_trips_and_rejects_a_bad_threshold(tmp_path):
    from litellm_routenlp.policy import PosteriorThreshold

    document = _document(tmp_path)
    document["policy"] = "posterior_threshold"
    document["tasks"]["t"].update({"lambda": None, "threshold": 0.8})
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(document))
    policy = load_policy(path)
    assert isinstance(policy, PosteriorThreshold) and policy.tasks["t"].threshold == 0.8
    assert policy.tasks["t"].to_dict()["threshold"] == 0.8
    document["tasks"]["t"]["threshold"] = 1.5
    path.write_text(json.dumps(document))
    with pytest.raises(PolicyError, match=r"tasks\.t\.threshold"):
        load_policy(path)


def test_calibrated_posterior_threshold_file_loads_decides_and_orders_its_grid_safe_to_cheap(tmp_path, data_dir):
    """calibrate_cascade_routing(family="posterior_threshold") on real cascades_9llm rows."""
    from calibration.calibrate import calibrate_cascade_routing
    from calibration.fit_cascade_routing import THRESHOLD_GRID
    from coopt.multimodel import combine, load_cascades_9llm
    from litellm_routenlp.policy import PosteriorThreshold, decide_start

    assert THRESHOLD_GRID[0] == 1.0 and list(THRESHOLD_GRID) == sorted(THRESHOLD_GRID, reverse=True)
    records, portfolio = combine(load_cascades_9llm("medmcqa", limit=400, data_dir=data_dir))

    class PriorRouter:
        tiers, tasks, artifact_dir, max_chars, blocking = portfolio.tier_names, (), None, None, False

        def predict(self, texts, tasks):  # the Router protocol (litellm_routenlp.routers)
            acceptance = np.tile([0.35, 0.5, 0.72, 0.77], (len(texts), 1))
            return RouterEstimates(route=np.full(acceptance.shape, 0.25), acceptance=acceptance)

    path = tmp_path / "policy.json"
    document = calibrate_cascade_routing(records, portfolio, PriorRouter(), out_path=path, folds=2,
                                         family="posterior_threshold")
    assert document["policy"] == "posterior_threshold" and "threshold_grid" in document
    entry = document["tasks"]["medmcqa"]
    assert (entry["threshold"] is None) == (not entry["certificate"]["certified"])
    assert "threshold" in entry["certificate"]["message"]
    policy = load_policy(path)
    assert isinstance(policy, PosteriorThreshold) and policy.estimator is not None
    assert 1 <= decide_start(policy, "medmcqa", [1, 2, 3, 4], acceptance=[0.35, 0.5, 0.72, 0.77]).tier <= 4


def test_threshold_grid_replay_equals_replaying_every_threshold_on_real_rows(data_dir):
    """replay_threshold_grid groups thresholds by the row's breakpoints; its decisions must be the
    policy's own at every threshold of the grid (real cascades_9llm answers, varied ex-ante estimates,
    a fitted posterior, some thresholds exactly on a breakpoint)."""
    from calibration.fit_cascade_routing import (THRESHOLD_GRID, CalibrationRows, RowCache, family_policy,
                                                 fit_parts, replay_rows, replay_threshold_grid,
                                                 threshold_breakpoints, task_policy)
    from coopt.multimodel import combine, load_cascades_9llm
    from routenlp_core.allpairs import tier_values

    records, portfolio = combine(load_cascades_9llm("medmcqa", limit=120, data_dir=data_dir),
                                 load_cascades_9llm("truthfulqa", limit=60, data_dir=data_dir))
    names = portfolio.tier_names
    tasks = np.array([r.task for r in records])
    quality = tier_values(records, names, "quality")
    rng = np.random.default_rng(3)
    ex_ante = np.clip(np.array([0.35, 0.5, 0.72, 0.77]) + rng.normal(0, 0.08, (len(records), 4)), 0, 1)
    data = CalibrationRows(tasks=tasks, ex_ante=ex_ante, quality=quality, acceptable=quality >= 1.0,
                           uncertainty=tier_values(records, names, "uncertainty"),
                           cost=tier_values(records, names, "cost_usd"),
                           outputs=[[r.tiers[n].output for n in names] for r in records])
    estimator, sigmas, costs = fit_parts(data)
    cache = RowCache(estimator)
    on_a_breakpoint = [float(v) for v in threshold_breakpoints(
        family_policy("posterior_threshold", {}, cache, 3, "trust_router"), data, 7)]
    grid = sorted(set(THRESHOLD_GRID[::4]) | set(on_a_breakpoint), reverse=True)
    policies = [family_policy("posterior_threshold", {t: task_policy("posterior_threshold", knob, costs[t], sigmas[t])
                                                      for t in sigmas}, cache, 3, "trust_router") for knob in grid]
    kept, tried = replay_threshold_grid(policies, grid, data)
    for index, policy in enumerate(policies):
        want_kept, want_tried, _ = replay_rows(policy, data)
        assert np.array_equal(kept[index], want_kept), grid[index]
        assert np.array_equal(tried[index], want_tried), grid[index]
    assert len({tuple(k) for k in kept}) > 5  # the grid really moves decisions
