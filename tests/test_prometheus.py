"""Issue 13 item 3: live ``routenlp_*`` Prometheus metrics.

* the counters after requests through the plugin's own hooks (real ``litellm.Router``, mock tiers with
  logprobs): a plain request, an escalation T1 -> T3 -> T4 and a degraded one;
* ``routenlp_settings.metrics_port``: prometheus-client's server on 127.0.0.1, scraped over HTTP;
* several workers: prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) sums two real
  worker processes on the one endpoint;
* a real ``litellm --config`` proxy with LiteLLM's ``prometheus`` callback on: its own ``/metrics``
  shows our counters next to LiteLLM's, per task and tier, matching the answers' headers; the
  ``metrics_port`` of the same proxy serves the same counters.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections import Counter as Tally
from pathlib import Path

import pytest

from litellm_routenlp import prometheus_metrics as pm
from litellm_routenlp.proxy_process import ProxyProcess, free_port

from test_client_input import SPEND_PROBE
from test_spend_tags import _callback, mock_deployments, one_request

ROOT = Path(__file__).resolve().parent.parent


def _decision(**fields):
    """A routing decision as the plugin hands it to the metrics (task fields do not matter here)."""
    from litellm_routenlp.routing import RoutingDecision

    return RoutingDecision("test", "known", [], **fields)


def scrape(url: str, key: str | None = None) -> dict[tuple[str, frozenset], float]:
    """Samples of an exposition page, parsed by prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(request, timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_every_metric_is_registered_with_litellm_style_names() -> None:
    from prometheus_client import REGISTRY

    names = {family.name for family in REGISTRY.collect()}
    for name in pm.metric_names():
        assert name in names and name.startswith("routenlp_"), name
    assert pm.REQUESTS._labelnames == ("task", "tier")
    assert pm.ESCALATIONS._labelnames == ("task", "from_tier", "to_tier")
    assert pm.DEGRADED._labelnames == ("task", "wanted_tier", "served_tier")
    assert pm.AUDIT_VERDICTS._labelnames == ("task", "verdict", "source")


def test_counters_after_a_plain_an_escalated_and_a_degraded_request_through_the_plugin(tmp_path, monkeypatch):
    import litellm

    callback = _callback(tmp_path)
    monkeypatch.setattr(litellm, "callbacks", [callback])
    tiers = ["T1", "T2", "T3", "T4"]
    series = {  # every series these requests can touch, read before and after
        **{("routenlp_requests_total", ("tier", t)): {"task": "banking77", "tier": t} for t in tiers},
        **{("routenlp_escalations_total", a, b): {"task": "banking77", "from_tier": a, "to_tier": b}
           for a in tiers for b in tiers},
        **{("routenlp_uncertainty_count", t): {"task": "banking77", "tier": t} for t in tiers},
        ("routenlp_cascade_hops_count",): {"task": "banking77"},
        ("routenlp_cascade_hops_sum",): {"task": "banking77"},
        ("routenlp_cascade_hops_bucket", "0"): {"task": "banking77", "le": "0.0"},
        ("routenlp_router_latency_seconds_count",): {"task": "banking77"},
        **{("routenlp_degraded_total", w, t): {"task": "banking77", "wanted_tier": w, "served_tier": t}
           for w in tiers for t in tiers},
    }
    before = {key: pm.sample(key[0], labels) for key, labels in series.items()}

    async def traffic():
        plain = await one_request(callback, litellm.Router(model_list=mock_deployments(), num_retries=0), "m-plain")
        wanted = int(plain["x-routenlp-path"][1:])   # all tiers healthy: served = wanted
        assert wanted < 4, "the probe query must start below the top tier for the cascade to run"
        escalated = await one_request(
            callback, litellm.Router(model_list=mock_deployments(uncertain_tiers=(1, 2, 3)), num_retries=0), "m-esc")
        degraded = await one_request(
            callback, litellm.Router(model_list=mock_deployments(without=(wanted,)), num_retries=0), "m-deg")
        return wanted, [h["x-routenlp-path"].split(",") for h in (plain, escalated, degraded)]

    wanted, paths = asyncio.run(traffic())
    plain, escalated, degraded = paths
    assert plain == [f"T{wanted}"] and len(escalated) >= 2 and escalated[-1] == "T4", paths
    assert degraded[0] != f"T{wanted}", paths           # its wanted tier was down
    delta = {key: pm.sample(key[0], labels) - before[key] for key, labels in series.items()}

    expected = {key: 0.0 for key in series}
    for path in paths:
        expected[("routenlp_requests_total", ("tier", path[-1]))] += 1
        for low, high in zip(path, path[1:]):
            expected[("routenlp_escalations_total", low, high)] += 1
        for tier in path:                                  # every tier answered with logprobs
            expected[("routenlp_uncertainty_count", tier)] += 1
        expected[("routenlp_cascade_hops_sum",)] += len(path) - 1
    expected[("routenlp_cascade_hops_count",)] = 3
    expected[("routenlp_cascade_hops_bucket", "0")] = sum(len(path) == 1 for path in paths)
    expected[("routenlp_router_latency_seconds_count",)] = 3
    expected[("routenlp_degraded_total", f"T{wanted}", degraded[0])] = 1
    assert delta == expected
    assert sum(v for k, v in delta.items() if k[0] == "routenlp_escalations_total") >= 1


def test_metrics_port_serves_the_counters_on_loopback() -> None:
    port = free_port()
    assert pm.start_metrics_server(port) is True
    assert pm.start_metrics_server(port) is True        # once per process: a second call is a no-op
    pm.observe_answer("clinc150", _decision(router_ms=2.0, tier=1, wanted_tier=1),
                      {"final_tier": 1, "path": [1], "uncertainties": [0.2]}, {1: "T1"})
    samples = scrape(f"http://127.0.0.1:{port}/metrics")
    assert value(samples, "routenlp_requests_total", task="clinc150", tier="T1") == \
        pm.sample("routenlp_requests_total", {"task": "clinc150", "tier": "T1"}) >= 1
    assert pm.start_metrics_server(None) is False


WORKER = textwrap.dedent("""
    import sys
    from litellm_routenlp import prometheus_metrics as pm
    from litellm_routenlp.routing import RoutingDecision
    for _ in range(int(sys.argv[1])):
        pm.observe_answer("bitext", RoutingDecision("bitext", "known", [0.0, 1.0], router_ms=1.0, tier=2, wanted_tier=2),
                          {"final_tier": 4, "path": [2, 4], "uncertainties": [0.6, 0.1]}, {2: "T2", 4: "T4"})
""")
SERVER = textwrap.dedent("""
    import sys, time
    from litellm_routenlp import prometheus_metrics as pm
    assert pm.start_metrics_server(int(sys.argv[1]))
    print("ready", flush=True)
    time.sleep(60)
""")


def test_several_workers_are_summed_in_multiprocess_mode(tmp_path) -> None:
    directory = tmp_path / "prom"
    directory.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory), "PYTHONPATH": str(ROOT)}
    for count in (3, 5):   # two worker processes, each with its own counters
        subprocess.run([sys.executable, "-c", WORKER, str(count)], env=env, check=True, timeout=60)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        samples = scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        server.kill()
        server.wait(timeout=10)
    assert value(samples, "routenlp_requests_total", task="bitext", tier="T4") == 8
    assert value(samples, "routenlp_escalations_total", task="bitext", from_tier="T2", to_tier="T4") == 8
    assert value(samples, "routenlp_uncertainty_count", task="bitext", tier="T2") == 8


