"""Issue 11 against the real proxy: nothing a client sends can steer, forge, stall or misprice.

ONE real ``litellm --config`` proxy for the module: the shipped config with a private decision log,
a thresholds file where every T1 answer to a clinc150 query escalates (so plugin-made escalation
links exist) and bitext never escalates (so a stream and a non-stream of the same query take the
same path), ``bitext`` served with ``cascade_streaming: off`` (the passthrough stream), and a second
callback, ``spend_probe``, that turns every call LiteLLM logs into the row its database writer would
store (``get_logging_payload``, the function the proxy's SpendLogs writer calls) -- the proxy has
no database here, so this is how the test sees the spend rows.

Each test names the defect class of the issue it covers (1-8, and the ``n`` message).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from litellm_routenlp.decision_log import read_decisions
from conftest import running_proxy

pytestmark = pytest.mark.proxy

ROOT = Path(__file__).resolve().parent.parent

SPEND_PROBE = '''
"""Test-only LiteLLM callback: every logged call as the SpendLogs row LiteLLM would write."""
import json, os
from litellm.integrations.custom_logger import CustomLogger


class SpendProbe(CustomLogger):
    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        from litellm.proxy.spend_tracking.spend_tracking_utils import get_logging_payload
        row = dict(get_logging_payload(kwargs=kwargs, response_obj=response_obj, start_time=start_time,
                                       end_time=end_time))
        with open(os.environ["SPEND_PROBE_PATH"], "a") as handle:
            handle.write(json.dumps(row, default=str) + "\\n")


probe = SpendProbe()
'''


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    from conftest import write_proxy_config

    work = tmp_path_factory.mktemp("client_input")
    thresholds = json.loads((ROOT / "artifacts/thresholds.json").read_text())
    thresholds["thresholds"]["T1"]["clinc150"] = {"delta": 0.0, "n": 0, "note": "test: always escalate"}
    for tier in ("T2", "T3"):
        thresholds["thresholds"].setdefault(tier, {})["bitext"] = {"delta": 1.0, "n": 0, "note": "test: never"}
    (work / "thresholds.json").write_text(json.dumps(thresholds))
    (work / "spend_probe.py").write_text(SPEND_PROBE)

    def mutate(document):
        document["litellm_settings"]["callbacks"] = ["litellm_routenlp.proxy_hook.routenlp", "spend_probe.probe"]
        document["routenlp_settings"]["tasks"]["bitext"]["cascade_streaming"] = "off"

    config = write_proxy_config(work, mutate, thresholds_path=work / "thresholds.json")
    with running_proxy(config, work, env={"SPEND_PROBE_PATH": str(work / "spend_rows.jsonl")}) as process:
        process.spend_rows = work / "spend_rows.jsonl"
        yield process


@pytest.fixture(scope="module")
def http(proxy):
    import httpx

    with httpx.Client(base_url=proxy.base_url, timeout=300,
                      headers={"Authorization": f"Bearer {proxy.master_key}"}) as client:
        yield client


def post(http, payload, headers=None):
    """(status, parsed JSON or None, raw text, lower-cased headers); streams are read to the end."""
    with http.stream("POST", "/v1/chat/completions", json=payload, headers=headers or {}) as reply:
        text = reply.read().decode("utf-8", errors="replace")
        status, out_headers = reply.status_code, {k.lower(): v for k, v in reply.headers.items()}
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    return status, parsed, text, out_headers


def body(text, task, **extra):
    payload = {"model": "routenlp", "messages": [{"role": "user", "content": text}], "max_tokens": 8}
    if task is not None:
        payload["metadata"] = {"task": task}
    payload.update(extra)
    return payload


def records(proxy) -> list[dict]:
    return list(read_decisions(proxy.decision_log, strict=True))


def record_for(proxy, headers) -> dict:
    """The decision record of a response: by the plugin's id header, else by LiteLLM's call id."""
    wanted = headers.get("x-routenlp-request-id")
    found = [r for r in records(proxy) if (wanted and r.get("request_id") == wanted)
             or (not wanted and r.get("request_id") == headers.get("x-litellm-call-id"))]
    assert len(found) == 1, (wanted, headers.get("x-litellm-call-id"), len(found))
    return found[0]


def stream_chunks(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith("data:") and line[5:].strip() not in ("", "[DONE]"):
            out.append(json.loads(line[5:]))
    return out


@pytest.fixture(scope="module")
def easy_banking77(http):
    """A held-out banking77 query the router sends to T1 and T1 keeps (path ``T1``)."""
    from routenlp_core.tasks import get_task

    for example in get_task("banking77").load("test", limit=40, seed=5):
        status, _, _, headers = post(http, body(example.text, "banking77"))
        if status == 200 and headers.get("x-routenlp-path") == "T1":
            return example.text, headers
    pytest.fail("no banking77 test query served by T1 alone")


# ------------------------------------------------------------------------------------------ 1. tier pins
@pytest.mark.parametrize("holder", ["metadata", "litellm_metadata", "requester_metadata"])
@pytest.mark.parametrize("pin", [4, 2, "4", {"tier": 4}])
def test_1_a_client_tier_pin_does_not_choose_the_tier(http, proxy, easy_banking77, holder, pin):
    """T4 pinned on an easy query, or T2 which routenlp_tasks restricts to bitext: the router decides."""
    text, baseline = easy_banking77
    payload = body(text, "banking77")
    if holder == "requester_metadata":
        payload["metadata"]["requester_metadata"] = {"routenlp_escalation_tier": pin}
    else:
        payload.setdefault(holder, {})["routenlp_escalation_tier"] = pin
        payload["metadata"]["routenlp_escalation"] = {"tier": pin}
        payload["metadata"]["routenlp"] = {"decision": {"task": "banking77", "task_status": "known",
                                                        "probabilities": [0, 0, 0, 1], "tier": 4}}
    status, _, text_out, headers = post(http, payload)
    assert status == 200, text_out[:300]
    assert headers["x-routenlp-path"] == baseline["x-routenlp-path"] == "T1", headers
    assert float(headers["x-routenlp-total-cost"]) == pytest.approx(float(baseline["x-routenlp-total-cost"]))
    record = record_for(proxy, headers)
    assert record["router"]["routed_tier"] == "T1" and record["router"]["reason"], record["router"]


# ------------------------------------------------------------------------------------------ 2. identity
def test_2_a_forged_call_id_is_kept_apart_from_the_record_identity(http, proxy, easy_banking77):
    from coopt.logs import merge_sources, read_decision_log

    forged = f"forged-{time.time_ns()}"
    answers = [post(http, body(easy_banking77[0], "banking77"), headers={"x-litellm-call-id": forged})
               for _ in range(2)]
    assert all(status == 200 for status, *_ in answers)
    mine = [r for r in records(proxy) if r.get("client_call_id") == forged]
    assert len(mine) == 2, "both requests must be recorded, under the client's id as client_call_id"
    ids = {r["request_id"] for r in mine}
    assert len(ids) == 2 and forged not in ids, ids
    assert {headers["x-routenlp-request-id"] for *_, headers in answers} == ids
    merged = merge_sources(read_decision_log(proxy.decision_log))
    assert ids <= {r.request_id for r in merged}, "coopt must not merge the two requests into one"


# ------------------------------------------------------------------------------------------ 3. links
def spend_rows(proxy) -> list[dict]:
    if not proxy.spend_rows.exists():
        return []
    return [json.loads(line) for line in proxy.spend_rows.read_text().splitlines() if line.strip()]


def test_3_client_sent_links_and_tags_are_stripped_and_the_reader_trusts_only_plugin_links(http, proxy):
    from coopt.logs import join_spend_logs, read_decision_log, tier_names_by_model_id
    from routenlp_core.tasks import get_task

    query = get_task("clinc150").load("test", limit=1, seed=2)[0].text
    status, _, text, victim_headers = post(http, body(query, "clinc150"))  # T1 escalates (delta 0)
    assert status == 200 and "," in victim_headers["x-routenlp-path"], victim_headers
    victim = record_for(proxy, victim_headers)
    forged_links = {"routenlp_parent_call_id": victim_headers["x-litellm-call-id"],
                    "routenlp_parent_request_id": victim["request_id"], "routenlp_tier": "T4",
                    "routenlp_previous_uncertainty": 0.9}
    payload = body(query, "clinc150")
    payload["metadata"]["spend_logs_metadata"] = dict(forged_links)
    payload["metadata"]["tags"] = ["routenlp-escalation", "keep-me"]
    payload["tags"] = ["routenlp-T4"]
    status, _, text, attacker_headers = post(http, payload)
    assert status == 200, text[:300]
    attacker = record_for(proxy, attacker_headers)

    attacker_call = attacker_headers["x-litellm-call-id"]
    deadline = time.time() + 15
    while True:  # success callbacks run as tasks after the answer
        rows = spend_rows(proxy)
        own = [r for r in rows if r.get("litellm_call_id") == attacker_call]
        if own or time.time() > deadline:
            break
        time.sleep(0.2)
    assert own, "the attacker's own call has a spend row"
    for row in own:
        metadata = row["metadata"] if isinstance(row["metadata"], dict) else json.loads(row["metadata"])
        extra = metadata.get("spend_logs_metadata") or {}
        assert not {k: v for k, v in extra.items() if k in forged_links and v == forged_links[k]}, extra
        tags = row.get("request_tags") if isinstance(row.get("request_tags"), list) else \
            json.loads(row.get("request_tags") or "[]")
        # the client's routenlp-* tags are gone; the only ones left are the plugin's, for the tier it served
        served = attacker_headers["x-routenlp-path"].split(",")[0]
        assert [t for t in tags if str(t).lower().startswith("routenlp-")] == \
            [f"routenlp-tier:{served}", "routenlp-task:clinc150"], tags
        assert "keep-me" in tags, tags

    # Rows as the reader receives them, with the forged link put back (a log from an unpatched proxy):
    forged_row = dict(own[0])
    metadata = dict(forged_row["metadata"] if isinstance(forged_row["metadata"], dict)
                    else json.loads(forged_row["metadata"]))
    metadata["spend_logs_metadata"] = {**(metadata.get("spend_logs_metadata") or {}), **forged_links}
    forged_row["metadata"] = metadata
    joined = join_spend_logs([r for r in rows if r is not own[0]] + [forged_row],
                             tier_names_by_model_id(ROOT / "proxy_config.yaml"),
                             decisions=read_decision_log(proxy.decision_log))
    by_id = {r.request_id: r for r in joined}
    victim_joined = by_id[victim["request_id"]]
    assert victim_joined.path == victim_headers["x-routenlp-path"].split(","), victim_joined
    assert attacker_call not in {c.call_id for c in victim_joined.calls}
    assert by_id[attacker["request_id"]].path[0] == attacker_headers["x-routenlp-path"].split(",")[0]


# ------------------------------------------------------------------------------------------ 4. task names
UNSAFE_TASKS = ["банк", "بنك", "🙂", "\u202ebanking77", "bank\u200bing77", "banking77\u200b",
                "bank\r\ning77", "banking77\r\nX-Evil: 1", "bank\x00ing77", "\x07", "ba\tnking77", "\u0100"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("task", UNSAFE_TASKS, ids=lambda t: t.encode("unicode_escape").decode()[:20])
def test_4_a_task_name_a_header_cannot_carry_gets_the_unknown_task_treatment(http, proxy, task, stream):
    before = len(records(proxy))
    payload = body("where is my card", task, max_tokens=4, stream=stream)
    status, parsed, text, headers = post(http, payload)
    assert status == 200, text[:300]
    assert headers["x-routenlp-task"] == "-", headers
    if stream:
        assert "[DONE]" in text
    else:
        assert isinstance(parsed["choices"][0]["message"]["content"], str)
    mine = records(proxy)[before:]
    record = record_for(proxy, headers)
    assert record in mine and record["task_status"] == "unknown" and record["task"] == task


# ------------------------------------------------------------------------------------------ 5. huge prompts
def test_5_with_a_5mb_request_in_flight_the_event_loop_stays_responsive(http, proxy, easy_banking77):
    import httpx

    text = easy_banking77[0] + " " + ("my card payment was declined at the shop again " * 110_000)[:5_000_000]
    assert len(text.encode()) >= 5_000_000
    outcome: dict = {}

    def big() -> None:
        started = time.perf_counter()
        outcome["reply"] = post(http, body(text, "banking77", max_tokens=4))
        outcome["seconds"] = time.perf_counter() - started

    worker = threading.Thread(target=big)
    polls: list[float] = []
    with httpx.Client(base_url=proxy.base_url, timeout=10) as probe:
        probe.get("/health/liveliness")
        worker.start()
        while worker.is_alive():
            started = time.perf_counter()
            assert probe.get("/health/liveliness").status_code == 200
            polls.append((time.perf_counter() - started) * 1000.0)
            time.sleep(0.02)
    worker.join()
    status, _, reply_text, headers = outcome["reply"]
    assert status == 200, reply_text[:300]
    assert len(polls) >= 3, (polls, outcome["seconds"])
    # The defect held the event loop for seconds (4.8 s per poll). On a 2-core machine shared with the
    # upload itself (and with CI's other work), single polls are scheduled late by tens of ms (CI saw a
    # 122 ms p95): the bar is the median poll under 100 ms and no poll near a second, which the defect
    # fails by a wide margin and scheduling noise does not reach.
    ordered = sorted(polls)
    median = ordered[len(ordered) // 2]
    assert median < 100 and ordered[-1] < 1000, (
        f"liveliness median {median:.0f} ms, max {ordered[-1]:.0f} ms "
        f"({len(polls)} polls, request {outcome['seconds']:.1f} s)")
    record = record_for(proxy, headers)
    line = json.dumps(record)
    assert len(line) < 64_000, len(line)
    assert record["prompt"].endswith("chars cut]"), record["prompt"][-80:]


# ------------------------------------------------------------------------------------------ 6. padding
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("task", ["  banking77  ", "\tbanking77\n", "banking77 "])
def test_6_a_padded_task_name_is_the_configured_task(http, proxy, easy_banking77, task, stream):
    status, _, text, headers = post(http, body(easy_banking77[0], task, stream=stream))
    assert status == 200, text[:300]
    assert headers["x-routenlp-task"] == "banking77" and headers["x-routenlp-path"] == "T1", headers
    assert record_for(proxy, headers)["task"] == "banking77"


# ------------------------------------------------------------------------------------------ 7. stream cost
@pytest.mark.parametrize("usage", [False, True], ids=["no-usage", "include-usage"])
@pytest.mark.parametrize("task", ["banking77", "bitext"])  # buffered cascade / passthrough (off)
def test_7_a_stream_costs_what_the_same_request_costs_without_streaming(http, proxy, task, usage):
    from routenlp_core.tasks import get_task

    query = get_task(task).load("test", limit=1, seed=8)[0].text
    status, _, text, plain = post(http, body(query, task, max_tokens=6))
    assert status == 200, text[:300]
    extra = {"stream": True}
    if usage:
        extra["stream_options"] = {"include_usage": True}
    status, _, text, streamed = post(http, body(query, task, max_tokens=6, **extra))
    assert status == 200, text[:300]
    assert streamed["x-routenlp-path"] == plain["x-routenlp-path"], (plain, streamed)
    expected = float(plain["x-routenlp-total-cost"])
    assert expected > 0
    stream_record = record_for(proxy, streamed)
    assert stream_record["stream"] is True
    assert stream_record["total_cost_usd"] == pytest.approx(expected, rel=0.01), (stream_record, plain)
    if "x-routenlp-total-cost" in streamed:  # a buffered stream knows its cost before the first byte
        assert float(streamed["x-routenlp-total-cost"]) == pytest.approx(expected, rel=0.01)
    else:
        assert streamed.get("x-routenlp-cascade") == "off (streaming)", streamed


# ------------------------------------------------------------------------------------------ 8. logprobs
@pytest.mark.parametrize("asked", [False, True], ids=["not-asked", "asked"])
@pytest.mark.parametrize("task", ["bitext", "no-such-task"])  # cascade_streaming off / unknown task
def test_8_passthrough_streams_carry_logprobs_only_when_asked(http, proxy, task, asked):
    from routenlp_core.tasks import get_task

    query = get_task("bitext").load("test", limit=1, seed=3)[0].text
    extra = {"stream": True, **({"logprobs": True} if asked else {})}
    status, _, text, headers = post(http, body(query, task, max_tokens=4, **extra))
    assert status == 200, text[:300]
    chunks = stream_chunks(text)
    with_logprobs = [c for c in chunks if any(choice.get("logprobs") for choice in c.get("choices") or [])]
    if asked:
        assert with_logprobs, "the client asked for logprobs and must get them"
    else:
        assert not with_logprobs, with_logprobs[:1]


# ------------------------------------------------------------------------------------------ n
@pytest.mark.parametrize("n, says", [(0, "at least 1"), ("2", "integer"), (2.0, "integer"), (True, "integer"),
                                     (-3, "at least 1"), (3, "n > 1")])
def test_n_errors_say_what_was_wrong(http, n, says):
    status, parsed, text, _ = post(http, body("where is my card", "banking77", n=n))
    assert status == 400, text[:300]
    message = parsed["error"]["message"]
    assert says in message and repr(n) in message, message


# ------------------------------------------------------------------------------------------ no proxy
@pytest.mark.parametrize("value", UNSAFE_TASKS + ["T3: APIError: quoted prompt \u202e\U0001f642\r\n"])
def test_header_values_are_printable_latin1_whatever_goes_in(value):
    from litellm_routenlp.plugin import header_value

    out = header_value(value)
    out.encode("latin-1")  # Starlette's encoding: must not raise
    assert not any(ch in out for ch in "\r\n\x00") and all(" " <= ch <= "~" or "\xa0" <= ch <= "\xff" for ch in out)


def test_a_request_that_failed_after_its_answer_was_recorded_is_not_read_as_served(tmp_path):
    """The plugin's failure hook retracts a success record when the request then failed on its way out."""
    from coopt.logs import read_decision_log
    from litellm_routenlp.decision_log import DecisionLog

    attempt = {"tier": 1, "tier_name": "T1", "model_id": "routenlp-t1", "uncertainty": 0.1, "threshold": 0.5,
               "cost_usd": 1e-4, "latency_ms": 1.0, "escalated": False, "error": None, "call_id": "c1"}
    log = DecisionLog(tmp_path / "d.jsonl", fsync=False)
    log.append({"request_id": "r1", "client_call_id": "c1", "task": "banking77", "attempts": [attempt]})
    log.append({"request_id": "r2", "client_call_id": "c1", "task": "banking77", "attempts": [attempt]})
    log.append({"request_id": "r1", "client_call_id": "c1", "outcome": "failed_after_answer", "attempts": [],
                "error": "RuntimeError"})
    log.close()
    assert [r.request_id for r in read_decision_log(tmp_path / "d.jsonl")] == ["r2"]


