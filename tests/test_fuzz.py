"""Property test against the real proxy: whatever a client sends, the answer is never a 5xx, a 4xx
carries an OpenAI-style error message, and what the plugin promises to reject is rejected with a 400
naming the offending field.

ONE real ``litellm --config`` proxy (the shipped config with ``unknown_task_policy: reject``, so a
missing or unknown task is bad input too, and a private decision log).  Hypothesis generates request
bodies from a valid base plus zero or more defects; every example is one HTTP request.  At least
1,000 requests are sent in all (counted; the last test checks the count).  Requests stay fast: small
``max_tokens``, and with this config every valid request is served by the in-process T1 classifier,
the T3 retrieval or the T4 replay stand-in (the router never picks SmolLM2 for the demo tasks at the
shipped ``route_confidence``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from litellm_routenlp.decision_log import read_decisions, was_cut
from conftest import running_proxy
from litellm_routenlp.request_fields import normalise_task_name

pytestmark = pytest.mark.proxy

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("banking77", "clinc150", "bitext")
SENT = {"requests": 0, "by_status": {}}
# ROUTENLP_FUZZ_SCALE=0.1 for a quick local run; the suite's default (1.0) sends >= 1,000 requests.
SCALE = float(os.environ.get("ROUTENLP_FUZZ_SCALE", "1"))
MIN_REQUESTS = int(1000 * SCALE)
FUZZ = settings(deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    document = yaml.safe_load((ROOT / "proxy_config.yaml").read_text())
    settings_ = document["routenlp_settings"]
    settings_["router_artifact"] = str(ROOT / "artifacts/router")
    settings_["thresholds_path"] = str(ROOT / "artifacts/thresholds.json")
    settings_["decision_log_path"] = str(work / "decisions.jsonl")
    settings_["unknown_task_policy"] = "reject"
    config = work / "proxy_config.yaml"
    config.write_text(yaml.safe_dump(document, sort_keys=False))
    with running_proxy(config, work) as process:
        yield process


@pytest.fixture(scope="module")
def http(proxy):
    import httpx

    with httpx.Client(base_url=proxy.base_url, timeout=180,
                      headers={"Authorization": f"Bearer {proxy.master_key}"}) as client:
        yield client


@pytest.fixture(scope="module")
def texts():
    from routenlp_core.tasks import get_task

    return {task: [e.text for e in get_task(task).load("test", limit=60, seed=4)] for task in TASKS}


# ------------------------------------------------------------------------------------------ sending
def send(http, payload=None, raw: bytes | None = None, content_type: str = "application/json"):
    """POST one chat request; returns (status, parsed JSON body or None, text, headers)."""
    if raw is None:
        raw = json.dumps(payload).encode()
    stream = isinstance(payload, dict) and payload.get("stream") is True
    with http.stream("POST", "/v1/chat/completions", content=raw, headers={"Content-Type": content_type}) as reply:
        text = reply.read().decode("utf-8", errors="replace")
        status, headers = reply.status_code, {k.lower(): v for k, v in reply.headers.items()}
    SENT["requests"] += 1
    SENT["by_status"][status] = SENT["by_status"].get(status, 0) + 1
    parsed = None
    if not stream or status != 200:
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
    return status, parsed, text, headers


def error_params(parsed) -> list:
    """``error.param``, and where LiteLLM re-wraps a hook's HTTPException, the original error's param."""
    error = (parsed or {}).get("error") or {}
    nested = ((error.get("provider_specific_fields") or {}).get("error") or {})
    return [value for value in (error.get("param"), nested.get("param")) if value]


def check_common(status, parsed, text, describe):
    """Never 5xx; a 4xx has {"error": {"message": "..."}} and no Python traceback."""
    assert status < 500, f"{status} for {describe}: {text[:500]}"
    assert "Traceback (most recent call last)" not in text, f"traceback leaked for {describe}: {text[:500]}"
    if 400 <= status < 500:
        assert isinstance(parsed, dict) and isinstance(parsed.get("error"), dict), \
            f"{status} body is not an OpenAI-style error for {describe}: {text[:300]}"
        message = parsed["error"].get("message")
        assert isinstance(message, str) and message.strip(), f"empty error message for {describe}: {text[:300]}"
        return message
    return None


# ------------------------------------------------------------------------------------------ strategies
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                           max_leaves=6)
PNG = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


@st.composite
def user_content(draw, text: str):
    """The query as a string, or as content parts with the text among non-text parts."""
    kind = draw(st.sampled_from(["string", "string", "parts"]))
    if kind == "string":
        return text
    parts = [{"type": "text", "text": text}]
    if draw(st.booleans()):
        parts.insert(draw(st.integers(0, 1)), {"type": "image_url", "image_url": {"url": PNG}})
    if draw(st.booleans()):
        parts.append({"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}})
    return parts


# Issue 11, classes 4 and 6: what a task name can hold that a header cannot, and padding.
WHITESPACE = st.sampled_from([" ", "  ", "\t", "\n", "\r\n", "\u3000", "\xa0", "\x0b", "\u2028"])
INVISIBLE = st.sampled_from(["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u200e", "\u200f",
                             *[chr(c) for c in range(0x202a, 0x202f)], *[chr(c) for c in range(0x2066, 0x206a)]])
CONTROL = st.sampled_from(["\r", "\n", "\x00", "\x07", "\x1b", "\x7f", "\r\nX-Evil: 1", "\x85"])
NON_LATIN1 = st.text(st.characters(min_codepoint=0x100, max_codepoint=0x10ffff, blacklist_categories=("Cs",)),
                     min_size=1, max_size=6)


@st.composite
def padded(draw, task: str):
    """A configured task name with whitespace around it: the same task (one normalisation)."""
    return draw(WHITESPACE) * draw(st.integers(0, 2)) + task + draw(WHITESPACE) * draw(st.integers(1, 2))


@st.composite
def unsafe_task_name(draw):
    """A name that is not a configured task once normalised: non-latin-1, control, bidi/zero-width."""
    base = draw(st.sampled_from([*TASKS, "", "task"]))
    odd = draw(st.one_of(NON_LATIN1, CONTROL, INVISIBLE))
    at = draw(st.integers(0, len(base)))
    name = base[:at] + odd + base[at:]
    if draw(st.booleans()):
        name = draw(padded(name))
    return name


@st.composite
def valid_request(draw, texts):
    task = draw(st.sampled_from(TASKS))
    text = draw(st.sampled_from(texts[task]))
    decorate = draw(st.sampled_from(["plain", "plain", "unicode", "enormous", "padded"]))
    if decorate == "unicode":
        text = text + " " + draw(st.text(min_size=1, max_size=40))
    elif decorate == "enormous":  # far past the encoder's 256-token window (truncated, documented)
        text = text + " " + " ".join(draw(st.sampled_from(["card", "refund", "état", "数据", "🙂", "x" * 30]))
                                     for _ in range(draw(st.integers(300, 6000))))
    elif decorate == "padded":
        text = "\n\t " + text + "   \n"
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(st.sampled_from(["Be brief.", "You are a bank assistant.", ""]))})
    for _ in range(draw(st.integers(0, 2))):
        messages += [{"role": "user", "content": draw(st.sampled_from(texts[task]))},
                     {"role": "assistant", "content": draw(st.sampled_from(["ok", "Sure.", "card_arrival"]))}]
    messages.append({"role": "user", "content": draw(user_content(text))})
    payload = {"model": "routenlp", "messages": messages, "max_tokens": draw(st.integers(1, 8)),
               "metadata": {"task": draw(padded(task)) if draw(st.integers(0, 5)) == 0 else task}}
    for key, strategy in (("temperature", st.floats(0, 2)), ("top_p", st.floats(0.01, 1)), ("seed", st.integers(0, 99)),
                          ("user", st.text(max_size=10)), ("logprobs", st.booleans()), ("n", st.just(1)),
                          ("stop", st.lists(st.text(min_size=1, max_size=3), max_size=2)),
                          ("stream", st.sampled_from([False, True]))):
        if draw(st.integers(0, 4)) == 0:
            payload[key] = draw(strategy)
    if draw(st.integers(0, 5)) == 0:
        payload["metadata"]["tags"] = draw(st.lists(st.text(max_size=6), max_size=2))
    return payload


# Defects the plugin promises to reject with a 400 naming the field (see README "Known limits").
def _no_messages(p, draw):
    choice = draw(st.sampled_from(["missing", "empty", "string", "null", "object"]))
    if choice == "missing":
        p.pop("messages")
    else:
        p["messages"] = {"empty": [], "string": "hello", "null": None, "object": {"role": "user"}}[choice]
    return "messages"


def _no_text(p, draw):
    choice = draw(st.sampled_from(["blank", "image_only", "no_user", "none", "number"]))
    last = p["messages"][-1]
    if choice == "blank":
        last["content"] = draw(st.sampled_from(["", "   ", "\n\t"]))
    elif choice == "image_only":
        last["content"] = [{"type": "image_url", "image_url": {"url": PNG}}]
    elif choice == "no_user":
        p["messages"] = [m for m in p["messages"] if m.get("role") != "user"] or [{"role": "system", "content": "hi"}]
    elif choice == "none":
        last["content"] = None
    else:
        last["content"] = draw(st.integers())
    return "messages"


def _n(p, draw):
    p["n"] = draw(st.sampled_from([0, 2, 3, 16, -1]))
    return "n"


def _tools(p, draw):
    param = draw(st.sampled_from(["tools", "tool_choice", "functions", "function_call", "logit_bias",
                                  "parallel_tool_calls", "modalities", "prediction", "audio"]))
    p[param] = {
        "tools": [{"type": "function", "function": {"name": "get_balance", "parameters": {"type": "object"}}}],
        "tool_choice": "auto", "functions": [{"name": "f", "parameters": {"type": "object"}}],
        "function_call": "auto", "logit_bias": {"50256": -100}, "parallel_tool_calls": True,
        "modalities": ["text", "audio"], "prediction": {"type": "content", "content": "x"},
        "audio": {"voice": "alloy", "format": "wav"}}[param]
    return param


def _metadata(p, draw):
    p["metadata"] = draw(st.one_of(st.text(max_size=10), st.integers(), st.lists(st.integers(), max_size=2),
                                   st.booleans()))
    return "metadata"


def _task_type(p, draw):
    p["metadata"]["task"] = draw(st.one_of(st.integers(), st.booleans(), st.lists(st.text(max_size=3), max_size=2),
                                           st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                                           st.sampled_from(["", "   "])))
    return "metadata.task"


def _task_unknown(p, draw):
    choice = draw(st.sampled_from(["unknown", "missing", "no_metadata"]))
    if choice == "unknown":
        p["metadata"]["task"] = draw(st.text(min_size=1, max_size=20).filter(lambda t: t.strip() not in TASKS))
    elif choice == "missing":
        p["metadata"].pop("task")
    else:
        p.pop("metadata")
    return "metadata.task"


def _task_unsafe(p, draw):
    name = draw(unsafe_task_name().filter(lambda t: t.strip() and normalise_task_name(t) not in TASKS))
    p["metadata"]["task"] = name
    return "metadata.task"


HARD_DEFECTS = {"task_unsafe": _task_unsafe, "messages": _no_messages, "no_text": _no_text, "n": _n, "tools": _tools, "metadata": _metadata,
                "task_type": _task_type, "task_unknown": _task_unknown}


# Defects with no promised outcome: anything but a 5xx (and a 4xx with a message) is acceptable.
def _soft_param(p, draw):
    key, value = draw(st.sampled_from([
        ("temperature", st.sampled_from([-1, 7, "hot", None])), ("top_p", st.sampled_from([-0.5, 3, "all"])),
        ("max_tokens", st.sampled_from([0, -5, "ten", 10**9, 2.5])), ("stop", st.sampled_from([5, {"a": 1}])),
        ("seed", st.sampled_from(["x", 1.5])), ("response_format", st.sampled_from([{"type": "json_object"},
                                                                                     {"type": "nonsense"}, "json"])),
        ("user", st.integers()), ("logprobs", st.sampled_from(["yes", 3])), ("top_logprobs", st.integers(-2, 30)),
        ("stream_options", st.just({"include_usage": True})), ("presence_penalty", st.floats(-5, 5)),
    ]))
    p[key] = draw(value)


def _unknown_param(p, draw):
    name = draw(st.sampled_from(["foo", "routenlp", "extra_body", "reasoning_effort", "x_custom", "api_base",
                                 "mock_response", "cache", "guardrails"]))
    p[name] = draw(JSON_VALUES)


def _odd_messages(p, draw):
    choice = draw(st.sampled_from(["tool_history", "unknown_role", "no_role", "extra_fields", "developer"]))
    if choice == "tool_history":
        p["messages"][-1:-1] = [
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "balance: 10"}]
    elif choice == "unknown_role":
        p["messages"].insert(0, {"role": draw(st.sampled_from(["robot", "", "USER"])), "content": "hi"})
    elif choice == "no_role":
        p["messages"].insert(0, {"content": "hi"})
    elif choice == "extra_fields":
        p["messages"][-1]["name"] = draw(st.text(max_size=5))
        p["messages"][-1]["weird"] = draw(JSON_VALUES)
    else:
        p["messages"].insert(0, {"role": "developer", "content": "Answer with a label."})


SOFT_DEFECTS = {"param": _soft_param, "unknown_param": _unknown_param, "odd_messages": _odd_messages}


@st.composite
def fuzzed_request(draw, texts, hard_weight: int):
    """A valid request, then maybe some defects; returns (payload, hard defect params, soft defect names)."""
    payload = draw(valid_request(texts))
    hard, soft = [], []
    if draw(st.integers(0, 9)) < hard_weight:
        for name in draw(st.lists(st.sampled_from(sorted(HARD_DEFECTS)), min_size=1, max_size=2, unique=True)):
            if name == "no_text" and not (isinstance(payload.get("messages"), list) and payload["messages"]):
                continue
            if not isinstance(payload.get("metadata"), dict) and name in ("task_type", "task_unknown", "task_unsafe"):
                continue
            hard.append(HARD_DEFECTS[name](payload, draw))
    if draw(st.integers(0, 4)) == 0:
        name = draw(st.sampled_from(sorted(SOFT_DEFECTS)))
        if isinstance(payload.get("messages"), list) and payload["messages"] or name != "odd_messages":
            SOFT_DEFECTS[name](payload, draw)
            soft.append(name)
    return payload, hard, soft


def _check_example(http, payload, hard, soft):
    describe = f"hard={hard} soft={soft} body={json.dumps(payload)[:400]}"
    status, parsed, text, headers = send(http, payload)
    message = check_common(status, parsed, text, describe)
    if hard and not soft:
        # every defect here is one the plugin rejects before any tier runs
        assert status == 400, f"expected 400 for {describe}, got {status}: {text[:300]}"
        named = " ".join(str(v) for v in (message, *error_params(parsed)))
        assert any(param.split(".")[0] in named for param in hard), f"400 names none of {hard}: {parsed}"
    elif hard:
        assert 400 <= status < 500, f"expected a 4xx for {describe}, got {status}: {text[:300]}"
    elif not soft:
        assert status == 200, f"a valid request failed ({status}) for {describe}: {text[:300]}"
        assert headers.get("x-routenlp-tier") in {"T1", "T2", "T3", "T4"}, headers
        assert headers.get("x-routenlp-task") == normalise_task_name(payload["metadata"]["task"]), headers
        if payload.get("stream") is not True:
            content = parsed["choices"][0]["message"]["content"]
            assert isinstance(content, str), parsed
        else:
            assert "data:" in text and "[DONE]" in text, text[:300]


# ------------------------------------------------------------------------------------------ the properties
@settings(FUZZ, max_examples=max(1, int(450 * SCALE)))
@given(data=st.data())
def test_mostly_valid_requests_are_answered_and_never_5xx(http, texts, data):
    payload, hard, soft = data.draw(fuzzed_request(texts, hard_weight=2))
    _check_example(http, payload, hard, soft)


@settings(FUZZ, max_examples=max(1, int(560 * SCALE)))
@given(data=st.data())
def test_bad_requests_get_a_400_naming_the_field_never_5xx(http, texts, data):
    payload, hard, soft = data.draw(fuzzed_request(texts, hard_weight=10))
    _check_example(http, payload, hard, soft)


# LiteLLM 1.106.2 itself answers 500 to a JSON body that is not an object, before any callback runs
# (checked against a plain proxy without the plugin); strict, so this flags when LiteLLM fixes it.
LITELLM_NON_OBJECT_BODY = pytest.mark.xfail(strict=True, reason="LiteLLM core: non-object JSON body -> 500")


@pytest.mark.parametrize("raw, content_type", [
    (b"{not json", "application/json"),
    (b"", "application/json"),
    *[pytest.param(raw, "application/json", marks=LITELLM_NON_OBJECT_BODY)
      for raw in (b"[1, 2, 3]", b'"just a string"', b"null")],
    (json.dumps({"model": "routenlp", "messages": [{"role": "user", "content": "hi"}],
                 "metadata": {"task": "banking77"}}).encode(), "text/plain"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "metadata": {"task": "banking77"}}).encode(),
     "application/json"),
    (json.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}).encode(),
     "application/json"),
    (json.dumps({"model": 5, "messages": [{"role": "user", "content": "hi"}]}).encode(), "application/json"),
])
def test_malformed_bodies_never_5xx(http, raw, content_type):
    status, parsed, text, _ = send(http, raw=raw, content_type=content_type)
    if status != 200:
        check_common(status, parsed, text, raw[:80])


def _deep(depth: int) -> bytes:
    return (b'{"model": "routenlp", "messages": [{"role": "user", "content": "hi"}], "metadata": {"task": "banking77", '
            b'"x": ' + b'{"a": ' * depth + b'1' + b'}' * depth + b'}}')


# LiteLLM 1.106.2 (not the plugin, whose hooks run after these): metadata ~900 deep -> 500 (RecursionError in
# a deepcopy); strict, so this flags when LiteLLM fixes it.  README "Known limits".
@pytest.mark.xfail(strict=True, reason="LiteLLM core: metadata ~900 deep -> 500 (RecursionError in deepcopy)")
def test_deeply_nested_metadata_never_5xx(http):
    status, parsed, text, _ = send(http, raw=_deep(900))
    check_common(status, parsed, text, "metadata 900 deep")


# LiteLLM 1.106.2 reads a body it cannot decode (invalid UTF-8, nesting past its JSON parser's limit) as {}
# and answers "Missing required parameter: 'messages'": a 400, but one that names the wrong problem.
@pytest.mark.xfail(strict=True, reason="LiteLLM core: undecodable body -> 400 'Missing required parameter: messages'")
@pytest.mark.parametrize("raw", [
    b'{"model": "routenlp", "messages": [{"role": "user", "content": "\xff\xfe card"}], "metadata": {"task": "banking77"}}',
    _deep(20_000)], ids=["invalid-utf8", "nesting-20000"])
def test_undecodable_bodies_get_a_400_saying_so(http, raw):
    status, parsed, text, _ = send(http, raw=raw)
    message = check_common(status, parsed, text, raw[:60]) or ""
    assert status == 400 and "messages" not in message, message


@pytest.mark.parametrize("extra", [
    {"max_tokens": "ten"}, {"max_completion_tokens": "x"}, {"max_tokens": -5}, {"max_tokens": 0},
    {"max_tokens": 2.5}, {"max_tokens": 10**12}, {"temperature": "hot"}, {"temperature": -1}, {"top_p": 7},
    {"top_logprobs": 30}, {"logprobs": "yes"}, {"stop": 5}, {"seed": "x"}, {"user": 5},
    {"response_format": {"type": "nonsense"}}, {"response_format": "json"}, {"response_format": {"type": 3}},
    {"stream_options": {"include_usage": True}},
    {"api_base": None}, {"api_base": "http://127.0.0.1:9/v1"}, {"api_key": "sk-other"},
    {"foo": {"bar": [1, 2]}}, {"mock_response": "not from a tier"},
], ids=lambda extra: "-".join(f"{k}={v!r}"[:30] for k, v in extra.items()))
@pytest.mark.parametrize("task", ["banking77", "bitext"])
def test_unsupported_or_invalid_parameter_values_never_5xx(http, extra, task):
    """Parameter values no tier supports: a 4xx with a message, or an answer; never a 5xx."""
    payload = {"model": "routenlp", "messages": [{"role": "user", "content": "where is my card, I need a refund"}],
               "metadata": {"task": task}, **extra}
    status, parsed, text, headers = send(http, payload)
    check_common(status, parsed, text, extra)
    if status == 200 and "mock_response" in extra:
        assert parsed["choices"][0]["message"]["content"] != "not from a tier", "a client must not pick the answer"


@pytest.mark.parametrize("where, name, messages", [
    ("body", "\u0100", True), ("metadata", "\U000cd461", True),
    # hypothesis found these later: a control character, and a request refused for another reason first
    ("body", "\r", True), ("body", "\r", False), ("body", "\u0100", False), ("metadata", "\x7f", False)])
def test_guardrail_names_that_cannot_be_a_header_get_a_400_not_a_500(http, texts, where, name, messages):
    """LiteLLM echoes guardrail names in a latin-1 response header, on error responses too."""
    payload = {"model": "routenlp", "metadata": {"task": "banking77"}, "max_tokens": 1,
               **({"messages": [{"role": "user", "content": texts["banking77"][0]}]} if messages else {})}
    if where == "body":
        payload["guardrails"] = [name]
    else:
        payload["metadata"]["guardrails"] = [name]
    status, parsed, body, _ = send(http, payload)
    assert status == 400, body[:300]
    assert parsed["error"]["param"] == "guardrails", parsed


def test_enormous_message_is_truncated_by_the_router_and_served(http, proxy, texts):
    """~40k tokens: the router reads the first 512 encoder tokens (documented); the tiers answer."""
    text = texts["banking77"][0] + " " + "my card payment was declined at the shop again " * 4000
    status, parsed, body, headers = send(http, {"model": "routenlp", "messages": [{"role": "user", "content": text}],
                                                "metadata": {"task": "banking77"}, "max_tokens": 4})
    assert status == 200, body[:300]
    record = {r["request_id"]: r for r in read_decisions(proxy.decision_log)}[headers["x-routenlp-request-id"]]
    assert record["router"]["router_ms"] < 1000, record["router"]


@settings(FUZZ, max_examples=max(3, int(10 * SCALE)))
@given(data=st.data())
def test_prompt_sizes_up_to_5mb_are_served_quickly_and_recorded_capped(http, proxy, texts, data):
    """Issue 11, class 5: the router cuts by characters before tokenising, the record caps each field."""
    size = data.draw(st.one_of(st.integers(1_000, 100_000), st.integers(100_000, 5_000_000),
                               st.just(5_000_000)), label="chars")
    filler = data.draw(st.sampled_from(["card declined ", "état 数据 🙂 ", "x" * 31 + " ", "\u200b\u202e"]))
    text = texts["banking77"][0] + " " + (filler * (size // len(filler) + 1))[:size]
    task = data.draw(st.one_of(st.just("banking77"), padded("banking77")), label="task")
    import time as clock

    started = clock.perf_counter()
    status, parsed, body, headers = send(http, {"model": "routenlp", "messages": [{"role": "user", "content": text}],
                                                "metadata": {"task": task}, "max_tokens": 2})
    seconds = clock.perf_counter() - started
    assert status == 200, body[:300]
    assert seconds < 30, f"{len(text)} chars took {seconds:.1f} s"
    record = {r["request_id"]: r for r in read_decisions(proxy.decision_log)}[headers["x-routenlp-request-id"]]
    assert record["router"]["router_ms"] < 500, record["router"]
    assert len(record["prompt"]) <= 8192 + 40 and (was_cut(record["prompt"]) == (len(text) > 8192))


def test_at_least_1000_generated_requests_reached_the_proxy(proxy):
    """Runs last in this module: the property tests above really talked to the proxy this much."""
    assert SENT["requests"] >= MIN_REQUESTS, SENT
    log = proxy.stdout_log.read_text(errors="replace")
    print(f"\nfuzz: {SENT['requests']} requests, by status {dict(sorted(SENT['by_status'].items()))}; "
          f"plugin tracebacks in the proxy log: {log.count('litellm_routenlp/') }")
