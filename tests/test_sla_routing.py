"""Issue 12 section 2: SLA-aware routing (litellm_routenlp/latency_budget.py).

* the rolling per-tier figures and the start / escalation choices under a budget, on their own;
* the settings (``latency_budget_ms``, ``latency_budget_quantile``) refused at start-up naming the field;
* the hooks with the real ``litellm.Router`` (LiteLLM's ``mock_response`` deployments) whose tier
  latencies are the plugin's own windows: an escalation over budget goes to a tier that meets it, or
  stops, and the record and ``x-routenlp-sla`` say so;
* the real proxy (marker ``proxy``): one dedicated ``litellm --config`` proxy whose four tiers are
  ``openai/...`` deployments on a tiny HTTP upstream this test controls (:class:`FakeUpstream`).  The
  top tier starts answering 2 s late: requests of the task with a budget move to a tier that meets it,
  requests of the task without one are served as before.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from litellm_routenlp.config import SettingsError, settings_from_mapping
from litellm_routenlp.decision_log import read_decisions
from litellm_routenlp.latency_budget import (LatencyBudget, TierLatencies, choose_escalation, choose_start,
                                             header_text, summarise)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


# ----------------------------------------------------------------------------------------- figures
def test_rolling_quantiles_follow_the_last_calls_and_expire():
    clock = [0.0]
    windows = TierLatencies(window=20, max_age_s=60.0, clock=lambda: clock[0])
    assert windows.quantile(1) is None  # no call yet: no figure
    for ms in range(1, 21):              # 1..20 ms
        windows.observe(1, float(ms))
    assert windows.quantile(1, "p50") == 10.0 and windows.quantile(1, "p99") == 20.0  # nearest rank
    for _ in range(20):                  # the window holds the last 20 calls only
        windows.observe(1, 2000.0)
    assert windows.quantile(1, "p50") == 2000.0 and windows.count(1) == 20
    clock[0] = 61.0                      # nothing for longer than max_age_s: the figure expires
    assert windows.quantile(1) is None
    windows.observe(1, 5.0)              # the probe's call: the stale calls are dropped
    assert windows.quantile(1, "p99") == 5.0 and windows.count(1) == 1


def _windows(**figures: float) -> TierLatencies:
    windows = TierLatencies(window=5)
    for name, ms in figures.items():
        windows.observe(int(name[1:]), ms)
    return windows


def test_start_choice_under_a_budget():
    budget = LatencyBudget(800.0, "p99")
    # wanted fits: unchanged, not forced
    tier, note = choose_start(budget, _windows(t1=50, t3=300, t4=700), 4, [1, 3, 4])
    assert tier == 4 and not note.forced and note.met
    # wanted over budget: the nearest cheaper tier that meets it
    tier, note = choose_start(budget, _windows(t1=50, t3=300, t4=2100), 4, [1, 3, 4])
    assert (tier, note.forced, note.chosen_instead_of, note.expected_ms) == (3, True, 4, 300)
    # no cheaper tier meets it: the cheapest more capable one that does
    tier, note = choose_start(budget, _windows(t1=900, t2=950, t3=300, t4=2100), 2, [1, 2, 3, 4])
    assert tier == 3 and note.forced and note.met
    # a tier with no figure yet is not held against the budget (it is probed)
    tier, _ = choose_start(budget, _windows(t4=2100), 4, [1, 3, 4])
    assert tier == 3
    # nothing meets it: the fastest, and the note says the budget is not met
    tier, note = choose_start(budget, _windows(t1=1200, t3=900, t4=2100), 4, [1, 3, 4])
    assert (tier, note.forced, note.met) == (3, True, False)
    assert "no tier meets it" in header_text([note], {3: "T3", 4: "T4"})


def test_escalation_choice_counts_the_time_already_spent():
    budget = LatencyBudget(1000.0, "p50")
    windows = _windows(t2=100, t3=300, t4=600)
    assert choose_escalation(budget, windows, 1, 3, [1, 2, 3, 4], elapsed_ms=200)[0] == 3      # 500 <= 1000
    tier, note = choose_escalation(budget, windows, 1, 4, [1, 2, 3, 4], elapsed_ms=500)     # 1100 > 1000
    assert (tier, note.chosen_instead_of) == (3, 4)  # the nearest tier the policy skipped that fits
    tier, note = choose_escalation(budget, windows, 1, 3, [1, 3, 4], elapsed_ms=950)
    assert tier is None and note.forced and note.met  # nothing fits: stop, the answer so far is in time
    assert summarise([note])["forced"] and summarise([note])["chosen_instead_of"] == 3


# ----------------------------------------------------------------------------------------- settings
def _settings(**task_fields):
    raw = {"router_artifact": "r", "tasks": {"banking77": {"kind": "structured", "tau": 0.9, **task_fields}}}
    return settings_from_mapping(raw, "cfg.yaml", ROOT)


@pytest.mark.parametrize("fields, fragment", [
    ({"latency_budget_ms": -5}, "routenlp_settings.tasks.banking77.latency_budget_ms"),
    ({"latency_budget_ms": "fast"}, "routenlp_settings.tasks.banking77.latency_budget_ms"),
    ({"latency_budget_ms": float("inf")}, "routenlp_settings.tasks.banking77.latency_budget_ms"),
    ({"latency_budget_ms": 500, "latency_budget_quantile": "p95"},
     "routenlp_settings.tasks.banking77.latency_budget_quantile"),
    ({"latency_budget_quantile": "p50"}, "latency_budget_quantile is set but latency_budget_ms is not"),
    ({"latency_budget": 500}, "routenlp_settings.tasks.banking77.latency_budget"),
])
def test_bad_budget_settings_are_refused_naming_the_field(fields, fragment):
    with pytest.raises(SettingsError) as caught:
        _settings(**fields)
    assert fragment in str(caught.value)


def test_budget_defaults_to_p99():
    assert _settings(latency_budget_ms=500).tasks["banking77"].latency_budget_quantile == "p99"
    assert _settings(latency_budget_ms=500, latency_budget_quantile="p50").tasks["banking77"].latency_budget_quantile \
        == "p50"
    assert _settings().tasks["banking77"].latency_budget_ms is None


# ----------------------------------------------------------------------------------------- hooks
def _one_request(callback, router, task):
    async def run():
        data = {"model": "routenlp", "messages": [{"role": "user", "content": "I am still waiting on my card?"}],
                "metadata": {"task": task}}
        data = await callback.async_pre_call_hook(None, None, data, "completion")
        first = await router.acompletion(model=data["model"], messages=data["messages"],
                                         metadata=data["metadata"], logprobs=True)
        final = await callback.async_post_call_success_hook(data, None, first)
        return await callback.async_post_call_response_headers_hook(data, None, final or first)

    return asyncio.run(run())


@pytest.mark.parametrize("slow, path, instead", [
    ({3: 2000.0}, ["T1", "T4"], "escalation to T4 instead of T3"),     # T3 slow: escalate to T4 instead
    ({3: 2000.0, 4: 2500.0}, ["T1"], "escalation to T3 skipped"),      # both slow: keep T1's answer
])
def test_escalation_over_budget_moves_or_stops_and_says_so(tmp_path, monkeypatch, slow, path, instead):
    import litellm
    from test_reliability import _callback, _mock_deployments

    def mutate(document):
        # this query starts at T1 for both tasks (as in test_reliability's key-budget test); T1 is uncertain
        document["routenlp_settings"]["tasks"]["banking77"]["latency_budget_ms"] = 1500

    callback, _ = _callback(tmp_path, mutate)
    router = litellm.Router(model_list=_mock_deployments(), num_retries=0)
    callback._llm_router = router
    monkeypatch.setattr(litellm, "callbacks", [callback])
    for tier, ms in slow.items():  # what the windows hold after a slowdown of these tiers
        callback.sla.latencies.observe(tier, ms)
    headers = _one_request(callback, router, "banking77")
    assert headers["x-routenlp-path"].split(",") == path, headers
    assert instead in headers["x-routenlp-sla"] and "budget 1500 ms (p99)" in headers["x-routenlp-sla"]
    record = list(read_decisions(tmp_path / "decisions.jsonl"))[-1]
    assert record["sla"]["forced"] and record["sla"]["chosen_instead_of"] == 3 and record["sla"]["budget_ms"] == 1500
    if path == ["T1"]:
        assert record["policy"]["stop_reason"] == "latency_budget"
    # the task without a budget is not touched by the same slow figures
    headers = _one_request(callback, router, "clinc150")
    assert headers["x-routenlp-path"].split(",") == ["T1", "T3", "T4"] and "x-routenlp-sla" not in headers
    assert "sla" not in list(read_decisions(tmp_path / "decisions.jsonl"))[-1]
