"""Issue 13 item 1: LiteLLM's own spend rows split by tier, task and escalation, through request tags.

Everything on the path is real: the plugin (``RouteNLPCallback.from_config`` on the shipped router
artifact and thresholds), a real ``litellm.Router`` whose deployments answer with LiteLLM's
``mock_response`` (with logprobs, so the cascade measures real uncertainties), the plugin's own hooks
in the order the proxy calls them, LiteLLM's success logging, and LiteLLM's own spend-row builder
``get_logging_payload`` (the function the proxy's database writer calls).  The rows are inserted into a
throwaway PostgreSQL server whose schema is every migration of ``litellm-proxy-extras``, and read back
with the query LiteLLM's ``/spend/tags`` endpoint runs (taken from LiteLLM's source, not retyped).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from pathlib import Path

import pytest

from litellm_routenlp.decision_log import read_decisions
from litellm_routenlp.spend_tags import routing_tags, task_label, with_routing_tags

from conftest import mock_deployments

# the PostgreSQL server and LiteLLM's schema, shared with the SpendLogs reader test
from test_coopt_logs import _apply_litellm_migrations, _insert_rows, postgres_dsn  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
QUERY = "I am still waiting on my card?"
CLIENT_TAGS = ["team-a-batch", "routenlp-tier:T4", " ROUTENLP-escalated", "routenlp-degraded"]  # 3 spoofs


def test_routing_tags_replace_any_plugin_tag_and_keep_the_clients_own() -> None:
    ours = routing_tags("T2", "bitext", escalated=True)
    assert ours == ["routenlp-tier:T2", "routenlp-task:bitext", "routenlp-escalated"]
    existing = ["keep", "Routenlp-tier:T4", "also-keep"]
    merged = with_routing_tags(existing, ours)
    assert merged == ["keep", "also-keep", *ours] and existing == ["keep", "Routenlp-tier:T4", "also-keep"]
    assert with_routing_tags(None, ours) == ours and with_routing_tags("not-a-list", ours) == ours
    # re-tagging (a retry on another tier) leaves one set of plugin tags, the new one
    assert with_routing_tags(merged, routing_tags("T3", "bitext")) == ["keep", "also-keep", "routenlp-tier:T3",
                                                                       "routenlp-task:bitext"]
    assert task_label("bitext", "known", {"bitext": 1}) == "bitext"
    assert task_label("made-up", "unknown", {"bitext": 1}) == "unknown"
    assert task_label("bitext", "known", {}) == "unknown"


def _callback(tmp_path: Path):
    from litellm_routenlp.plugin import RouteNLPCallback

    from conftest import write_proxy_config

    # no sampled extra call here (tests/test_shadow_audit.py)
    return RouteNLPCallback.from_config(write_proxy_config(tmp_path, shadow_audit={"fraction": 0.0}))


async def one_request(callback, router, call_id: str, task: str = "banking77", tags=tuple(CLIENT_TAGS)) -> dict:
    """A client request through the plugin's hooks in the proxy's order; the client's tags include spoofs."""
    from litellm.proxy._types import UserAPIKeyAuth

    key = UserAPIKeyAuth(api_key="sk-hashed", key_alias="team-a", models=["routenlp"])
    callback._llm_router = router
    data = {"model": "routenlp", "litellm_call_id": call_id, "messages": [{"role": "user", "content": QUERY}],
            "metadata": {"task": task, "tags": list(tags), "user_api_key_alias": "team-a"}}
    data = await callback.async_pre_call_hook(key, None, data, "completion")
    first = await router.acompletion(model=data["model"], messages=data["messages"], metadata=data["metadata"],
                                     litellm_call_id=call_id, logprobs=True)
    final = await callback.async_post_call_success_hook(data, key, first)
    return await callback.async_post_call_response_headers_hook(data, key, final or first)


