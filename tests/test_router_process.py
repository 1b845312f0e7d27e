"""``router_execution: process``: the router in its own process (router_worker.py, router_process.py).

The shipped router answers in the child exactly as it does in the proxy; a killed, stuck or broken child
never fails a query (the router in the proxy answers) and a killed one is replaced; and a real proxy
serves with it, through a kill -9 of its router process."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from litellm_routenlp.decision_log import read_decisions
from litellm_routenlp.plugin import RouteNLPCallback
from litellm_routenlp.router_process import RouterProcess
from litellm_routenlp.router_worker import decode_queries, decode_replies, encode_query, encode_reply

from conftest import mock_deployments, require_artifacts, running_proxy, write_proxy_config

TEXTS = ["I am still waiting on my card?", "how do I top up with a cheque", "my card got eaten by the atm",
         "¿Puedo cambiar mi PIN? ünïcödé ✓", "x" * 5000]


def test_frames_survive_any_split_and_carry_errors_and_missing_acceptance():
    stream = encode_query(7, "banking77", TEXTS[3]) + encode_query(8, "", "") + encode_query(9, "t", TEXTS[4])
    for cut in (1, 5, 17, len(stream) - 1):  # a pipe may deliver any prefix
        buffer = bytearray(stream[:cut])
        first = decode_queries(buffer)
        buffer += stream[cut:]
        assert first + decode_queries(buffer) == [(7, "banking77", TEXTS[3]), (8, "", ""), (9, "t", TEXTS[4])]
        assert not buffer
    replies = encode_reply(3, [0.25, 0.75], [0.5, 1.0]) + encode_reply(4, [1.0, 0.0]) + encode_reply(5, error="boom ✓")
    buffer = bytearray(replies[:-2])
    got = decode_replies(buffer)
    buffer += replies[-2:]
    assert got + decode_replies(buffer) == [(3, [0.25, 0.75], [0.5, 1.0], ""), (4, [1.0, 0.0], None, ""),
                                            (5, [], None, "boom ✓")]


@pytest.fixture()
def callback(tmp_path):
    require_artifacts("router")
    callback = RouteNLPCallback.from_config(write_proxy_config(tmp_path, router_execution="process"))
    yield callback
    callback.router_process.close()


def _until_ready(callback, timeout=90.0):
    async def wait():
        deadline = time.monotonic() + timeout
        while not callback.router_process.ready and time.monotonic() < deadline:
            await callback.decide_async([{"role": "user", "content": "warm up"}], {"task": "banking77"})
            await asyncio.sleep(0.1)
    asyncio.run(wait())
    assert callback.router_process.ready, "the router process did not report ready"


def _decide_all(callback, texts, task="banking77"):
    async def run():
        return [await callback.decide_async([{"role": "user", "content": t}], {"task": task}) for t in texts]
    return asyncio.run(run())


def test_the_router_process_gives_what_the_router_in_the_proxy_gives(callback):
    _until_ready(callback)
    answered = callback.router_process.answered
    for task in ("banking77", "bitext", "not-a-task"):
        remote = _decide_all(callback, TEXTS, task)
        here = [callback.decide([{"role": "user", "content": t}], {"task": task}) for t in TEXTS]
        for a, b in zip(remote, here):
            assert a.probabilities == pytest.approx(b.probabilities, abs=1e-6)
            assert (a.acceptance is None) == (b.acceptance is None)
            if a.acceptance is not None:
                assert a.acceptance == pytest.approx(b.acceptance, abs=1e-6)
            assert (a.task, a.task_status) == (b.task, b.task_status)
    assert callback.router_process.answered - answered >= 2 * len(TEXTS)  # "not-a-task" may skip the router


def test_a_killed_router_process_is_replaced_and_no_query_fails(callback, caplog):
    _until_ready(callback)
    process = callback.router_process
    process.restart_after_s = 0.5
    here = callback.decide([{"role": "user", "content": TEXTS[0]}], {"task": "banking77"})
    first_pid = process.pid
    os.kill(first_pid, signal.SIGKILL)
    time.sleep(0.3)
    with caplog.at_level(logging.WARNING, logger="litellm_routenlp"):
        during = _decide_all(callback, TEXTS[:1] * 3)
    assert all(d.probabilities == pytest.approx(here.probabilities, abs=1e-6) for d in during)
    assert process.fell_back >= 1 and "router process" in caplog.text
    time.sleep(0.6)
    _until_ready(callback)
    assert process.pid != first_pid and process.starts == 2
    assert process.restart_delay_s() == 0.5  # answered again: the back-off is reset
    answered = process.answered
    again = _decide_all(callback, TEXTS[:1])
    assert process.answered == answered + 1 and again[0].probabilities == pytest.approx(here.probabilities, abs=1e-6)


def test_a_stuck_router_process_is_killed_and_its_query_routed_in_the_proxy(callback):
    _until_ready(callback)
    process = callback.router_process
    process.timeout_s = 0.3
    child = psutil.Process(process.pid)
    os.kill(child.pid, signal.SIGSTOP)
    started = time.monotonic()
    decision = _decide_all(callback, TEXTS[:1])[0]
    waited = time.monotonic() - started
    here = callback.decide([{"role": "user", "content": TEXTS[0]}], {"task": "banking77"})
    assert decision.probabilities == pytest.approx(here.probabilities, abs=1e-6)
    assert 0.25 <= waited < 5.0, f"waited {waited:.2f} s for a stopped router process (timeout 0.3 s)"
    assert not process.ready
    child.wait(timeout=10)  # killed, not left stopped


def test_a_router_process_that_cannot_build_its_router_leaves_routing_in_the_proxy(tmp_path, caplog):
    broken = tmp_path / "proxy_config.yaml"
    broken.write_text("routenlp_settings: {tasks: {}}\n")  # no router_artifact, no task: the child refuses
    process = RouterProcess(broken, tiers=4, restart_after_s=0.0)  # it must not be started again anyway

    async def ask():
        deadline = time.monotonic() + 90
        while process.pid is not None and time.monotonic() < deadline:
            assert await process.predict("hello", "banking77") is None
            await asyncio.sleep(0.1)

    with caplog.at_level(logging.WARNING, logger="litellm_routenlp"):
        asyncio.run(ask())
    assert process.pid is None and process.answered == 0 and "router_artifact" in process.gave_up
    assert "could not build the router" in caplog.text and "from now on" in caplog.text
    asyncio.run(ask())
    assert process.starts == 1, "a router process that cannot build its router was started again"


def _ask(proxy, text: str) -> dict:
    body = json.dumps({"model": "routenlp", "messages": [{"role": "user", "content": text}],
                       "metadata": {"task": "banking77"}, "max_tokens": 8}).encode()
    request = urllib.request.Request(proxy.base_url + "/v1/chat/completions", data=body,
                                     headers={"Authorization": f"Bearer {proxy.master_key}",
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert reply.status == 200
        return {"call_id": reply.headers["x-litellm-call-id"], "tier": reply.headers["x-routenlp-tier"]}


def _router_children(proxy) -> list[psutil.Process]:
    return [child for child in psutil.Process(proxy.process.pid).children(recursive=True)
            if "litellm_routenlp.router_worker" in " ".join(child.cmdline())]


def test_a_real_proxy_routes_through_its_router_process_and_survives_its_kill(tmp_path):
    require_artifacts("router")

    def mutate(document):
        document["model_list"] = mock_deployments()

    config = write_proxy_config(tmp_path, mutate, router_execution="process", shadow_audit={"fraction": 0.0})
    (tmp_path / "here").mkdir()
    here = RouteNLPCallback.from_config(write_proxy_config(tmp_path / "here", mutate))
    expected = {text: here.decide([{"role": "user", "content": text}], {"task": "banking77"}).probabilities
                for text in TEXTS[:3]}
    with running_proxy(config, tmp_path) as proxy:
        deadline = time.monotonic() + 60
        while not _router_children(proxy) and time.monotonic() < deadline:
            time.sleep(0.2)
        (child,) = _router_children(proxy)
        time.sleep(3.0)  # let it report ready: before that the router in the proxy answers (also correct)
        before = [(_ask(proxy, text), text) for text in TEXTS[:3] * 4]
        child.kill()
        child.wait(timeout=10)
        during = [(_ask(proxy, text), text) for text in TEXTS[:3] * 4]
        deadline = time.monotonic() + 60  # the next query after restart_after_s (5 s) starts a new process
        while not _router_children(proxy) and time.monotonic() < deadline:
            time.sleep(0.5)
            during.append((_ask(proxy, TEXTS[0]), TEXTS[0]))
        replaced = _router_children(proxy)
        assert replaced and replaced[0].pid != child.pid
        log = proxy.stdout_log.read_text(errors="replace")
    records = {r["client_call_id"]: r for r in read_decisions(proxy.decision_log, strict=True)}
    for answer, text in before + during:  # the same decisions whichever process made them
        record = records[answer["call_id"]]
        assert record["outcome"] == "answered"
        assert list(record["router"]["probabilities"].values()) == pytest.approx(expected[text], abs=1e-6)
    assert "RouteNLP: router process" in log and "exited" in log
    print(f"\nrouter process: {len(before)} answered through it, {len(during)} through the kill and its replacement")
