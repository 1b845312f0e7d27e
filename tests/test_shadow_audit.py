"""Issue 13 item 4a: the shadow audit (litellm_routenlp/shadow_audit.py).

With the real ``litellm.Router`` (LiteLLM's ``mock_response`` deployments, tests/test_reliability.py):
an answer below the top tier is re-asked at the top tier after the request is recorded; the task's
metric against that answer is a durable verdict joined to the decision; the audit call is tagged
``routenlp-audit`` only (never escalated), carries none of the client's key metadata, and is not
counted as a request.  The sampling rate and the hourly budget hold.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from litellm_routenlp.shadow_audit import AuditBudget, audit_score  # noqa: E402


def test_budget_samples_the_fraction_and_caps_each_rolling_hour():
    clock = [0.0]
    budget = AuditBudget(0.5, 10_000, clock=lambda: clock[0], rng=random.Random(1))
    taken = sum(budget.take() for _ in range(4000))
    assert 1800 < taken < 2200  # 50% of 4000, well inside 5 sigma
    capped = AuditBudget(1.0, 3, clock=lambda: clock[0], rng=random.Random(1))
    assert [capped.take() for _ in range(5)] == [True, True, True, False, False]
    clock[0] = 3599.0
    assert not capped.take()
    clock[0] = 3600.0  # the first three are an hour old: room again
    assert capped.take() and capped.skipped_for_budget == 3
    assert not AuditBudget(0.0, 10, rng=random.Random(1)).take()


@pytest.mark.parametrize("task, answer, reference, acceptable, metric", [
    ("banking77", "card_arrival", " Card_Arrival\n", True, "accuracy"),
    ("banking77", "card_arrival", "lost_or_stolen_card", False, "accuracy"),
    ("ectsum", "revenue rose ten percent in the quarter", "revenue rose ten percent in the quarter", True, "rouge_l"),
    ("ectsum", "the weather was nice", "revenue rose ten percent in the quarter", False, "rouge_l"),
    ("bitext", "please reset your password", "please reset your password", True, "rouge_l (for bertscore_f1)"),
])
def test_the_tasks_metric_against_the_top_tiers_answer(task, answer, reference, acceptable, metric):
    from routenlp_core.tasks import get_task

    ok, score, name = audit_score(task, answer, reference, get_task(task).tau)
    assert (ok, name) == (acceptable, metric) and 0.0 <= score <= 1.0


SERIES = {"requests_t4": ("routenlp_requests_total", {"task": "banking77", "tier": "T4"}),
          "acceptable": ("routenlp_audit_verdicts_total",
                         {"task": "banking77", "verdict": "acceptable", "source": "audit"}),
          "unacceptable": ("routenlp_audit_verdicts_total",
                           {"task": "banking77", "verdict": "unacceptable", "source": "audit"})}


def _samples():
    from litellm_routenlp import prometheus_metrics as pm

    return {key: pm.sample(name, labels) for key, (name, labels) in SERIES.items()}


def _audited_run(tmp_path, top_content):
    import litellm
    from test_reliability import _callback, _mock_deployments, _RecordingRouter

    def mutate(document):
        document["routenlp_settings"]["shadow_audit"] = {"fraction": 1.0, "max_per_hour": 100}
        document["routenlp_settings"]["verdicts_path"] = str(tmp_path / "verdicts.jsonl")

    callback, _ = _callback(tmp_path, mutate)
    deployments = _mock_deployments(uncertain_tiers=())  # every tier confident: no escalation
    deployments[3]["litellm_params"]["mock_response"]["choices"][0]["message"]["content"] = top_content
    router = _RecordingRouter(litellm.Router(model_list=deployments, num_retries=0))
    callback._llm_router = router
    saved = list(litellm.callbacks)
    litellm.callbacks = [callback]
    before = _samples()
    try:
        async def run():
            data = {"model": "routenlp", "messages": [{"role": "user", "content": "Where is my new card?"}],
                    "metadata": {"task": "banking77", "tags": ["team-a"], "user_api_key_alias": "client-key"}}
            data = await callback.async_pre_call_hook(None, None, data, "completion")
            first = await router.acompletion(model="routenlp", messages=data["messages"], metadata=data["metadata"],
                                             logprobs=True)
            final = await callback.async_post_call_success_hook(data, None, first)
            headers = await callback.async_post_call_response_headers_hook(data, None, final or first)
            assert len(router.calls) == 1, "the audit ran before the answer was returned"
            await asyncio.gather(*list(callback.audit.tasks))
            return headers

        headers = asyncio.run(run())
    finally:
        litellm.callbacks = saved
    return callback, router, headers, before, _samples()


@pytest.mark.parametrize("top_content, acceptable", [("card_arrival", True), ("lost_or_stolen_card", False)])
def test_an_answer_below_the_top_tier_is_audited_in_the_background(tmp_path, top_content, acceptable):
    callback, router, headers, before, after = _audited_run(tmp_path, top_content)
    assert headers["x-routenlp-tier"] != "T4" and "," not in headers["x-routenlp-path"], headers
    assert len(router.calls) == 2  # the client's call, then the audit
    audit = router.calls[1]["metadata"]
    # the audit call: top tier, its own tag only, none of the client's key metadata or escalation link
    assert audit["model_info"]["routenlp_tier"] == 4
    assert audit["tags"] == ["routenlp-audit", "routenlp-tier:T4", "routenlp-task:banking77"], audit["tags"]
    assert "user_api_key_alias" not in audit and "team-a" not in audit["tags"]
    assert audit["spend_logs_metadata"] == {"routenlp_audit_of": headers["x-routenlp-request-id"]}
    # the verdict: durable, joined to the decision by request id, counted once
    lines = [json.loads(line) for line in (tmp_path / "verdicts.jsonl").read_text().splitlines()]
    assert len(lines) == 1
    verdict = lines[0]
    assert verdict["request_id"] == headers["x-routenlp-request-id"] and verdict["source"] == "audit"
    assert verdict["acceptable"] is acceptable and verdict["metric"] == "accuracy"
    assert verdict["task"] == "banking77" and verdict["final_tier"] == headers["x-routenlp-tier"]
    assert verdict["reference_tier"] == "T4"
    label = "acceptable" if acceptable else "unacceptable"
    other = "unacceptable" if acceptable else "acceptable"
    assert after[label] == before[label] + 1 and after[other] == before[other]
    # the audit is not a request: the top tier's request counter did not move
    assert after["requests_t4"] == before["requests_t4"]
    # and `routenlp report` reads it as audited quality of the task
    from coopt.ops_report import build_report, load_requests, read_verdicts

    records, scan = load_requests([str(tmp_path / "decisions.jsonl")], since=None, until=None,
                                  spend_logs_json=[], config=None, progress=False)
    report = build_report(records, scan, since=None, until=None,
                          verdicts=read_verdicts(tmp_path / "verdicts.jsonl", scan.warnings))
    cell = report["audited"]["tasks"]["banking77"]
    assert (cell["n"], cell["acceptable"]) == (1, int(acceptable)) and report["audited"]["unmatched"] == 0


def test_top_tier_answers_are_not_audited(tmp_path):
    import litellm
    from test_reliability import _callback, _mock_deployments, _RecordingRouter

    callback, _ = _callback(tmp_path, lambda d: d["routenlp_settings"].update(
        shadow_audit={"fraction": 1.0, "max_per_hour": 100}, verdicts_path=str(tmp_path / "v.jsonl")))
    router = _RecordingRouter(litellm.Router(model_list=_mock_deployments(uncertain_tiers=(1, 2, 3)), num_retries=0))
    callback._llm_router = router
    saved = list(litellm.callbacks)
    litellm.callbacks = [callback]

    async def run():
        data = {"model": "routenlp", "messages": [{"role": "user", "content": "Where is my new card?"}],
                "metadata": {"task": "banking77"}}
        data = await callback.async_pre_call_hook(None, None, data, "completion")
        first = await router.acompletion(model="routenlp", messages=data["messages"], metadata=data["metadata"],
                                         logprobs=True)
        final = await callback.async_post_call_success_hook(data, None, first)
        headers = await callback.async_post_call_response_headers_hook(data, None, final or first)
        pending = list(callback.audit.tasks)
        await asyncio.gather(*pending)
        return headers, pending

    try:
        headers, pending = asyncio.run(run())
    finally:
        litellm.callbacks = saved
    assert headers["x-routenlp-tier"] == "T4", headers  # escalated to the top: nothing to audit
    assert not pending and len(router.calls) == len(headers["x-routenlp-path"].split(","))
    assert not (tmp_path / "v.jsonl").read_text().strip()


@pytest.mark.parametrize("raw, fragment", [
    ({"fraction": 1.5}, "routenlp_settings.shadow_audit.fraction"),
    ({"max_per_hour": -1}, "routenlp_settings.shadow_audit.max_per_hour"),
    ({"rate": 0.1}, "routenlp_settings.shadow_audit.rate"),
])
def test_bad_audit_settings_are_refused_naming_the_field(raw, fragment):
    from litellm_routenlp.config import SettingsError, settings_from_mapping

    with pytest.raises(SettingsError) as caught:
        settings_from_mapping({"router_artifact": "r", "tasks": {"b": {"kind": "structured", "tau": 0.9}},
                               "shadow_audit": raw}, "cfg.yaml", Path("."))
    assert fragment in str(caught.value)
