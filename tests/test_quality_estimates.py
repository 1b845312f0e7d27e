"""Post-answer quality estimates: the numpy estimator, its offline fit, and its JSON artifact."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from calibration.quality_estimators import all_sets, fit_posterior, fit_posterior_models
from routenlp_core.paths import project_root
from litellm_routenlp.quality_estimates import (AnswerSignals, PosteriorArtifactError, PosteriorEstimator, agreement,
                                                features, signals_of_row)


def _logloss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def simulate(n: int, seed: int, K: int = 3):
    """Rows whose acceptability depends on a hidden difficulty that the answers' u reveal.

    The ex-ante estimate only sees a noisy copy of the difficulty; u of an answered tier is the
    difficulty plus small noise; tier 2 gives no logprobs on 30% of rows (the no-logprobs case).
    Answers agree when both tiers are acceptable.
    """
    rng = np.random.default_rng(seed)
    tasks = rng.choice(["a", "b"], size=n)
    difficulty = rng.normal(size=n) + np.where(tasks == "b", 0.5, 0.0)
    ability = np.array([-0.5, 0.5, 1.5])[:K]
    acceptable = rng.random((n, K)) < 1 / (1 + np.exp(-(ability[None] - 2.0 * difficulty[:, None])))
    seen = difficulty + rng.normal(scale=1.5, size=n)
    ex_ante = 1 / (1 + np.exp(-(ability[None] - 0.6 * seen[:, None])))
    uncertainty = 1 / (1 + np.exp(-(difficulty[:, None] - ability[None] + rng.normal(scale=0.3, size=(n, K)))))
    uncertainty[rng.random(n) < 0.3, 1] = np.nan
    outputs = [["right" if acceptable[row, k] else f"wrong {row} {k}" for k in range(K)] for row in range(n)]
    return list(tasks), ex_ante, acceptable, uncertainty, outputs


@pytest.fixture(scope="module")
def fitted():
    tasks, ex_ante, acceptable, uncertainty, outputs = simulate(1500, seed=0)
    estimator, models = fit_posterior_models(tasks, ex_ante, acceptable, uncertainty, outputs)
    return estimator, models


def test_agreement_is_one_function_with_documented_values():
    assert agreement("Paris.", "  paris ") == 1.0
    assert agreement("B", "b") == 1.0
    assert agreement(None, "x") is None and agreement("x", None) is None
    assert agreement("the cat sat", "a dog ran") == 0.0
    half = agreement("the cat sat down", "the cat")
    assert half == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert agreement("a b", "b a") == 1.0 - 0.0 and agreement("x y", "y z") == pytest.approx(0.5)
    assert agreement("x y", "y z") == agreement("y z", "x y")


def test_posterior_beats_the_ex_ante_estimate_on_held_out_rows(fitted):
    estimator, _ = fitted
    tasks, ex_ante, acceptable, uncertainty, outputs = simulate(1500, seed=1)
    for answered in [(1,), (2,), (1, 2)]:
        post = np.stack([estimator.predict(tasks[row], ex_ante[row], signals_of_row(uncertainty[row], outputs[row], answered))
                         for row in range(len(tasks))])
        for j in range(3):
            gain = _logloss(ex_ante[:, j], acceptable[:, j]) - _logloss(post[:, j], acceptable[:, j])
            assert gain > 0.03, (answered, j, gain)


def test_noise_signals_do_not_make_the_estimate_worse():
    """When the answers carry no information, cross-validated cell selection keeps close to ex-ante."""
    tasks, ex_ante, acceptable, _, _ = simulate(2000, seed=5)
    rng = np.random.default_rng(6)
    noise_u = rng.random(acceptable.shape)
    noise_text = [[str(rng.integers(3)) for _ in range(3)] for _ in range(2000)]
    fit_rows, test_rows = np.arange(1000), np.arange(1000, 2000)
    estimator = fit_posterior([tasks[r] for r in fit_rows], ex_ante[fit_rows], acceptable[fit_rows],
                              noise_u[fit_rows], [noise_text[r] for r in fit_rows], sets=[(1,), (1, 2)])
    for answered in [(1,), (1, 2)]:
        post = np.stack([estimator.predict(tasks[r], ex_ante[r], signals_of_row(noise_u[r], noise_text[r], answered))
                         for r in test_rows])
        for j in range(3):
            loss = _logloss(post[:, j], acceptable[test_rows, j]) - _logloss(ex_ante[test_rows, j], acceptable[test_rows, j])
            assert loss < 0.01, (answered, j, loss)


def test_predictions_match_the_fitted_models_predict_proba(fitted):
    estimator, models = fitted
    tasks, ex_ante, _, uncertainty, outputs = simulate(200, seed=2)
    checked = 0
    for answered in all_sets(3):
        for row in range(0, 200, 17):
            signals = signals_of_row(uncertainty[row], outputs[row], answered)
            X = estimator.design(tasks[row], ex_ante[row], signals)
            post = estimator.predict(tasks[row], ex_ante[row], signals)
            for j in range(1, 4):
                source = estimator.source(tasks[row], answered, j)
                key = f"{tasks[row] if source == 'task' else '*'}|{','.join(map(str, answered))}|{j}"
                if source == "ex_ante" or key not in models:  # an identity cell: the ex-ante estimate
                    assert post[j - 1] == pytest.approx(np.clip(ex_ante[row, j - 1], 1e-4, 1 - 1e-4), abs=1e-12)
                    continue
                expected = models[key].predict_proba(X[j - 1:j])[0, 1]
                assert post[j - 1] == pytest.approx(expected, abs=1e-9)
                checked += 1
    assert checked >= 7 * 12 * 3 * 0.8


def test_offset_logistic_is_sklearn_liblinear_without_the_offset():
    """The cell solver, offset off, reproduces sklearn's L2 logistic with a penalised intercept."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from calibration.quality_estimators import OffsetLogistic

    rng = np.random.default_rng(7)
    X = rng.normal(size=(400, 5)) * [1, 2, 0.5, 3, 1] + [0, 1, -1, 2, 0]
    y = (rng.random(400) < 1 / (1 + np.exp(-(X[:, 0] - 0.5 * X[:, 1] + 0.3)))).astype(int)
    for C in (0.03, 0.3, 3.0):
        ours = OffsetLogistic(C=C, offset=False).fit(X, y)
        reference = make_pipeline(StandardScaler(), LogisticRegression(
            C=C, solver="liblinear", intercept_scaling=1.0, tol=1e-10, max_iter=10000)).fit(X, y)
        np.testing.assert_allclose(ours.predict_proba(X), reference.predict_proba(X), atol=1e-5)
        weights, bias = ours.folded()
        np.testing.assert_allclose(1 / (1 + np.exp(-(X @ weights + bias))), reference.predict_proba(X)[:, 1], atol=1e-5)
    # with the offset and no data to speak of, the cell stays at the ex-ante estimate
    tiny = OffsetLogistic(C=1e-6).fit(X, y)
    np.testing.assert_allclose(tiny.predict_proba(X)[:, 1], 1 / (1 + np.exp(-X[:, 0])), atol=1e-4)


