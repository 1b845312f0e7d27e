"""End to end through the real ``litellm --config ...`` proxy process, with the real local tiers.

One proxy for the whole module (start-up ~15-30 s).  Its config is proxy_config.yaml with a private
decision log and two tuned settings so that every branch is exercised by real models:

* ``route_confidence`` is set to the median of the router's P(T2 acceptable) over the probe queries,
  so about half of them start at SmolLM2 (T2) and half higher (with the shipped 0.5, SmolLM2-135M is
  rarely good enough for support answers and the router skips it);
* delta[T2][bitext] sits inside the range of SmolLM2's real uncertainties on those queries, so the
  cascade both fires and holds on real logprobs.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import yaml

from litellm_routenlp.decision_log import read_decisions
from conftest import running_proxy

pytestmark = pytest.mark.proxy

ROOT = Path(__file__).resolve().parent.parent
# Real bitext instructions (test split); SmolLM2's uncertainty on them straddles PROBE_DELTA.
PROBE_DELTA = 0.43


def probe_queries():
    from routenlp_core.tasks import get_task

    return [example.text for example in get_task("bitext").load("test", limit=24, seed=11)]


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    import numpy as np

    from litellm_routenlp.router_model import RouterModel

    work = tmp_path_factory.mktemp("proxy")
    document = yaml.safe_load((ROOT / "proxy_config.yaml").read_text())
    thresholds = json.loads((ROOT / "artifacts/thresholds.json").read_text())
    thresholds["thresholds"].setdefault("T2", {})["bitext"] = {"delta": PROBE_DELTA, "n": 0, "note": "test probe"}
    thresholds["thresholds"].setdefault("T3", {})["bitext"] = {"delta": 1.0, "n": 0, "note": "never escalates"}
    (work / "thresholds.json").write_text(json.dumps(thresholds))
    settings = document["routenlp_settings"]
    router = RouterModel.load(ROOT / "artifacts/router", quantized=settings["router_quantized"])
    texts = probe_queries()
    probabilities = router.predict_proba(texts, ["bitext"] * len(texts))
    settings["route_confidence"] = float(np.median(probabilities[:, 0] + probabilities[:, 1]))
    # the policy file must say it was fitted under the setting it is served with (the proxy checks)
    thresholds["fitted_under"]["route_confidence"] = settings["route_confidence"]
    (work / "thresholds.json").write_text(json.dumps(thresholds))
    settings["router_artifact"] = str(ROOT / "artifacts/router")
    settings["thresholds_path"] = str(work / "thresholds.json")
    settings["decision_log_path"] = str(work / "decisions.jsonl")
    config = work / "proxy_config.yaml"
    config.write_text(yaml.safe_dump(document, sort_keys=False))
    with running_proxy(config, work) as process:
        yield process


@pytest.fixture(scope="module")
def client(proxy):
    from openai import OpenAI

    return OpenAI(base_url=proxy.base_url, api_key=proxy.master_key, timeout=300, max_retries=0)


def ask(client, text, task=None, **kwargs):
    metadata = {"task": task} if task is not None else None
    raw = client.chat.completions.with_raw_response.create(
        model="routenlp", messages=[{"role": "user", "content": text}], metadata=metadata,
        max_tokens=kwargs.pop("max_tokens", 40), **kwargs)
    return raw.parse(), raw.headers


def records_by_id(proxy):
    # keyed by the call id LiteLLM echoes in x-litellm-call-id (the record's own id is the plugin's)
    return {record.get("client_call_id") or record["request_id"]: record for record in read_decisions(proxy.decision_log)}


def parse_path(headers):
    return headers["x-routenlp-path"].split(",")


def test_intent_queries_are_served_by_the_classifier_when_it_is_confident(client):
    completion, headers = ask(client, "I am still waiting on my card?", task="banking77")
    assert headers["x-routenlp-task"] == "banking77"
    assert parse_path(headers)[0] in {"T1", "T2", "T3", "T4"}
    assert completion.choices[0].message.content


@pytest.fixture(scope="module")
def probe_results(client):
    """(path, uncertainties) for each bitext probe query, asked once through the proxy."""
    results = []
    for text in probe_queries():
        _, headers = ask(client, text, task="bitext")
        results.append((parse_path(headers), [float(u) for u in headers["x-routenlp-uncertainty"].split(",")]))
    return results


def test_chosen_tier_depends_on_query_and_task(client, proxy, probe_results):
    from routenlp_core.tasks import get_task

    intent_first = [parse_path(ask(client, e.text, task="banking77")[1])[0]
                    for e in get_task("banking77").load("test", limit=6, seed=3)]
    bitext_first = [path[0] for path, _ in probe_results]
    # T1 is a classifier: never chosen for generation; the router uses it for intents.
    assert "T1" not in bitext_first
    assert "T1" in intent_first
    # within one task, the query decides: some probes start at T2, others higher
    assert "T2" in bitext_first and set(bitext_first) - {"T2"}, bitext_first
    records = list(read_decisions(proxy.decision_log))
    probabilities = {json.dumps(r["router"]["probabilities"]) for r in records if r.get("task") == "bitext"}
    assert len(probabilities) > 1, "router probabilities should vary with the query"


def test_cascade_fires_iff_uncertainty_exceeds_delta_with_real_smollm2_logprobs(probe_results):
    fired = kept = 0
    for path, uncertainties in probe_results:
        if path[0] != "T2":
            continue
        if uncertainties[0] > PROBE_DELTA:
            assert len(path) >= 2 and path[1] in {"T3", "T4"}, (uncertainties, path)
            fired += 1
        else:
            assert path == ["T2"], (uncertainties, path)
            kept += 1
    assert fired and kept, f"expected both branches, got fired={fired} kept={kept}"


def test_headers_cost_and_decision_log_agree(client, proxy):
    completion, headers = ask(client, "how do i get a refund for an order i never received", task="bitext")
    call_id = headers.get("x-litellm-call-id")
    record = records_by_id(proxy)[call_id]
    attempts = [a for a in record["attempts"] if a["error"] is None]
    assert [a["tier_name"] for a in attempts] == parse_path(headers)
    assert headers["x-routenlp-tier"] == record["final_tier"] == attempts[-1]["tier_name"]
    total = float(headers["x-routenlp-total-cost"])
    assert total == pytest.approx(sum(a["cost_usd"] for a in record["attempts"]), rel=1e-6, abs=1e-12)
    assert total > 0
    header_us = [float(u) for u in headers["x-routenlp-uncertainty"].split(",")]
    assert header_us == pytest.approx([a["uncertainty"] for a in attempts], abs=1e-4)
    for attempt in attempts[:-1]:
        assert attempt["escalated"] and attempt["uncertainty"] > attempt["threshold"]
    assert record["prompt"].startswith("how do i get a refund")
    assert math.isclose(sum(record["router"]["probabilities"].values()), 1.0, rel_tol=1e-4)
    # the client did not ask for logprobs: they are stripped
    assert completion.choices[0].logprobs is None


def test_streaming_request_gets_the_complete_answer(client, proxy):
    text = "I need to change the shipping address of my order"
    _, plain_headers = ask(client, text, task="bitext")
    plain = records_by_id(proxy)
    raw = client.chat.completions.with_raw_response.create(
        model="routenlp", messages=[{"role": "user", "content": text}], metadata={"task": "bitext"},
        max_tokens=40, stream=True)
    headers = raw.headers
    pieces, finish = [], None
    for chunk in raw.parse():
        for choice in chunk.choices:
            if choice.delta and choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    streamed = "".join(pieces)
    assert streamed.strip(), "stream carried no text"
    assert finish is not None
    assert headers["x-routenlp-path"] == plain_headers["x-routenlp-path"]
    # greedy tiers: the buffered stream replays the same final answer as the non-streaming call
    completion, _ = ask(client, text, task="bitext")
    assert streamed == completion.choices[0].message.content
    streamed_records = [r for r in read_decisions(proxy.decision_log) if r.get("stream")]
    assert streamed_records and streamed_records[-1]["final_tier"] == headers["x-routenlp-tier"]
    assert len(plain) >= 1


@pytest.mark.parametrize("body, fragment", [
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n > 1"),
    ({"messages": [{"role": "user", "content": "hi"}], "metadata": {"task": 5}}, "metadata.task"),
    ({"messages": [{"role": "user", "content": "   "}], "metadata": {"task": "bitext"}}, "must contain text"),
])
def test_bad_requests_get_a_400_with_a_message(client, body, fragment):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="routenlp", **body)
    assert fragment in str(info.value)


def test_unknown_task_is_routed_with_the_task_agnostic_embedding(client, proxy):
    completion, headers = ask(client, "summarise this: the meeting moved to friday", task="poetry_review")
    record = records_by_id(proxy)[headers["x-litellm-call-id"]]
    assert record["task_status"] == "unknown"
    assert completion.choices[0].message.content
    # T1 and T2 are restricted to named tasks; no thresholds exist for an unknown task: no cascade
    assert parse_path(headers) == [headers["x-routenlp-tier"]]
    assert headers["x-routenlp-tier"] in {"T3", "T4"}


def test_decision_log_is_readable_while_running_and_intact_after_kill_9(client, proxy):
    """Runs last: every acknowledged request has its record, whole, after SIGKILL."""
    import signal

    acknowledged = []
    for text in ("I lost my card", "how do i top up with apple pay", "what is the exchange rate"):
        _, headers = ask(client, text, task="banking77")
        acknowledged.append(headers["x-litellm-call-id"])
    assert set(acknowledged) <= set(records_by_id(proxy))  # readable while the proxy runs
    proxy.stop(sig=signal.SIGKILL)
    records = list(read_decisions(proxy.decision_log, strict=True))  # no torn line
    ids = {record.get("client_call_id") or record["request_id"] for record in records}
    assert set(acknowledged) <= ids
    assert all(record.get("final_tier") for record in records if record.get("client_call_id") in acknowledged)
