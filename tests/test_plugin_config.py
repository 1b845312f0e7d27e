"""Start-up validation of the plugin and what the decision log stores, without a running proxy
(plus one real proxy start that must fail on a bad setting)."""

from __future__ import annotations

import asyncio

from pathlib import Path

import litellm
import pytest

from litellm_routenlp.cascade import Attempt, CascadeResult, TierAnswer
from litellm_routenlp.config import SettingsError
from litellm_routenlp.decision_log import read_decisions
from litellm_routenlp.plugin import RouteNLPCallback
from litellm_routenlp.proxy_process import ProxyProcess
from litellm_routenlp.request_state import RequestState
from litellm_routenlp.routing import RoutingDecision

from conftest import write_proxy_config

ROOT = Path(__file__).resolve().parent.parent


def write_config(tmp_path: Path, mutate=None) -> Path:
    return write_proxy_config(tmp_path, mutate)


def test_valid_config_loads_router_thresholds_and_tiers(tmp_path):
    callback = RouteNLPCallback.from_config(write_config(tmp_path))
    assert callback.tiers.count == 4
    assert callback.tier_names == {1: "T1", 2: "T2", 3: "T3", 4: "T4"}
    assert callback.thresholds.delta("T1", "banking77") is not None
    assert callback.tiers.eligible(1, "banking77") and not callback.tiers.eligible(1, "bitext")
    decision = callback.decide([{"role": "user", "content": "I am still waiting on my card?"}],
                               {"task": "banking77"})
    assert decision.task_status == "known" and len(decision.probabilities) == 4
    assert sum(decision.probabilities) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("mutate, named", [
    (lambda d: d["model_list"][1]["model_info"].pop("routenlp_tier"), "model_info.routenlp_tier"),
    (lambda d: d["model_list"][3]["model_info"].update(routenlp_tier=6), "numbered 1..K"),
    (lambda d: d["model_list"].pop(), "router predicts 4 tiers"),
    (lambda d: d["routenlp_settings"].update(router_artifact="/nonexistent/router"),
     "routenlp_settings.router_artifact"),
    (lambda d: d["routenlp_settings"].update(thresholds_path="/nonexistent/t.json"),
     "routenlp_settings.thresholds_path"),
    (lambda d: d["routenlp_settings"].update(model_alias="nobody"), "no deployment named `nobody`"),
    (lambda d: d["routenlp_settings"].update(router={"kind": "telepathy"}),
     "routenlp_settings.router.kind: unknown router kind 'telepathy' (registered: "),
    (lambda d: d["routenlp_settings"].update(router={"options": {"k": 3}}), "routenlp_settings.router.options"),
    (lambda d: d["routenlp_settings"].update(router={"module": "no_such_router_module"}),
     "routenlp_settings.router.module: cannot import 'no_such_router_module'"),
    (lambda d: d["routenlp_settings"].update(router={"knd": "encoder_head"}), "routenlp_settings.router.knd"),
])
def test_bad_config_is_refused_with_the_setting_named(tmp_path, mutate, named):
    with pytest.raises(SettingsError) as info:
        RouteNLPCallback.from_config(write_config(tmp_path, mutate))
    assert named in str(info.value)


def test_fail_open_routes_everything_to_the_top_tier(tmp_path):
    def broken(document):
        document["routenlp_settings"].update(router_artifact=str(tmp_path / "missing"), fail_open=True)

    callback = RouteNLPCallback.from_config(write_config(tmp_path, broken))
    assert callback.router is None
    decision = callback.decide([{"role": "user", "content": "hi"}], {"task": "bitext"})
    assert decision.probabilities == [0.0, 0.0, 0.0, 1.0]