def test_json_round_trip_keeps_every_prediction(fitted, tmp_path):
    estimator, _ = fitted
    path = estimator.save(tmp_path / "posterior.json")
    loaded = PosteriorEstimator.load(path)
    again = PosteriorEstimator.from_dict(json.loads(json.dumps(estimator.to_dict())))
    tasks, ex_ante, _, uncertainty, outputs = simulate(50, seed=3)
    for row in range(50):
        signals = signals_of_row(uncertainty[row], outputs[row], (1, 3))
        reference = estimator.predict(tasks[row], ex_ante[row], signals)
        np.testing.assert_array_equal(loaded.predict(tasks[row], ex_ante[row], signals), reference)
        np.testing.assert_array_equal(again.predict(tasks[row], ex_ante[row], signals), reference)
    assert loaded.info["rule"].startswith("per (answered set S") and loaded.info == estimator.info


def test_small_cells_fall_back_to_pooled_then_to_ex_ante():
    tasks, ex_ante, acceptable, uncertainty, outputs = simulate(600, seed=4)
    tasks = ["rare" if row < 20 else task for row, task in enumerate(tasks)]  # 20 rows < MIN_ROWS
    estimator = fit_posterior(tasks, ex_ante, acceptable, uncertainty, outputs, sets=[(1,)])
    assert estimator.source("a", (1,), 2) in ("task", "pooled")
    assert estimator.source("rare", (1,), 2) == "pooled" and estimator.source(None, (1,), 2) == "pooled"
    signals = [AnswerSignals(tier=1, uncertainty=0.2)]
    np.testing.assert_array_equal(estimator.predict("rare", ex_ante[0], signals),
                                  estimator.predict("never-seen", ex_ante[0], signals))
    assert estimator.source("a", (2,), 3) == "ex_ante"  # set (2,) was not fitted: the ex-ante estimate stays
    np.testing.assert_array_equal(estimator.predict("a", ex_ante[0], [AnswerSignals(2, 0.1)]), ex_ante[0])
    np.testing.assert_array_equal(estimator.predict("a", ex_ante[0], []), ex_ante[0])
    all_ones = fit_posterior(tasks, ex_ante, np.ones_like(acceptable), uncertainty, sets=[(1,)])
    assert all_ones.cells == {}  # one class only: nothing to fit, every tier keeps its ex-ante value