def test_reader_keeps_legacy_links_it_can_check_and_drops_the_rest(tmp_path):
    """Old logs (request_id = LiteLLM call id, no call ids in attempts) still read; a forged legacy link
    to a tier the parent never escalated to is not trusted."""
    from coopt.logs import join_spend_logs, read_decision_log
    from litellm_routenlp.decision_log import DecisionLog

    def attempt(tier, escalated):
        return {"tier": tier, "tier_name": f"T{tier}", "model_id": f"routenlp-t{tier}", "uncertainty": 0.5,
                "threshold": 0.3, "cost_usd": 1e-3, "latency_ms": 1.0, "escalated": escalated, "error": None}

    log = DecisionLog(tmp_path / "old.jsonl", fsync=False)
    log.append({"request_id": "call-a", "task": "banking77", "attempts": [attempt(1, True), attempt(3, False)]})
    log.close()
    decisions = read_decision_log(tmp_path / "old.jsonl")

    def row(call_id, model_id, extra=None):
        return {"request_id": f"resp-{call_id}", "litellm_call_id": call_id, "model_id": model_id,
                "model_group": "routenlp", "spend": 0.001, "startTime": "2026-01-01T00:00:00",
                "metadata": {"spend_logs_metadata": extra or {}}}

    rows = [row("call-a", "routenlp-t1"),
            row("esc-1", "routenlp-t3", {"routenlp_parent_call_id": "call-a", "routenlp_tier": "T3",
                                         "routenlp_previous_uncertainty": 0.5}),
            row("call-x", "routenlp-t4", {"routenlp_parent_call_id": "call-a", "routenlp_tier": "T4"})]
    tiers = {"routenlp-t1": "T1", "routenlp-t3": "T3", "routenlp-t4": "T4"}
    joined = {r.request_id: r for r in join_spend_logs(rows, tiers, decisions=decisions)}
    assert joined["call-a"].path == ["T1", "T3"]
    assert joined["call-x"].path == ["T4"] and not joined["call-x"].escalated
    unverified = {r.request_id: r for r in join_spend_logs(rows, tiers)}  # no decision log: taken as written
    assert unverified["call-a"].path == ["T1", "T3", "T4"]