@pytest.fixture(scope="module")
def traffic(tmp_path_factory):
    """(rows built by LiteLLM's get_logging_payload, response headers, decision records) of three requests:
    plain (answered at its first tier), escalated (T1 -> T3 -> T4), degraded (its wanted tier is down)."""
    import litellm
    from litellm.integrations.custom_logger import CustomLogger
    from litellm.proxy.spend_tracking.spend_tracking_utils import get_logging_payload

    tmp_path = tmp_path_factory.mktemp("spend_tags")
    callback = _callback(tmp_path)
    captured: list[tuple] = []

    class Capture(CustomLogger):
        async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
            captured.append((kwargs, response_obj, start_time, end_time))

    saved = list(litellm.callbacks)
    litellm.callbacks = [callback, Capture()]
    headers = {}
    try:
        async def run() -> int:
            headers["plain"] = await one_request(
                callback, litellm.Router(model_list=mock_deployments(), num_retries=0), "call-plain")
            wanted = int(headers["plain"]["x-routenlp-path"][1:])   # all tiers healthy: served = wanted
            headers["escalated"] = await one_request(
                callback, litellm.Router(model_list=mock_deployments(uncertain_tiers=(1, 2, 3)), num_retries=0),
                "call-escalated")
            headers["degraded"] = await one_request(
                callback, litellm.Router(model_list=mock_deployments(without=(wanted,)), num_retries=0),
                "call-degraded")
            expected = sum(len(h["x-routenlp-path"].split(",")) for h in headers.values())
            for _ in range(100):  # success callbacks run as tasks
                if len(captured) >= expected:
                    break
                await asyncio.sleep(0.05)
            return wanted

        wanted = asyncio.run(run())
    finally:
        litellm.callbacks = saved
    rows = [dict(get_logging_payload(kwargs=k, response_obj=r, start_time=s, end_time=e)) for k, r, s, e in captured]
    records = {r["client_call_id"]: r for r in read_decisions(tmp_path / "decisions.jsonl")}
    return rows, headers, records, wanted


def _tags(row: dict) -> list[str]:
    value = row["request_tags"]
    return value if isinstance(value, list) else json.loads(value or "[]")


def _check_rows(rows: list[dict], headers: dict, records: dict, wanted: int) -> None:
    """Every spend row carries the client's own tag and exactly the plugin's tags for its call."""
    tier_of_model = {f"mock-t{t}": f"T{t}" for t in range(1, 5)}
    call_of = {record["request_id"]: call_id for call_id, record in records.items()}
    by_parent: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: r["startTime"]):  # a request's calls in the order they were made
        metadata = row["metadata"] if isinstance(row["metadata"], dict) else json.loads(row["metadata"])
        links = metadata.get("spend_logs_metadata") or {}   # the plugin's own ids (issue 11)
        parent = links.get("routenlp_parent_request_id") or links.get("routenlp_request_id")
        by_parent.setdefault(call_of[parent], []).append(row)
    assert set(by_parent) == {"call-plain", "call-escalated", "call-degraded"}, by_parent.keys()
    for call_id, name in (("call-plain", "plain"), ("call-escalated", "escalated"), ("call-degraded", "degraded")):
        path = headers[name]["x-routenlp-path"].split(",")
        group = by_parent[call_id]
        assert [tier_of_model[row["model_id"]] for row in group] == path, (name, path)
        for index, row in enumerate(group):
            tags = _tags(row)
            assert tags[0] == "team-a-batch", tags          # the client's own tag survives ...
            plugin_tags = [t for t in tags if t.strip().lower().startswith("routenlp-")]
            degraded = name == "degraded" and index == 0      # ... its spoofs do not; ours are exact
            assert plugin_tags == routing_tags(path[index], "banking77", escalated=index > 0, degraded=degraded), \
                (name, index, tags)
    assert len(headers["plain"]["x-routenlp-path"].split(",")) == 1
    escalated = headers["escalated"]["x-routenlp-path"].split(",")
    assert len(escalated) >= 2 and escalated[-1] == "T4", escalated
    degraded = records["call-degraded"]["router"]
    assert degraded["wanted_tier"] == f"T{wanted}" != degraded["routed_tier"], degraded
    assert "x-routenlp-degraded" in headers["degraded"]


def test_plain_escalated_and_degraded_calls_carry_their_tags_in_litellms_spend_rows(traffic) -> None:
    rows, headers, records, wanted = traffic
    _check_rows(rows, headers, records, wanted)
    print("\n" + "\n".join(f"{name}: path {h['x-routenlp-path']}" for name, h in headers.items()))
    for row in sorted(rows, key=lambda r: r["startTime"]):
        print(f"  {row['model_id']}: request_tags={row['request_tags']} spend={row['spend']:.6f}")


