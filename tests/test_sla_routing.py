"""Issue 12 section 2: SLA-aware routing (litellm_routenlp/latency_budget.py).

* the rolling per-tier figures and the start / escalation choices under a budget, on their own;
* the settings (``latency_budget_ms``, ``latency_budget_quantile``) refused at start-up naming the field;
* the hooks with the real ``litellm.Router`` (LiteLLM's ``mock_response`` deployments) whose tier
  latencies are the plugin's own windows: an escalation over budget goes to a tier that meets it, or
  stops, and the record and ``x-routenlp-sla`` say so;
* the real proxy (marker ``proxy``): one dedicated ``litellm --config`` proxy whose four tiers are
  ``openai/...`` deployments on the loopback upstream this test controls (tests/fake_upstream.py).  The
  top tier starts answering 2 s late: requests of the task with a budget move to a tier that meets it,
  requests of the task without one are served as before.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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


# ----------------------------------------------------------------------------------------- real proxy
SLOW_S = 2.0          # the slowdown of the top tier
BUDGET_MS = 1500      # banking77's p99 budget (a first call on a loaded machine can take ~1 s); clinc150 has none
QUERIES = 6           # per task and phase


@pytest.fixture(scope="module")
def upstream(start_upstream):
    """All four tiers on one loopback server (tests/fake_upstream.py): a confident two-token answer with
    logprobs after ``delay_s[k]`` seconds."""
    return start_upstream()


@pytest.fixture(scope="module")
def sla_proxy(tmp_path_factory, upstream):
    from conftest import running_proxy

    work = tmp_path_factory.mktemp("sla")
    prices = {1: 0.00001, 2: 0.0001, 3: 0.0008, 4: 0.008}
    document = {
        "model_list": [{"model_name": "routenlp",
                        "litellm_params": {"model": f"openai/fake-t{k}", "api_key": "not-used",
                                           "api_base": upstream.api_base(k),
                                           "timeout": 30, "max_retries": 0,
                                           "input_cost_per_token": price, "output_cost_per_token": price},
                        "model_info": {"id": f"fake-t{k}", "routenlp_tier": k}} for k, price in prices.items()],
        "litellm_settings": {"callbacks": "litellm_routenlp.proxy_hook.routenlp"},
        "router_settings": {"num_retries": 0},
        "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
        "routenlp_settings": {
            "router_artifact": str(ROOT / "artifacts/router"),
            "decision_log_path": str(work / "decisions.jsonl"),
            # no policy file: the paper's start rule, no cascade; a near-1 confidence sends nearly
            # every query to the top tier, the one that slows down
            "route_confidence": 0.999999,
            "tasks": {"banking77": {"kind": "structured", "tau": 0.92, "latency_budget_ms": BUDGET_MS},
                      "clinc150": {"kind": "structured", "tau": 0.92}}},
    }
    config = work / "proxy_config.yaml"
    config.write_text(yaml.safe_dump(document, sort_keys=False))
    with running_proxy(config, work) as process:
        yield process


def _send(proxy, text, task):
    import httpx

    started = time.perf_counter()
    reply = httpx.post(proxy.base_url + "/v1/chat/completions", timeout=60,
                       headers={"Authorization": f"Bearer {proxy.master_key}"},
                       json={"model": "routenlp", "messages": [{"role": "user", "content": text}],
                             "max_tokens": 8, "metadata": {"task": task}})
    assert reply.status_code == 200, reply.text[:300]
    return dict(reply.headers), time.perf_counter() - started


def _send_all(proxy, jobs):
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(lambda job: _send(proxy, *job), jobs))


@pytest.mark.proxy
def test_a_tier_slowdown_moves_budgeted_requests_and_leaves_the_others(sla_proxy, upstream):
    from routenlp_core.tasks import get_task

    texts = {task: [e.text for e in get_task(task).load("test", limit=QUERIES, seed=5)]
             for task in ("banking77", "clinc150")}
    # phase 1: every tier answers at once; nothing is forced
    before = {task: [_send(sla_proxy, text, task)[0] for text in texts[task]] for task in texts}
    for headers in before["banking77"] + before["clinc150"]:
        assert "x-routenlp-sla" not in headers, headers
    at_top = [i for i, h in enumerate(before["banking77"]) if h["x-routenlp-tier"] == "T4"]
    assert at_top, [h["x-routenlp-tier"] for h in before["banking77"]]  # the router wants the top tier

    # phase 2: the top tier answers 2 s late; the task without a budget keeps using it (and so the
    # plugin's window of T4 learns the slowdown from LiteLLM's success events)
    upstream.delay_s[4] = SLOW_S
    slow = _send_all(sla_proxy, [(text, "clinc150") for text in texts["clinc150"]])
    assert [h["x-routenlp-tier"] for h, _ in slow] == [h["x-routenlp-tier"] for h in before["clinc150"]]
    assert all(seconds >= SLOW_S for (h, seconds) in slow if h["x-routenlp-tier"] == "T4")
    time.sleep(1.0)  # LiteLLM's success events run just after each answer

    mixed = _send_all(sla_proxy, [(text, "banking77") for text in texts["banking77"]]
                      + [(text, "clinc150") for text in texts["clinc150"]])
    budgeted, plain = mixed[:QUERIES], mixed[QUERIES:]
    records = {r["request_id"]: r for r in read_decisions(sla_proxy.decision_log)}
    for index, (headers, seconds) in enumerate(budgeted):
        assert headers["x-routenlp-tier"] != "T4", headers          # moved off the slow tier
        assert seconds < SLOW_S, seconds
        record = records[headers["x-routenlp-request-id"]]
        if index in at_top:
            assert "instead of T4" in headers["x-routenlp-sla"], headers
            assert record["sla"]["forced"] and record["sla"]["chosen_instead_of"] == 4
            assert record["sla"]["budget_ms"] == BUDGET_MS and record["sla"]["met"]
            assert record["sla"]["choices"][0]["instead_expected_ms"] >= SLOW_S * 1000
    # the task without a budget: the same tiers as before the slowdown, no sla header or record block
    assert [h["x-routenlp-tier"] for h, _ in plain] == [h["x-routenlp-tier"] for h in before["clinc150"]]
    for headers, seconds in plain:
        assert "x-routenlp-sla" not in headers
        assert "sla" not in records[headers["x-routenlp-request-id"]]
        if headers["x-routenlp-tier"] == "T4":
            assert seconds >= SLOW_S
    print(f"\nslowdown: budgeted tiers {[h['x-routenlp-tier'] for h, _ in budgeted]} "
          f"(before {[h['x-routenlp-tier'] for h in before['banking77']]}); "
          f"plain {[h['x-routenlp-tier'] for h, _ in plain]}; headers e.g. {budgeted[at_top[0]][0]['x-routenlp-sla']!r}")


# ----------------------------------------------------------------------------------------- the bench
def test_bench_simulation_without_a_budget_is_the_plain_queue():
    import numpy as np

    from coopt.bench.queueing import QueueConfig, mmc_mean_wait, simulate, simulate_sla

    config = QueueConfig(workers=(4,), top_rate_per_s=None, n_arrivals=20000)
    for rate in (40.0, 70.0):   # 4 workers x 20/s: utilisation 0.5 and 0.875
        plain = simulate_sla(np.array([[True]]), [0.05], rate, config, np.random.default_rng(3))
        assert plain["forced"] == 0.0
        reference = simulate(np.array([[True]]), [0.05], rate, config, np.random.default_rng(3))["mean_ms"]
        closed_form = 50.0 + 1000.0 * mmc_mean_wait(4, rate, 20.0)
        assert abs(plain["mean_ms"] - reference) / reference < 0.05
        assert abs(plain["mean_ms"] - closed_form) / closed_form < 0.08, (plain["mean_ms"], closed_form)


def test_bench_simulation_with_a_budget_moves_queries_off_a_slow_tier():
    import numpy as np

    from coopt.bench.queueing import QueueConfig, simulate_sla

    paths = np.array([[True, False], [False, True], [True, True]])   # T1; T2; T1 then T2
    quality = np.array([[1.0, 1.0], [0.0, 1.0], [0.2, 1.0]])
    cost = np.array([[0.01, 1.0]] * 3)
    config = QueueConfig(n_arrivals=6000, top_rate_per_s=60.0, sla_ms=500.0)
    none = simulate_sla(paths, [0.05, 0.8], 10.0, config, np.random.default_rng(4), quality=quality, cost=cost)
    p99 = simulate_sla(paths, [0.05, 0.8], 10.0, config, np.random.default_rng(4), quantile="p99",
                       quality=quality, cost=cost)
    assert none["forced"] == 0.0 and p99["forced"] > 0.5            # T2 (p99 ~ 3 s) is avoided
    assert p99["p99_ms"] < 500.0 < none["p99_ms"] and p99["sla_violation"] < none["sla_violation"]
    assert p99["quality_ratio"] < none["quality_ratio"] and p99["cost_ratio"] < none["cost_ratio"]  # the price
    # a budget every tier meets changes nothing (same draws)
    loose = QueueConfig(n_arrivals=6000, top_rate_per_s=60.0, sla_ms=1e9)
    a = simulate_sla(paths, [0.05, 0.8], 10.0, loose, np.random.default_rng(4))
    b = simulate_sla(paths, [0.05, 0.8], 10.0, loose, np.random.default_rng(4), quantile="p99")
    assert a["p99_ms"] == b["p99_ms"] and b["forced"] == 0.0
    # a tier a query may not use is never chosen for it: T1 not allowed -> T2 stays (the fastest allowed)
    only_t2 = simulate_sla(paths[1:2], [0.05, 0.8], 10.0, config, np.random.default_rng(4), quantile="p99",
                           allowed=np.array([[False, True]]), quality=quality[1:2])
    assert only_t2["quality_ratio"] == 1.0


@pytest.mark.parametrize("task, probabilities, down, slow, served, sla, degraded", [
    # banking77 wants T3, T3 is slow: the nearest cheaper eligible tier (T1); health played no part
    ("banking77", [0.1, 0.0, 0.8, 0.1], set(), {3: 2000.0}, 1, "start T1 instead of T3 (2000 ms)", None),
    # bitext wants T3, T3 is down (generation goes up: T4), T4 is slow: the budget takes T2
    ("bitext", [0.0, 0.1, 0.8, 0.1], {3}, {4: 3000.0}, 2, "start T2 instead of T4 (3000 ms)",
     "T3 unavailable; served by T2"),
    # the wanted tier is within budget: nothing forced, no header
    ("banking77", [0.1, 0.0, 0.8, 0.1], set(), {3: 100.0}, 3, None, None),
])
def test_start_over_budget_at_the_filter_hook(tmp_path, task, probabilities, down, slow, served, sla, degraded):
    from test_reliability import _callback, filter_for

    def mutate(document):
        for name in ("banking77", "bitext"):
            document["routenlp_settings"]["tasks"][name]["latency_budget_ms"] = 800

    callback, document = _callback(tmp_path, mutate)
    for tier, ms in slow.items():
        callback.sla.latencies.observe(tier, ms)
    kept, state = filter_for(callback, document, task, probabilities, down)
    assert {d["model_info"]["routenlp_tier"] for d in kept} == {served}
    headers = callback._headers(state, {"final_tier": served, "path": [served], "uncertainties": [0.1]})
    assert (headers.get("x-routenlp-sla") or "").startswith(sla or "") and (sla is None) == ("x-routenlp-sla" not in headers)
    assert headers.get("x-routenlp-degraded") == degraded, headers
    assert state.sla[0].forced == (sla is not None)


@pytest.mark.needs(artifacts=["encoder/model.onnx"])
def test_bench_reports_sla_routing_for_every_routenlp_system(tmp_path):
    from test_bench_run import ENCODER, _synthetic_file

    from routenlp_cli.cli import main

    data_path, portfolio_path = _synthetic_file(tmp_path)
    out = tmp_path / "out"
    assert main(["bench", "--data", str(data_path), "--portfolio", str(portfolio_path), "--out", str(out),
                 "--systems", "RouteNLP,RouteNLP (paper rule),Random", "--seeds", "1", "--n-arrivals", "2000",
                 "--arrivals", "1000,20000", "--bootstrap", "50", "--no-progress", "--no-sweeps",
                 "--cache", str(tmp_path / "cache.safetensors"), "--encoder", str(ENCODER)]) == 0
    results = json.loads((out / "results.json").read_text())
    for name in ("RouteNLP", "RouteNLP (paper rule)"):
        by_rate = results["systems"][name]["sla_routing"]
        assert set(by_rate) == {"1000", "20000"} and set(by_rate["1000"]) == {"none", "p99", "p50"}
        assert by_rate["1000"]["none"]["forced"]["mean"] == 0.0
    assert "sla_routing" not in results["systems"]["Random"]
    table = (out / "table.md").read_text()
    assert "SLA-aware routing" in table and "p99 1,847 ms -> 387 ms" in table and "**RouteNLP**" in table
