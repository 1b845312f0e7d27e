"""The proxy serves the decision policy its policy file names, and only under the settings it was fitted under.

* Start-up: a policy file records what it was fitted under (router sha256, quantisation, max_hops,
  no_logprobs_policy, route_confidence, task specs); any difference stops the proxy naming the field
  (or, with ``fail_open``, sends everything to the top tier).
* A real proxy on ``proxy_config.yaml`` with ``thresholds_path`` pointing at a ``cascade_routing``
  or a ``posterior_threshold`` policy file: the decision log records, per request, the router's
  per-tier estimates, the policy's estimates at the start and after each answer, lambda or threshold
  and why it stopped; the headers are unchanged.  The knobs are set by hand here (certification is tested on its own in tests/test_certify.py and
  tests/test_policy.py): the demo's ~100 calibration rows per task certify no cheap lambda.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from litellm_routenlp.config import SettingsError
from litellm_routenlp.decision_log import read_decisions
from litellm_routenlp.plugin import RouteNLPCallback
from litellm_routenlp.policy import STOP_REASONS

from conftest import running_proxy, write_proxy_config

ROOT = Path(__file__).resolve().parent.parent
LAMBDA = 0.05
THRESHOLD = 0.6


def write_config(tmp_path: Path, mutate=None, thresholds_path: Path | None = None) -> Path:
    return write_proxy_config(tmp_path, thresholds_path=thresholds_path, mutate_settings=mutate)


@pytest.mark.parametrize("mutate, field", [
    (lambda s: s.update(route_confidence=0.6), "route_confidence"),
    (lambda s: s.update(max_hops=2), "max_hops"),
    (lambda s: s.update(no_logprobs_policy="escalate"), "no_logprobs_policy"),
    (lambda s: s.update(router_quantized=False), "router_quantized"),
    (lambda s: s["tasks"]["banking77"].update(tau=0.9), "tasks.banking77.tau"),
    (lambda s: s.update(router_artifact=str(ROOT / "artifacts/router-minilm")), "router_sha256"),
])
def test_a_policy_file_fitted_under_other_settings_stops_start_up_naming_the_field(tmp_path, mutate, field):
    with pytest.raises(SettingsError) as info:
        RouteNLPCallback.from_config(write_config(tmp_path, mutate))
    message = str(info.value)
    assert "routenlp_settings.thresholds_path" in message and "fitted under other settings" in message
    assert field in message.split("these: ")[1].split(" (")[0]


def test_fail_open_serves_the_top_tier_when_the_policy_does_not_match(tmp_path):
    callback = RouteNLPCallback.from_config(write_config(
        tmp_path, lambda s: s.update(route_confidence=0.6, fail_open=True)))
    assert callback.router is None
    decision = callback.decide([{"role": "user", "content": "my card got eaten"}], {"task": "banking77"})
    assert decision.probabilities == [0.0, 0.0, 0.0, 1.0]


#: the knob each certified policy is served with here, set by hand (see the module docstring)
KNOBS = {"cascade_routing": ("lambda", LAMBDA), "posterior_threshold": ("threshold", THRESHOLD)}


def certified_policy_file(tmp_path: Path, name: str = "cascade_routing") -> Path:
    """The demo's calibrated policy file (posterior estimator, costs, sigmas) served as ``name``."""
    document = json.loads((ROOT / "artifacts/policy-cascade-routing.json").read_text())
    assert document["policy"] == "cascade_routing"
    document["policy"] = name
    field, value = KNOBS[name]
    for entry in document["tasks"].values():
        entry["lambda"] = None
        entry[field] = value
        entry["certificate"] = {**(entry.get("certificate") or {}), "note": f"{field} set by the test"}
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(document))
    return path


@pytest.fixture(scope="module", params=sorted(KNOBS))
def cascade_proxy(request, tmp_path_factory):
    work = tmp_path_factory.mktemp("policy-proxy")
    config = write_config(work, thresholds_path=certified_policy_file(work, request.param))
    with running_proxy(config, work) as process:
        process.policy_name = request.param
        yield process


@pytest.mark.proxy
def test_the_real_proxy_serves_each_certified_policy_and_logs_every_estimate(cascade_proxy):
    from openai import OpenAI

    from routenlp_core.tasks import get_task

    client = OpenAI(base_url=cascade_proxy.base_url, api_key=cascade_proxy.master_key, timeout=300, max_retries=0)
    queries = [(task, example.text) for task in ("banking77", "clinc150")
               for example in get_task(task).load("test", limit=6, seed=3)]
    headers_by_call = {}
    for task, text in queries:
        raw = client.chat.completions.with_raw_response.create(
            model="routenlp", messages=[{"role": "user", "content": text}], metadata={"task": task}, max_tokens=16)
        assert raw.parse().choices[0].message.content
        headers_by_call[raw.headers["x-litellm-call-id"]] = raw.headers
    records = {r["client_call_id"]: r for r in read_decisions(cascade_proxy.decision_log)}
    tiers_seen = set()
    for call_id, headers in headers_by_call.items():
        record = records[call_id]
        field, value = KNOBS[cascade_proxy.policy_name]
        assert record["policy"]["name"] == cascade_proxy.policy_name and record["policy"][field] == value
        assert set(record["router"]["acceptance"]) == {"T1", "T2", "T3", "T4"}
        assert len(record["policy"]["start_estimates"]) == 4
        assert record["policy"]["stop_reason"] in STOP_REASONS
        for attempt in record["attempts"]:  # the estimate after every answer, and the policy's reason
            assert attempt["estimates"] is not None and len(attempt["estimates"]) == 4 and attempt["reason"]
        # headers unchanged: tier, path, costs as before, and they agree with the record
        assert headers["x-routenlp-tier"] == record["final_tier"]
        assert headers["x-routenlp-path"] == ",".join(a["tier_name"] for a in record["attempts"] if a["error"] is None)
        assert float(headers["x-routenlp-total-cost"]) == pytest.approx(record["total_cost_usd"], rel=1e-6)
        tiers_seen.add(record["router"]["routed_tier"])
    # the policy, not a fixed rule, picks the start: at lambda 0.05 / threshold 0.6 the cheap classifier starts some
    assert "T1" in tiers_seen