def _litellm_spend_by_tag_sql() -> str:
    """The SQL LiteLLM's ``/spend/tags`` runs (spend_management_endpoints.get_spend_by_tags), from its source."""
    from litellm.proxy.spend_tracking import spend_management_endpoints

    source = inspect.getsource(spend_management_endpoints.get_spend_by_tags)
    return re.search(r'"""(.*?)"""', source, re.S).group(1)


def test_tags_in_the_spend_logs_table_and_litellms_spend_by_tag_view(traffic, postgres_dsn) -> None:  # noqa: F811
    import psycopg

    rows, headers, records, wanted = traffic
    assert _apply_litellm_migrations(postgres_dsn) > 100
    _insert_rows(postgres_dsn, rows)
    with psycopg.connect(postgres_dsn, autocommit=True) as connection:
        stored = connection.execute('SELECT request_id, model_id, request_tags, metadata, spend, "startTime" '
                                    'FROM "LiteLLM_SpendLogs"').fetchall()
        by_tag = {tag: (count, float(spend)) for tag, count, spend in
                  connection.execute(_litellm_spend_by_tag_sql()).fetchall()}
    table_rows = [{"request_id": r[0], "model_id": r[1], "request_tags": r[2], "metadata": r[3], "startTime": r[5]}
                  for r in stored]
    assert len(table_rows) == len(rows)
    _check_rows(table_rows, headers, records, wanted)   # the jsonb column holds the same tags
    spend_of = {r[0]: float(r[4]) for r in stored}
    assert by_tag["team-a-batch"][0] == len(rows)
    escalation_rows = [r for r in table_rows if "routenlp-escalated" in _tags(r)]
    hops = sum(len(h["x-routenlp-path"].split(",")) - 1 for h in headers.values())
    assert hops >= 2 and len(escalation_rows) == hops
    assert by_tag["routenlp-escalated"] == (hops, pytest.approx(sum(spend_of[r["request_id"]] for r in escalation_rows)))
    assert by_tag["routenlp-task:banking77"][0] == len(rows)
    assert by_tag["routenlp-degraded"][0] == 1
    spend_by_tier: dict[str, float] = {}
    for r in table_rows:
        tier = "T" + r["model_id"][-1]                  # mock-tK
        spend_by_tier[tier] = spend_by_tier.get(tier, 0.0) + spend_of[r["request_id"]]
    for tier, spend in spend_by_tier.items():           # spend per tier, LiteLLM's view = the rows' spend
        assert by_tag[f"routenlp-tier:{tier}"][1] == pytest.approx(spend) and spend > 0
    assert {t for t in by_tag if t.startswith("routenlp-tier:")} == {f"routenlp-tier:{t}" for t in spend_by_tier}
    for spoof in ("routenlp-tier:T4 ", " ROUTENLP-escalated"):
        assert spoof not in by_tag


def test_our_tags_do_not_take_part_in_litellms_tag_routing(tmp_path, monkeypatch) -> None:
    """With ``enable_tag_filtering`` LiteLLM routes on ``metadata.tags`` after the callbacks' filters; tags
    written there would make untagged deployments refuse the request.  Ours come after routing."""
    import litellm
    from litellm.integrations.custom_logger import CustomLogger

    callback = _callback(tmp_path)
    captured: list[list[str]] = []

    class TagRoutingCapture(CustomLogger):  # a fresh class: the first test's logger stays registered in LiteLLM
        async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
            captured.append(kwargs["standard_logging_object"]["request_tags"])

    monkeypatch.setattr(litellm, "callbacks", [callback, TagRoutingCapture()])

    async def run():
        router = litellm.Router(model_list=mock_deployments(), num_retries=0, enable_tag_filtering=True)
        # only spoofed tags (dropped at the door): a client tag no deployment has would be refused by
        # LiteLLM's tag routing whatever we do
        headers = await one_request(callback, router, "call-tag-routing", tags=["routenlp-tier:T4"])
        for _ in range(100):
            if captured:
                break
            await asyncio.sleep(0.05)
        return headers

    headers = asyncio.run(run())
    tier = headers["x-routenlp-path"].split(",")[0]
    assert captured and captured[0] == routing_tags(tier, "banking77"), captured