def _finish_one(callback, prompt):
    data = {"litellm_call_id": "call-1", "messages": [{"role": "user", "content": prompt}],
            "metadata": {}}
    state = RequestState(decision=RoutingDecision(task="bitext", task_status="known", probabilities=[0, 0.5, 0.5, 0],
                                                  tier=2, healthy_tiers=[2, 3, 4], router_ms=1.0), started=0.0)
    first = TierAnswer(tier=2, response=None, uncertainty=0.2, cost_usd=0.01, latency_ms=5.0)
    result = CascadeResult(final=first)
    result.attempts.append(Attempt(tier=2, tier_name="T2", model_id="t2", uncertainty=0.2, threshold=0.3,
                                   cost_usd=0.01, latency_ms=5.0))
    asyncio.run(callback._finish(data, state, result, streamed=False))
    return state


def test_prompt_is_logged_only_when_litellm_message_logging_is_on(tmp_path, monkeypatch):
    callback = RouteNLPCallback.from_config(write_config(tmp_path))
    monkeypatch.setattr(litellm, "turn_off_message_logging", False)
    _finish_one(callback, "my secret account number is 123")
    monkeypatch.setattr(litellm, "turn_off_message_logging", True)
    state = _finish_one(callback, "my secret account number is quokka")
    records = list(read_decisions(tmp_path / "decisions.jsonl"))
    assert records[0]["prompt"] == "my secret account number is 123"
    assert "prompt" not in records[1]
    assert "quokka" not in (tmp_path / "decisions.jsonl").read_text()
    assert state.result["total_cost_usd"] == pytest.approx(0.01)
    assert records[1]["final_tier"] == "T2" and records[1]["attempts"][0]["threshold"] == 0.3


def test_real_proxy_refuses_to_start_on_a_bad_setting(tmp_path):
    config = write_config(tmp_path, lambda d: d["routenlp_settings"].update(max_hops=-2))
    proxy = ProxyProcess(config, log_path=tmp_path / "proxy.log", cwd=ROOT,
                         env={"ROUTENLP_STANDINS_WARMUP": "0"})
    with pytest.raises(RuntimeError, match="exited"):
        proxy.start(timeout=120)
    log = (tmp_path / "proxy.log").read_text()
    assert "RouteNLP: refusing to start" in log
    assert "routenlp_settings.max_hops" in log


def test_a_registered_router_kind_is_served_in_place_of_the_trained_router(tmp_path):
    """``router: {kind: ...}`` picks any registered Router; the callback asks it, not RouterModel."""
    import numpy as np

    from litellm_routenlp.routers import ROUTERS, RouterEstimates, register_router

    class FixedStart:
        """Every query starts at one tier (a one-hot route), e.g. a bench baseline's decision served."""

        tasks = ("banking77",)
        artifact_dir = None
        max_chars = 16
        blocking = False

        def __init__(self, tier: int) -> None:
            self.tiers = ["T1", "T2", "T3", "T4"]
            self.tier = tier
            self.seen: list[str] = []

        def predict(self, texts, tasks):
            self.seen += list(texts)
            route = np.zeros((len(texts), 4))
            route[:, self.tier - 1] = 1.0
            return RouterEstimates(route=route, acceptance=None)

    @register_router("fixed_start_test")
    def fixed(settings, options):
        if set(options) != {"tier"}:
            raise ValueError("needs exactly `tier`")
        return FixedStart(int(options["tier"]))

    def served(document):
        document["routenlp_settings"].update(router={"kind": "fixed_start_test", "options": {"tier": 3}})
        document["routenlp_settings"].pop("thresholds_path")  # that policy was fitted under the trained router

    try:
        callback = RouteNLPCallback.from_config(write_config(tmp_path, served))
        assert isinstance(callback.router, FixedStart)
        decision = callback.decide([{"role": "user", "content": "x" * 100}], {"task": "banking77"})
        assert decision.probabilities == [0.0, 0.0, 1.0, 0.0] and decision.acceptance is None
        assert callback.router.seen == ["x" * 16]  # the router's own character cut
        with pytest.raises(SettingsError, match="routenlp_settings.router.options: needs exactly `tier`"):
            RouteNLPCallback.from_config(write_config(tmp_path, lambda d: d["routenlp_settings"].update(
                router={"kind": "fixed_start_test"})))
    finally:
        ROUTERS.pop("fixed_start_test", None)
