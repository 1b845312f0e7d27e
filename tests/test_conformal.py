"""Conformal thresholds: the formulas, held-out violation on real cascades, routed calibration, refusals."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from calibration.calibrate import (calibrate, deltas_of, evaluate_thresholds, router_start_tiers,
                                   select_calibration_queries)
from calibration.conformal import (InsufficientCalibrationError, fit_delta, fit_delta_risk, violation_rate,
                                   wilson_interval)
from routenlp_core.allpairs import TierResult, tier_values
from litellm_routenlp.routers import RouterEstimates
from routenlp_core.paths import project_root

ENCODER_DIR = project_root() / "artifacts" / "encoder"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------------------------------------
# formulas on hand-made numbers


def test_fit_delta_takes_the_conformal_rank_among_correct_answers():
    u = [i / 100 for i in range(1, 41)]  # 0.01 .. 0.40
    correct = [i % 4 != 0 for i in range(1, 41)]  # 30 correct
    # n0 = 30: rank ceil(0.95 * 31) = 30 -> the largest correct uncertainty (0.39)
    assert fit_delta(u, correct, alpha=0.05) == pytest.approx(0.39)
    # all 40 correct: rank ceil(0.95 * 41) = 39 -> the 39th smallest
    assert fit_delta(u, [True] * 40, alpha=0.05) == pytest.approx(0.39)
    assert fit_delta(u, [True] * 40, alpha=0.2) == pytest.approx(0.33)  # ceil(0.8 * 41) = 33
    # queries without uncertainty do not count
    assert fit_delta(u + [None] * 5, [True] * 45, alpha=0.2) == pytest.approx(0.33)


def test_fit_delta_refuses_when_the_quantile_is_infinite():
    u = [i / 100 for i in range(1, 20)]
    assert fit_delta(u, [True] * 19, alpha=0.05) == pytest.approx(0.19)  # ceil(0.95 * 20) = 19 exactly
    with pytest.raises(InsufficientCalibrationError, match="18 correctly handled"):
        fit_delta(u[:18], [True] * 18, alpha=0.05)
    with pytest.raises(InsufficientCalibrationError):
        fit_delta(u, [False] * 19)


def test_fit_delta_risk_keeps_at_most_the_budget_of_bad_answers():
    # 39 queries -> budget alpha (n + 1) - 1 = 1 bad answer may be kept
    u = np.arange(1, 40) / 100
    quality = np.ones(39)
    quality[[4, 9, 20]] = 0.0  # bad answers at u = 0.05, 0.10, 0.21
    delta = fit_delta_risk(u, quality, tau=1.0, alpha=0.05)
    assert delta == pytest.approx(0.09)  # keeps the first bad one, stops before the second
    assert violation_rate(u, quality, 1.0, delta) == pytest.approx(1 / 39)
    with pytest.raises(InsufficientCalibrationError):
        fit_delta_risk(u[:18], quality[:18], tau=1.0, alpha=0.05)  # n < 1/alpha - 1


def test_violation_rate_and_wilson_interval():
    u = [0.1, 0.5, None, 0.2]
    quality = [0.0, 0.0, 0.0, 1.0]
    assert violation_rate(u, quality, 1.0, 0.3) == pytest.approx(0.5)  # u=0.1 kept; None kept (cannot escalate)
    assert violation_rate(u, quality, 1.0, None) == pytest.approx(0.75)  # the top tier keeps everything
    low, high = wilson_interval(5, 100)
    assert (low, high) == pytest.approx((0.02154, 0.11175), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0, 50)[0] == 0.0


# ------------------------------------------------------------------------------------------------
# real data: held-out violation, the proxy's reader, refusals


def _halves(dataset: str, seed: int = 1):
    from coopt.multimodel import load_cascades_9llm

    records, portfolio = load_cascades_9llm(dataset)
    order = np.random.default_rng(seed).permutation(len(records))
    half = len(records) // 2
    return ([records[i] for i in sorted(order[:half])], [records[i] for i in sorted(order[half:])], portfolio)


@pytest.mark.needs(data=["cascades_9llm"])
@pytest.mark.parametrize("dataset", ["medmcqa", "truthfulqa"])
def test_held_out_violation_rate_is_near_alpha_for_every_tier(dataset):
    calibration_set, held_out, portfolio = _halves(dataset)
    alpha = 0.05
    document = calibrate(calibration_set, portfolio, alpha=alpha, n_calib=500)
    measured = evaluate_thresholds(held_out, portfolio, deltas_of(document))
    for tier in portfolio.tier_names[:-1]:
        cell = measured[tier][dataset]
        low, high = wilson_interval(alpha * cell["n"], cell["n"])
        assert low - 0.02 <= cell["violation"] <= high + 0.01, (tier, cell, (low, high))
        assert document["thresholds"][tier][dataset]["violation"] <= alpha


@pytest.mark.needs(data=["cascades_9llm"])
def test_design_coverage_rule_keeps_correct_answers_but_does_not_bound_violations():
    calibration_set, held_out, portfolio = _halves("medmcqa")
    document = calibrate(calibration_set, portfolio, rule="coverage")
    u = tier_values(held_out, portfolio.tier_names, "uncertainty")
    q = tier_values(held_out, portfolio.tier_names, "quality")
    for k, tier in enumerate(portfolio.tier_names[:-1]):
        delta = document["thresholds"][tier]["medmcqa"]["delta"]
        correct = q[:, k] >= 1.0
        kept = int(np.sum(u[correct, k] <= delta))
        assert wilson_interval(kept, int(correct.sum()))[1] >= 0.95 - 0.01  # its guarantee holds
    # ...while llama3.2-1b keeps most of its wrong answers (why `rule="risk"` is the default)
    assert evaluate_thresholds(held_out, portfolio, deltas_of(document))["T1"]["medmcqa"]["violation"] > 0.3


@pytest.mark.needs(data=["cascades_9llm"])
def test_thresholds_file_has_the_contract_shape_and_the_proxy_reads_it(tmp_path):
    from litellm_routenlp.thresholds import Thresholds

    calibration_set, _, portfolio = _halves("truthfulqa")
    path = tmp_path / "thresholds.json"
    returned = calibrate(calibration_set, portfolio, out_path=path)
    document = json.loads(path.read_text())
    assert document == returned
    assert {"format_version", "alpha", "data_sha256", "router_artifact", "created", "thresholds"} <= set(document)
    assert document["format_version"] == 2 and document["policy"] == "conformal_thresholds" and document["alpha"] == 0.05 and document["router_artifact"] is None
    for tier, per_task in document["thresholds"].items():
        cell = per_task["truthfulqa"]
        assert set(cell) == {"delta", "n", "n_correct", "violation", "wilson_95", "escalation_rate"}
        assert cell["n"] == 258 and len(cell["wilson_95"]) == 2
        assert (cell["delta"] is None) == (tier == "T4")
        # the drift alert's baseline: the share of this cell's answers the rule escalates (u > delta)
        u = tier_values(calibration_set, portfolio.tier_names, "uncertainty")[:, portfolio.tier_names.index(tier)]
        expected = 0.0 if cell["delta"] is None else float(np.mean(u > cell["delta"]))
        assert cell["escalation_rate"] == pytest.approx(expected, abs=1e-6)
    from routenlp_core.allpairs import data_sha256, write_allpairs, write_portfolio

    allpairs_path = write_allpairs(calibration_set, tmp_path / "calib.jsonl")
    from_files = calibrate(allpairs_path, write_portfolio(portfolio, tmp_path / "p.yaml"))
    assert from_files["data_sha256"] == data_sha256(allpairs_path)
    assert from_files["thresholds"] == document["thresholds"]
    loaded = Thresholds.load(path)
    assert loaded.delta("T1", "truthfulqa") == document["thresholds"]["T1"]["truthfulqa"]["delta"]
    assert loaded.delta("T4", "truthfulqa") is None


@pytest.mark.needs(data=["cascades_9llm"])
def test_degenerate_calibration_data_is_refused_naming_tier_and_task():
    from coopt.multimodel import load_cascades_9llm

    records, portfolio = load_cascades_9llm("medmcqa", limit=200)
    no_logprobs = [replace(r, tiers={**r.tiers, "T2": replace(r.tiers["T2"], uncertainty=None)}) for r in records]
    with pytest.raises(ValueError, match="tier T2, task medmcqa: every uncertainty is null"):
        calibrate(no_logprobs, portfolio)
    never_right = [replace(r, tiers={**r.tiers, "T1": TierResult(output=None, quality=0.0, cost_usd=0.0,
                                                                    uncertainty=0.2, error="timeout")})
                   for r in records]
    with pytest.raises(ValueError, match="tier T1, task medmcqa: no correctly handled query"):
        calibrate(never_right, portfolio)
    with pytest.warns(UserWarning, match="tier T1, task medmcqa: only 50 queries"):
        calibrate(records, portfolio, n_calib=50)
    with pytest.warns(UserWarning, match="escalating everything"):
        document = calibrate(records, portfolio, n_calib=15)
    assert document["thresholds"]["T1"]["medmcqa"]["delta"] == 0.0


# ------------------------------------------------------------------------------------------------
# routed calibration: thresholds fitted on the queries that reach each tier


class _EmbeddedRouter:
    """The trained router's fp32 head fed the cached fp32 embeddings: the same decisions the head
    makes in serving with ``router_quantized: false``, without re-encoding 600 long prompts here."""

    def __init__(self, model, embeddings_by_text):
        self.model, self.rows = model, embeddings_by_text
        self.tiers, self.tasks, self.artifact_dir = model.tiers, model.tasks, model.artifact_dir
        self.max_chars, self.blocking = None, False

    def predict(self, texts, tasks):  # the Router protocol (litellm_routenlp.routers)
        embeddings = np.stack([self.rows[text] for text in texts])
        route, acceptance = self.model.predict_both_from_embeddings(embeddings, self.model._task_ids(tasks))
        return RouterEstimates(route=route, acceptance=acceptance)


@pytest.fixture(scope="module")
def routed_setup(request, tmp_path_factory):
    from conftest import require_artifacts, require_data

    require_data("cascades_9llm")  # missing: fail saying how to get it
    require_artifacts("encoder/model.onnx")
    from coopt.multimodel import load_cascades_9llm
    from coopt.train_router import frozen_embeddings, train_router
    from litellm_routenlp.router_model import RouterModel

    records, portfolio = load_cascades_9llm("medmcqa")
    sha = json.loads((ENCODER_DIR / "encoder.json").read_text())["sha256"]["model.onnx"][:16]
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("routenlp-embeddings") if cache is not None else tmp_path_factory.mktemp("emb")
    cache_path = Path(folder) / f"embeddings-{sha}.safetensors"
    artifact = tmp_path_factory.mktemp("router")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_router(records[:300], portfolio, artifact, encoder_dir=ENCODER_DIR, cache_path=cache_path, seed=0)
    records = records[:700]
    embeddings, _ = frozen_embeddings([r.prompt for r in records], ENCODER_DIR, cache_path)
    model = RouterModel.load(artifact, quantized=False, with_encoder=False)
    router = _EmbeddedRouter(model, {r.prompt: e for r, e in zip(records, embeddings)})
    return records[300:500], records[500:700], portfolio, artifact, router


def test_routed_calibration_fits_each_tier_on_the_queries_that_reach_it(routed_setup):
    calibration_set, held_out, portfolio, artifact, router = routed_setup
    # On MedMCQA the router's P(acceptable by T2) hovers near 0.6 for every query; a confidence at
    # its median splits the traffic between T2 and T3, so T3 is reached both ways.
    chosen = select_calibration_queries(calibration_set, 500)
    probabilities = router.predict([r.prompt for r in chosen], [r.task for r in chosen]).route
    confidence = float(np.median(probabilities[:, :2].sum(axis=1)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # thin tiers warn; that is expected here
        document = calibrate(calibration_set, portfolio, router_artifact=router, route_confidence=confidence)
        unrouted = calibrate(calibration_set, portfolio)
    assert document["router_artifact"] == str(artifact)
    start = router_start_tiers(chosen, router, confidence)
    assert (start == 2).sum() >= 50 and (start == 3).sum() >= 50
    u = tier_values(chosen, portfolio.tier_names, "uncertainty")
    cells = {tier: document["thresholds"][tier]["medmcqa"] for tier in portfolio.tier_names}
    # replay the cascade independently: reach(k) = routed to k, or escalated from k - 1
    reach = start == 1
    for k, tier in enumerate(portfolio.tier_names):
        assert cells[tier]["n"] == int(reach.sum()), tier
        if k == len(portfolio.tier_names) - 1:
            break
        escalated = reach & (u[:, k] > cells[tier]["delta"])
        reach = escalated | (start == k + 2)
        if k == 1:  # (start tiers are 1-based)
            assert escalated.any() and reach.sum() > (start == 3).sum()  # T3: routed there + escalated there
    assert [c["n"] for c in cells.values()] != [unrouted["thresholds"][t]["medmcqa"]["n"] for t in cells]
    # held out, replayed through the same router: well-populated tiers stay near alpha
    measured = evaluate_thresholds(held_out, portfolio, deltas_of(document),
                                   router_start_tiers(held_out, router, confidence))
    checked = 0
    for tier in portfolio.tier_names[:-1]:
        cell, fitted = measured[tier]["medmcqa"], cells[tier]
        if min(cell["n"], fitted["n"]) >= 80:
            checked += 1
            high = wilson_interval(0.05 * cell["n"], cell["n"])[1]
            assert cell["violation"] <= high + 0.01, (tier, cell)
    assert checked >= 1


def test_calibrate_loads_the_router_artifact_it_is_given(routed_setup):
    from litellm_routenlp.router_model import RouterModel

    calibration_set, _, portfolio, artifact, _ = routed_setup
    subset = calibration_set[:40]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        document = calibrate(subset, portfolio, router_artifact=artifact, encoder_dir=ENCODER_DIR)
    start = router_start_tiers(subset, RouterModel.load(artifact, encoder_dir=ENCODER_DIR, quantized=True))
    assert document["router_artifact"] == str(artifact) and document["route_confidence"] == 0.5
    assert document["thresholds"]["T1"]["medmcqa"]["n"] == int((start == 1).sum())
