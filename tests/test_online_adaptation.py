"""Issue 13 item 6: online adaptation by ACI, shared through a REAL Redis (litellm_routenlp/online_adaptation.py).

Redis is ``redis-server`` (Debian package ``redis-server``; .ci/run installs it) started here on
127.0.0.1, a free port, a temp dir, no persistence.  Missing binary: the tests fail saying how to get it.

* the ACI step, the bounds and each policy's knob;
* two adaptation clients on one Redis: atomic concurrent updates, one's verdict moves the other's
  state, a lost Redis keeps the last state and says so in ``routenlp_adaptation_redis_up``;
* two real proxies on 127.0.0.1 sharing one Redis (marker ``proxy``): a verdict received by one changes
  the other's next decision; LiteLLM's cooldown of a failing tier, set by one, is honoured by the other.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from litellm_routenlp.online_adaptation import OnlineAdaptation, aci_step, adapted_policy
from litellm_routenlp.proxy_process import free_port

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


class RedisServer:
    """A throwaway redis-server on 127.0.0.1."""

    def __init__(self, work: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server not found: install the Debian package `redis-server` "
                        "(apt-get install redis-server; .ci/run does)")
        self.port = free_port()
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(work), "--save", "",
             "--appendonly", "no", "--protected-mode", "yes"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        import redis

        deadline = time.time() + 20
        while True:
            try:
                redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1).ping()
                break
            except redis.exceptions.ConnectionError:
                if time.time() > deadline or self.process.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture()
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.stop()


# ----------------------------------------------------------------------------------------- the step
def test_aci_step_moves_towards_alpha_within_bounds():
    assert aci_step(1.0, False, 0.05, 0.1, 1.0) == pytest.approx(0.905)   # unacceptable: safer
    assert aci_step(0.5, True, 0.05, 0.1, 1.0) == pytest.approx(0.505)    # acceptable: a little cheaper
    assert aci_step(0.01, False, 0.05, 0.1, 1.0) == 0.0                   # floor: the top tier's end
    assert aci_step(0.999, True, 0.05, 0.1, 1.0) == 1.0                   # never cheaper than calibrated
    # a stationary error rate alpha leaves the scale where it is on average
    scale, errors = 0.5, [i % 20 == 0 for i in range(2000)]              # 5% unacceptable
    for bad in errors:
        scale = aci_step(scale, not bad, 0.05, 0.01, 1.0)
    assert scale == pytest.approx(0.5, abs=0.02)


def test_each_policys_knob_moves_and_the_base_policy_does_not():
    from litellm_routenlp.policy import ConformalThresholds, PosteriorThreshold, TaskPolicy
    from litellm_routenlp.thresholds import Thresholds

    base = ConformalThresholds(Thresholds.load(ROOT / "artifacts/thresholds.json"))
    scaled = adapted_policy(base, "banking77", 0.5)
    assert scaled.thresholds.delta("T1", "banking77") == pytest.approx(0.5 * base.thresholds.delta("T1", "banking77"))
    assert scaled.thresholds.delta("T1", "clinc150") == base.thresholds.delta("T1", "clinc150")
    assert adapted_policy(base, "banking77", 1.0) is base
    spec = TaskPolicy(lam=2.0, costs=(0.01, 0.1, 1.0), sigmas=(0.1, 0.1, 0.1), threshold=0.8)
    posterior = PosteriorThreshold.__new__(PosteriorThreshold)
    posterior.tasks = {"banking77": spec}
    assert adapted_policy(posterior, "banking77", 0.0).tasks["banking77"].threshold == 1.0   # top tier
    assert adapted_policy(posterior, "banking77", 0.5).tasks["banking77"].threshold == pytest.approx(0.9)
    routing = SimpleNamespace(name="cascade_routing", tasks={"banking77": spec}, thresholds=None)
    assert adapted_policy(routing, "banking77", 0.25).tasks["banking77"].lam == pytest.approx(0.5)
    assert posterior.tasks["banking77"] is spec


# ----------------------------------------------------------------------------------------- real Redis
def _settings(**fields):
    from litellm_routenlp.config import AdaptationSettings

    return AdaptationSettings(**{"step": 0.1, "refresh_s": 0.0, "timeout_s": 0.2, **fields})


def _verdict(acceptable, task="banking77", request_id="r"):
    return SimpleNamespace(task=task, acceptable=acceptable, request_id=request_id, source="client")


def test_two_instances_share_the_state_atomically_and_survive_losing_redis(redis_server, tmp_path):
    from litellm_routenlp import prometheus_metrics as pm

    params = {"host": "127.0.0.1", "port": redis_server.port}

    async def run():
        one = OnlineAdaptation(_settings(), params, {"banking77": 0.05}, tmp_path / "a1.jsonl")
        two = OnlineAdaptation(_settings(), params, {"banking77": 0.05}, tmp_path / "a2.jsonl")
        assert await two.scale("banking77") == 1.0
        await one.observe(_verdict(False))
        assert await two.scale("banking77") == pytest.approx(0.905)        # one's verdict, two's state
        # 40 verdicts at once from both instances: every one counts (the Lua update is atomic)
        await asyncio.gather(*[(one if i % 2 else two).observe(_verdict(i % 4 != 0, request_id=f"r{i}"))
                               for i in range(40)])
        expected = 0.905
        for i in range(40):  # the order does not matter while no bound is hit
            expected += 0.1 * (0.05 - (0.0 if i % 4 != 0 else 1.0))
        assert await one.scale("banking77") == pytest.approx(max(expected, 0.0), abs=1e-6)
        last = await two.scale("banking77")
        redis_server.stop()                                                # Redis goes away
        assert await two.scale("banking77") == last                         # last state kept
        assert pm.sample("routenlp_adaptation_redis_up", {}) == 0.0
        assert await one.observe(_verdict(False)) is None                  # no change without Redis
        records = [json.loads(x) for x in (tmp_path / "a1.jsonl").read_text().splitlines()]
        assert records[0]["cause"] == {"verdict_request_id": "r", "source": "client", "acceptable": False}
        assert records[0]["scale_before"] == 1.0 and records[0]["scale_after"] == pytest.approx(0.905)
        n = len(records) + len((tmp_path / "a2.jsonl").read_text().splitlines())
        assert n == 41  # every change logged, once, by the instance that made it
        await one.close()
        await two.close()

    asyncio.run(run())


def test_adaptation_settings_are_checked_at_start(tmp_path):
    from litellm_routenlp.config import SettingsError, settings_from_mapping
    from litellm_routenlp.online_adaptation import build

    raw = {"router_artifact": "r", "tasks": {"banking77": {"kind": "structured", "tau": 0.9}}}
    for block, fragment in (({"step": 0}, "routenlp_settings.adaptation.step"),
                            ({"max_scale": -1}, "routenlp_settings.adaptation.max_scale"),
                            ({"target_miscoverage": {"banking77": 1.5}}, "must be in (0, 1)"),
                            ({"redis": "x"}, "routenlp_settings.adaptation.redis")):
        with pytest.raises(SettingsError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            settings_from_mapping({**raw, "adaptation": block}, "cfg.yaml", tmp_path)
    settings = settings_from_mapping({**raw, "adaptation": {}}, "cfg.yaml", tmp_path)
    with pytest.raises(ValueError, match="needs routenlp_settings.thresholds_path"):
        build(settings, {"router_settings": {"redis_host": "127.0.0.1"}})
    with pytest.raises(ValueError, match="no Redis"):
        build(settings, {}, serving=False)
    with pytest.raises(ValueError, match="no task has a target"):
        build(settings, {"router_settings": {"redis_host": "127.0.0.1"}}, serving=False)
    with pytest.raises(ValueError, match=r"target_miscoverage: tasks \['nope'\] are not configured"):
        build(settings_from_mapping({**raw, "adaptation": {"target_miscoverage": {"nope": 0.1}}}, "cfg.yaml",
                                    tmp_path), {"router_settings": {"redis_host": "127.0.0.1"}}, serving=False)


# ----------------------------------------------------------------------------------------- two proxies
# every answer token has p = 0.6 (u = 0.4: under banking77's calibrated T1 delta 0.568, over half of it)
ANSWER_LOGPROB = math.log(0.6)


@pytest.fixture(scope="module")
def two_proxies(tmp_path_factory, start_upstream):
    from test_verdicts import fake_tier_config

    from litellm_routenlp.proxy_process import ProxyProcess

    work = tmp_path_factory.mktemp("adaptation")
    redis_server = RedisServer(work)
    upstream = start_upstream(logprob=ANSWER_LOGPROB)   # tests/fake_upstream.py: tiers /t<k>/v1
    proxies = []
    tasks = {name: {"kind": kind, "tau": tau} for name, kind, tau in
             (("banking77", "structured", 0.92), ("clinc150", "structured", 0.92), ("bitext", "generation", 0.65))}
    try:
        for name in ("a", "b"):
            home = work / name
            home.mkdir()
            config = fake_tier_config(home, upstream.port, routenlp={
                "thresholds_path": str(ROOT / "artifacts/thresholds.json"), "tasks": tasks,
                "adaptation": {"step": 0.5, "refresh_s": 0.0, "log_path": str(home / "adaptation.jsonl")}},
                router_settings={"redis_host": "127.0.0.1", "redis_port": redis_server.port,
                                 "allowed_fails": 0, "cooldown_time": 120})
            proxy = ProxyProcess(config, log_path=home / "proxy.log", cwd=ROOT)
            proxy.home = home
            proxies.append(proxy)
        for proxy in proxies:
            proxy.start(timeout=300)
        yield proxies, upstream, redis_server
    finally:
        for proxy in proxies:
            proxy.stop()
        redis_server.stop()


def _ask(proxy, text="my new card has not arrived yet", task="banking77"):
    import httpx

    reply = httpx.post(proxy.base_url + "/v1/chat/completions", timeout=60,
                       headers={"Authorization": f"Bearer {proxy.master_key}"},
                       json={"model": "routenlp", "messages": [{"role": "user", "content": text}],
                             "metadata": {"task": task}, "max_tokens": 8})
    assert reply.status_code == 200, reply.text[:300]
    return reply.headers


@pytest.mark.proxy
def test_a_verdict_received_by_one_proxy_changes_the_others_next_decision(two_proxies):
    import httpx

    (a, b), upstream, _ = two_proxies
    before = _ask(b)
    assert "," not in before["x-routenlp-path"] and before["x-routenlp-tier"] != "T4", dict(before)  # u <= delta
    served = _ask(a)
    reply = httpx.post(a.base_url + "/routenlp/verdicts", timeout=30, headers={"Authorization": f"Bearer {a.master_key}"},
                       json={"request_id": served["x-routenlp-request-id"], "acceptable": False})
    assert reply.status_code == 200, reply.text
    after = _ask(b)   # B never saw the verdict: its next decision reads the shared scale
    assert after["x-routenlp-path"].split(",")[0] == before["x-routenlp-path"] and "," in after["x-routenlp-path"], \
        (dict(before), dict(after))
    change = json.loads((a.home / "adaptation.jsonl").read_text().splitlines()[-1])
    assert change["task"] == "banking77" and change["scale_before"] == 1.0 and change["scale_after"] < 0.6
    assert change["cause"]["verdict_request_id"] == served["x-routenlp-request-id"]
    print(f"\nB before the verdict: {before['x-routenlp-path']}; after A's verdict: {after['x-routenlp-path']} "
          f"(scale {change['scale_before']} -> {change['scale_after']:.3f})")


@pytest.mark.proxy
def test_litellms_cooldown_of_a_failing_tier_is_shared_through_redis(two_proxies):
    import redis

    (a, b), upstream, redis_server = two_proxies
    start = _ask(a, "where is my card")["x-routenlp-path"].split(",")[0]
    tier = int(start[1:])
    upstream.serve(tier, "error")   # HTTP 500
    try:
        import httpx

        for _ in range(2):  # A's calls to the tier fail: LiteLLM cools the deployment down (allowed_fails 0)
            httpx.post(a.base_url + "/v1/chat/completions", timeout=60,
                       headers={"Authorization": f"Bearer {a.master_key}"},
                       json={"model": "routenlp", "messages": [{"role": "user", "content": "where is my card"}],
                             "metadata": {"task": "banking77"}, "max_tokens": 8})
        keys = redis.Redis(host="127.0.0.1", port=redis_server.port).keys("*cooldown*")
        assert any(f"fake-t{tier}".encode() in k for k in keys), keys
        # LiteLLM's DualCache re-reads a key from Redis at most every redis_batch_cache_expiry (10 s in
        # 1.106.2, caching/dual_cache.py) and B read the cooldown keys in its last request: the bound
        time.sleep(10.5)
        calls = upstream.calls[tier]
        headers = _ask(b, "where is my card")      # B: never failed itself, yet does not call the tier
        assert upstream.calls[tier] == calls, "B called the tier A's failures cooled down"
        assert headers["x-routenlp-tier"] != start and "x-routenlp-degraded" in headers, dict(headers)
        print(f"\ncooldown keys in Redis: {keys}; B served by {headers['x-routenlp-tier']} "
              f"({headers['x-routenlp-degraded']})")
    finally:
        upstream.serve(tier, "ok")


def test_the_verdicts_cli_takes_the_same_aci_step_in_redis(redis_server, tmp_path):
    import redis
    import yaml
    from test_verdicts import _cli, _decisions

    _decisions(tmp_path / "d.jsonl")
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({
        "router_settings": {"redis_host": "127.0.0.1", "redis_port": redis_server.port},
        "routenlp_settings": {
            "router_artifact": str(ROOT / "artifacts/router"), "decision_log_path": "d.jsonl",
            "verdicts_path": "v.jsonl", "tasks": {"banking77": {"kind": "structured", "tau": 0.92}},
            "adaptation": {"step": 0.1, "target_miscoverage": {"banking77": 0.05}, "log_path": "a.jsonl"}}}))
    (tmp_path / "in.jsonl").write_text('{"request_id": "r-1", "acceptable": false}\n')
    done = _cli("verdicts", "--file", str(tmp_path / "in.jsonl"), "--config", str(config), cwd=ROOT)
    assert done.returncode == 0 and "1 of 1 verdicts moved" in done.stdout, (done.stdout, done.stderr)
    scale = redis.Redis(host="127.0.0.1", port=redis_server.port).hget("routenlp:scale", "banking77")
    assert float(scale) == pytest.approx(0.905)
    change = json.loads((tmp_path / "a.jsonl").read_text())
    assert change["cause"] == {"verdict_request_id": "r-1", "source": "client", "acceptable": False}