def test_missing_logprobs_read_as_average_not_as_certain(fitted):
    """A tier that had u in calibration but none now is filled with the calibration mean of u."""
    estimator, _ = fitted
    ex = np.array([0.4, 0.6, 0.8])
    missing = estimator.predict("a", ex, [AnswerSignals(1, None)])
    certain = estimator.predict("a", ex, [AnswerSignals(1, 0.0)])
    source = estimator.source("a", (1,), 3)
    assert source in ("task", "pooled")
    fill = estimator.cells[("a" if source == "task" else "*", (1,), 3)][2]
    assert 0.0 < fill[1] < 1.0  # the mean u of tier 1 on the calibration rows where it was present
    assert missing[2] < certain[2]  # u = 0 would mean "certain": a missing u must not read as that


def test_bad_input_and_bad_files_are_refused(fitted, tmp_path):
    estimator, _ = fitted
    with pytest.raises(ValueError, match="answered twice"):
        estimator.predict("a", np.full(3, 0.5), [AnswerSignals(1, 0.1), AnswerSignals(1, 0.2)])
    with pytest.raises(ValueError, match="outside 1..3"):
        estimator.predict("a", np.full(3, 0.5), [AnswerSignals(4, 0.1)])
    with pytest.raises(ValueError, match="ex_ante has 2 tiers"):
        estimator.predict("a", np.full(2, 0.5), [AnswerSignals(1, 0.1)])
    raw = estimator.to_dict()
    key = next(iter(raw["cells"]))
    raw["cells"][key]["weights"] = raw["cells"][key]["weights"][:-1]
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(PosteriorArtifactError, match=r"bad.json: cell .*needs \d+ finite weights"):
        PosteriorEstimator.load(tmp_path / "bad.json")
    (tmp_path / "trunc.json").write_text(json.dumps(estimator.to_dict())[:100])
    with pytest.raises(PosteriorArtifactError, match="trunc.json: not valid JSON"):
        PosteriorEstimator.load(tmp_path / "trunc.json")
    with pytest.raises(PosteriorArtifactError, match="format_version"):
        PosteriorEstimator.from_dict({**estimator.to_dict(), "format_version": 99})


def test_serving_module_imports_numpy_only():
    code = ("import sys, litellm_routenlp.quality_estimates; "
            "print([m for m in ('torch', 'transformers', 'sklearn', 'scipy') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=project_root(),
                            check=True)
    assert result.stdout.strip() == "[]"


def test_top_token_margin_is_mean_gap_between_the_two_best_tokens():
    import math

    from litellm_routenlp.uncertainty import response_margin, token_margin

    assert token_margin([[math.log(0.7), math.log(0.2)], [math.log(0.9)]]) == pytest.approx((0.5 + 0.9) / 2)
    assert token_margin([[math.log(0.2), math.log(0.7)]]) == pytest.approx(0.5)  # any order
    assert token_margin([]) is None
    with pytest.raises(ValueError, match="NaN"):
        token_margin([[float("nan")]])
    response = {"choices": [{"logprobs": {"content": [
        {"logprob": math.log(0.6), "top_logprobs": [{"logprob": math.log(0.6)}, {"logprob": math.log(0.3)}]}]}}]}
    assert response_margin(response) == pytest.approx(0.3)
    assert response_margin({"choices": [{"logprobs": None}]}) is None
