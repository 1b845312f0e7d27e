"""Start-up validation of the plugin and what the decision log stores, without a running proxy
(plus one real proxy start that must fail on a bad setting)."""

from __future__ import annotations

import asyncio

from pathlib import Path

import litellm
import pytest
import yaml

from litellm_routenlp.cascade import Attempt, CascadeResult, TierAnswer
from litellm_routenlp.config import SettingsError
from litellm_routenlp.decision_log import read_decisions
from litellm_routenlp.plugin import RouteNLPCallback
from litellm_routenlp.proxy_process import ProxyProcess

ROOT = Path(__file__).resolve().parent.parent


def write_config(tmp_path: Path, mutate=None) -> Path:
    document = yaml.safe_load((ROOT / "proxy_config.yaml").read_text())
    settings = document["routenlp_settings"]
    settings["router_artifact"] = str(ROOT / "artifacts/router")
    settings["thresholds_path"] = str(ROOT / "artifacts/thresholds.json")
    settings["decision_log_path"] = str(tmp_path / "decisions.jsonl")
    if mutate:
        mutate(document)
    path = tmp_path / "proxy_config.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


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
    state = {"decision": {"task": "bitext", "task_status": "known", "probabilities": [0, 0.5, 0.5, 0],
                          "tier": 2, "healthy_tiers": [2, 3, 4], "router_ms": 1.0}, "started": 0.0}
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
    assert state["result"]["total_cost_usd"] == pytest.approx(0.01)
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