# ----------------------------------------------------------------------------------------- real proxy
@pytest.fixture(scope="module")
def metrics_proxy(tmp_path_factory):
    """A small real proxy: the plugin, mock tiers (T1 and T3 uncertain), LiteLLM's prometheus callback,
    and our metrics port."""
    from conftest import write_proxy_config

    work = tmp_path_factory.mktemp("metrics_proxy")
    (work / "spend_probe.py").write_text(SPEND_PROBE)   # the rows LiteLLM's SpendLogs writer would store

    def mutate(document):
        document["model_list"] = mock_deployments(uncertain_tiers=(1, 3))
        document["litellm_settings"] = {"callbacks": ["litellm_routenlp.proxy_hook.routenlp", "prometheus",
                                                      "spend_probe.probe"]}

    port = free_port()
    config = write_proxy_config(work, mutate, metrics_port=port)
    process = ProxyProcess(config, log_path=work / "proxy.log", cwd=ROOT,
                           env={"SPEND_PROBE_PATH": str(work / "spend_rows.jsonl")})
    process.start(timeout=240)
    process.spend_rows = work / "spend_rows.jsonl"
    process.metrics_port = port
    yield process
    process.stop()


@pytest.mark.proxy
def test_litellms_own_metrics_endpoint_shows_our_counters_per_task_and_tier(metrics_proxy) -> None:
    from openai import OpenAI

    from routenlp_core.tasks import get_task

    client = OpenAI(base_url=metrics_proxy.base_url, api_key=metrics_proxy.master_key, timeout=120, max_retries=0)
    # LiteLLM's /metrics asks for a key by default (litellm_settings.require_auth_for_metrics_endpoint)
    with pytest.raises(urllib.error.HTTPError, match="401"):
        scrape(metrics_proxy.base_url + "/metrics")
    before = scrape(metrics_proxy.base_url + "/metrics", metrics_proxy.master_key)
    served, hops, paths = Tally(), Tally(), {}
    for task in ("banking77", "clinc150"):
        for example in get_task(task).load("test", limit=3, seed=5):
            raw = client.chat.completions.with_raw_response.create(
                model="routenlp", messages=[{"role": "user", "content": example.text}], metadata={"task": task},
                max_tokens=8)
            path = raw.headers["x-routenlp-path"].split(",")
            paths[raw.headers["x-routenlp-request-id"]] = (task, path)   # the plugin's id (issue 11)
            served[(task, path[-1])] += 1
            for low, high in zip(path, path[1:]):
                hops[(task, low, high)] += 1
    after = scrape(metrics_proxy.base_url + "/metrics", metrics_proxy.master_key)
    assert any(name.startswith("litellm_") for name, _ in after), "LiteLLM's own metrics are on the same page"
    for (task, tier), count in served.items():
        assert value(after, "routenlp_requests_total", task=task, tier=tier) - \
            value(before, "routenlp_requests_total", task=task, tier=tier) == count, (task, tier)
    for (task, low, high), count in hops.items():
        assert value(after, "routenlp_escalations_total", task=task, from_tier=low, to_tier=high) - \
            value(before, "routenlp_escalations_total", task=task, from_tier=low, to_tier=high) == count
    assert sum(hops.values()) > 0, "T1 and T3 are uncertain: some requests escalate"
    for task in ("banking77", "clinc150"):
        assert value(after, "routenlp_router_latency_seconds_count", task=task) - \
            value(before, "routenlp_router_latency_seconds_count", task=task) == 3
    # the separate metrics port of the same process serves the same registry
    port_page = scrape(f"http://127.0.0.1:{metrics_proxy.metrics_port}/metrics")
    for (task, tier), count in served.items():
        assert value(port_page, "routenlp_requests_total", task=task, tier=tier) == \
            value(after, "routenlp_requests_total", task=task, tier=tier)

    # the real proxy's spend rows carry the tags: tier of the deployment called, task, escalated re-asks
    deadline, rows = time.time() + 15, []
    while time.time() < deadline:
        rows = [json.loads(line) for line in metrics_proxy.spend_rows.read_text().splitlines()] \
            if metrics_proxy.spend_rows.exists() else []
        if len(rows) >= sum(len(p) for _, p in paths.values()):
            break
        time.sleep(0.2)
    seen = Tally()
    for row in rows:
        metadata = row["metadata"] if isinstance(row["metadata"], dict) else json.loads(row["metadata"])
        links = metadata.get("spend_logs_metadata") or {}
        parent = links.get("routenlp_parent_request_id")
        call_id = parent or links.get("routenlp_request_id")
        if call_id not in paths:
            continue
        task, path = paths[call_id]
        tags = [t for t in json.loads(row["request_tags"]) if t.startswith("routenlp-")]
        tier = "T" + row["model_id"][-1]
        assert tags == [f"routenlp-tier:{tier}", f"routenlp-task:{task}"] + (["routenlp-escalated"] if parent else []), \
            (row["model_id"], tags)
        seen[(call_id, tier)] += 1
    assert seen == Tally({(c, t): 1 for c, (_, p) in paths.items() for t in p}), seen


def test_a_malformed_outcome_is_logged_not_raised(caplog) -> None:
    before = pm.sample("routenlp_requests_total", {"task": "bitext", "tier": "T2"})
    pm.observe_answer("bitext", _decision(router_ms="not-a-number", tier=2), {"final_tier": 2, "path": [2],
                                                                            "uncertainties": ["bad"]}, {2: "T2"})
    assert "updating Prometheus metrics failed" in caplog.text
    assert pm.sample("routenlp_requests_total", {"task": "bitext", "tier": "T2"}) == before + 1  # counted first
