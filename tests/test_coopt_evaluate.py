"""Co-optimisation: failures scored against the teacher through LiteLLM, and the cascade replay behind Table 4."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from routenlp_core.allpairs import AllPairsRecord, TierResult, portfolio_from_dict
from coopt.evaluate import replay_cascade, start_tiers, summarise
from coopt.logs import RequestRecord, TierCall
from litellm_routenlp.routers import RouterEstimates
from litellm_routenlp.thresholds import Thresholds

PORTFOLIO = portfolio_from_dict({
    "tiers": [{"name": "T1", "model": "a"}, {"name": "T2", "model": "b"}, {"name": "T3", "model": "c"}],
    "tasks": {"intent": {"metric": "accuracy", "tau": 0.92}, "support": {"metric": "bertscore_f1", "tau": 0.65,
                                                                           "kind": "generation"}}})
NOT_SERVED = TierResult(output=None, quality=0.0, cost_usd=0.0,
                        error="not served: model_info.routenlp_tasks excludes it")


def _record(rid: str, task: str, t1, t2, t3) -> AllPairsRecord:
    def result(spec, cost):
        if spec is None:
            return NOT_SERVED
        quality, u = spec
        return TierResult(output="x", quality=quality, cost_usd=cost, uncertainty=u)

    return AllPairsRecord(id=rid, task=task, prompt=rid, tiers={"T1": result(t1, 0.001), "T2": result(t2, 0.01),
                                                                "T3": result(t3, 0.1)})


RECORDS = [
    _record("kept-at-t1", "intent", (1.0, 0.2), (1.0, 0.1), (1.0, 0.0)),
    _record("t1-to-t2", "intent", (0.0, 0.8), (1.0, 0.1), (1.0, 0.0)),
    _record("t1-to-t3", "intent", (0.0, 0.9), (0.0, 0.6), (1.0, 0.0)),
    _record("kept-wrong", "intent", (0.0, 0.3), (1.0, 0.1), (1.0, 0.0)),   # a violation the cascade misses
    _record("support-t2", "support", None, (0.7, 0.2), (0.9, 0.0)),
    _record("support-t3", "support", None, (0.5, 0.9), (0.9, 0.0)),
]
THRESHOLDS = Thresholds(deltas={"T1": {"intent": 0.5}, "T2": {"intent": 0.3, "support": 0.5}})


def test_cascade_replay_follows_the_proxys_rules_and_prices_every_tier_tried() -> None:
    outcomes = replay_cascade(RECORDS, PORTFOLIO, [1, 1, 1, 1, 2, 2], THRESHOLDS)

    by_id = {o.id: o for o in outcomes}
    assert by_id["kept-at-t1"].path == ("T1",) and by_id["kept-at-t1"].cost_usd == pytest.approx(0.001)
    assert by_id["t1-to-t2"].path == ("T1", "T2") and by_id["t1-to-t2"].cost_usd == pytest.approx(0.011)
    assert by_id["t1-to-t3"].path == ("T1", "T2", "T3") and by_id["t1-to-t3"].cost_usd == pytest.approx(0.111)
    assert by_id["kept-wrong"].final_tier == "T1" and not by_id["kept-wrong"].acceptable
    assert by_id["support-t3"].path == ("T2", "T3")

    figures = summarise(outcomes, RECORDS, PORTFOLIO)
    assert figures["cost_ratio"] == pytest.approx((0.001 + 0.011 + 0.111 + 0.001 + 0.01 + 0.11) / 0.6, abs=1e-5)
    assert figures["cheap_share"] == pytest.approx(4 / 6, abs=1e-4)
    assert figures["top_share"] == pytest.approx(2 / 6, abs=1e-4)
    assert figures["acceptance"] == pytest.approx(5 / 6, abs=1e-4)
    assert figures["escalation_rate"] == pytest.approx(3 / 6, abs=1e-4)
    assert figures["per_task"]["support"]["n"] == 2


def test_start_tiers_choose_among_the_tiers_serving_the_task() -> None:
    class Router:  # P(cheapest acceptable tier = k): T1 for every query
        tiers, tasks, artifact_dir, max_chars, blocking = ("T1", "T2", "T3"), ("intent", "support"), None, None, False

        def predict(self, texts, tasks):
            return RouterEstimates(route=np.tile([0.9, 0.05, 0.05], (len(texts), 1)), acceptance=None)

    assert start_tiers(RECORDS, PORTFOLIO, Router()) == [1, 1, 1, 1, 2, 2]   # T1 does not serve `support`


@pytest.fixture
def standins_config(repo_root: Path, tmp_path: Path) -> Path:
    """proxy_config.yaml with its stand-ins naming the repository's artifacts, as coopt writes it."""
    from coopt.versions import write_serving_config
    from routenlp_standins.artifacts import StandinDirs

    root = repo_root / "artifacts"
    for needed in (root / "encoder" / "model.onnx", root / "tiers" / "classifier" / "banking77.json"):
        if not needed.is_file():
            pytest.fail(f"{needed} missing: run `make artifacts`")
    return write_serving_config(repo_root / "proxy_config.yaml", tmp_path / "proxy_config.yaml", StandinDirs(root))


def test_failures_are_scored_against_the_top_tiers_answer_through_litellm(standins_config: Path) -> None:
    from coopt.failures import score_failures, top_tier
    from routenlp_core.tasks import get_task

    rows = get_task("banking77").load("test", limit=6, seed=4)
    records = [RequestRecord(request_id=f"r{i}", task="banking77", prompt=row.text, source="decision_log",
                             calls=(TierCall(tier="T1", uncertainty=0.7, escalated=True), TierCall(tier="T4")))
               for i, row in enumerate(rows)]
    records.append(RequestRecord(request_id="plain", task="banking77", prompt="hi", source="decision_log",
                                 calls=(TierCall(tier="T1", uncertainty=0.1),)))
    config = standins_config

    failures = score_failures(records, config, progress=False)

    assert top_tier(config, "banking77") == "T4"
    assert [f.request_id for f in failures] == [f"r{i}" for i in range(6)]   # only escalated requests
    for failure, row in zip(failures, rows):
        assert failure.failed_tier == "T1" and failure.teacher_tier == "T4" and failure.uncertainty == 0.7
        assert failure.teacher_output == row.reference       # T4 replays the recorded answer
        assert failure.gap == (0.0 if failure.failed_output == row.reference else 1.0)
