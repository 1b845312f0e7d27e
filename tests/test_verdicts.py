"""Issue 13 item 4b: clients' verdicts (litellm_routenlp/verdicts.py).

* the store: a verdict joins its decision by the plugin's request id; an unknown id, a second verdict
  of the same source, a non-boolean ``acceptable`` are refused with a message; the record is on disk
  (fsync'd, the decision log's writer) in the shape ``routenlp report --verdicts`` reads;
* the CLI ``routenlp verdicts --file X.jsonl``: the whole file is checked first (file:line named,
  nothing stored on an error), then appended;
* the real proxy (marker ``proxy``): ``POST /routenlp/verdicts`` needs the LiteLLM key (401 without),
  refuses an unknown request id (404, message), stores a good one and counts it in
  ``routenlp_audit_verdicts_total{source="client"}``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from litellm_routenlp.decision_log import DecisionLog
from litellm_routenlp.verdicts import VerdictError, VerdictStore

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _decisions(path: Path) -> None:
    log = DecisionLog(path)
    log.append({"request_id": "r-1", "outcome": "answered", "task": "banking77", "final_tier": "T1",
                "ts": "2026-12-02T10:00:00+00:00", "attempts": [{"tier": "T1"}], "policy": {"name": "conformal_thresholds"}})
    log.append({"request_id": "r-2", "outcome": "answered", "task": "clinc150", "final_tier": "T3",
                "ts": "2026-12-02T10:00:01+00:00", "attempts": [{"tier": "T3"}]})
    log.append({"request_id": "r-2", "outcome": "failed_after_answer", "ts": "2026-12-02T10:00:02+00:00"})
    log.close()


def test_a_verdict_joins_its_decision_or_is_refused(tmp_path):
    from coopt.ops_report import read_verdicts

    _decisions(tmp_path / "d.jsonl")
    store = VerdictStore(tmp_path / "v.jsonl", tmp_path / "d.jsonl")
    record = store.store(store.prepare("r-1", False, "client", "wrong intent"), ["banking77"])
    assert (record.task, record.final_tier, record.note) == ("banking77", "T1", "wrong intent")
    for args, status, fragment in (
            (("r-404", True, "client"), 404, "unknown request id 'r-404'"),
            (("r-2", True, "client"), 404, "unknown request id 'r-2'"),   # retracted: the client never got it
            (("r-1", True, "client"), 409, "already has a client verdict"),
            (("r-1", "yes", "client"), 400, "`acceptable` must be true or false"),
            ((None, True, "client"), 400, "`request_id` must be"),
            (("r-1", True, "bot"), 400, "source must be one of")):
        with pytest.raises(VerdictError) as caught:
            store.prepare(*args)
        assert caught.value.status == status and fragment in str(caught.value), (args, caught.value)
    store.store(store.prepare("r-1", True, "audit", score=1.0, metric="accuracy"), ["banking77"])  # another source
    store.close()
    warnings: list = []
    verdicts = read_verdicts(tmp_path / "v.jsonl", warnings)
    assert [(v.request_id, v.acceptable, v.source) for v in verdicts] == [("r-1", False, "client"), ("r-1", True, "audit")]
    assert not warnings
    # a restarted store remembers what it stored (no double count after a retry)
    again = VerdictStore(tmp_path / "v.jsonl", tmp_path / "d.jsonl")
    with pytest.raises(VerdictError, match="already has a client verdict"):
        again.prepare("r-1", True, "client")
    again.close()


def _cli(*args, cwd):
    return subprocess.run([str(Path(sys.executable).parent / "routenlp"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_the_verdicts_cli_checks_the_whole_file_then_appends(tmp_path):
    _decisions(tmp_path / "d.jsonl")
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"routenlp_settings": {
        "router_artifact": str(ROOT / "artifacts/router"), "decision_log_path": "d.jsonl", "verdicts_path": "v.jsonl",
        "tasks": {"banking77": {"kind": "structured", "tau": 0.92}}}}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"request_id": "r-1", "acceptable": true}\n{"request_id": "r-9", "acceptable": false}\n')
    done = _cli("verdicts", "--file", str(bad), "--config", str(config), cwd=ROOT)
    assert done.returncode == 2 and f"{bad}:2: unknown request id 'r-9'" in done.stderr, done.stderr
    assert not (tmp_path / "v.jsonl").read_text().strip()  # nothing stored: the file was refused whole
    bad.write_text('{"request_id": "r-1", "acceptable": "no"}\n')
    done = _cli("verdicts", "--file", str(bad), "--config", str(config), cwd=ROOT)
    assert done.returncode == 2 and f"{bad}:1: `acceptable` must be true or false" in done.stderr, done.stderr
    good = tmp_path / "good.jsonl"
    good.write_text('{"request_id": "r-1", "acceptable": false, "note": "wrong"}\n')
    done = _cli("verdicts", "--file", str(good), "--config", str(config), cwd=ROOT)
    assert done.returncode == 0 and "stored 1 verdicts" in done.stdout, done.stderr
    stored = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert [(s["request_id"], s["acceptable"], s["source"], s["task"]) for s in stored] == \
        [("r-1", False, "client", "banking77")]
    # routenlp check reads them as audited quality (1 of 1 unacceptable: below banking77's target)
    done = _cli("check", "--decisions", str(tmp_path / "d.jsonl"), "--verdicts", str(tmp_path / "v.jsonl"),
                "--target", "banking77=0.92", "--config", str(config), "--thresholds", "none", cwd=ROOT)
    assert "verdicts" in done.stderr, done.stderr


# ----------------------------------------------------------------------------------------- real proxy
def fake_tier_config(work: Path, upstream_port: int, **settings) -> Path:
    """A proxy config whose four tiers are ``openai/...`` deployments on the loopback FakeUpstream
    (tests/fake_upstream.py), no policy file, the paper's start rule."""
    prices = {1: 0.00001, 2: 0.0001, 3: 0.0008, 4: 0.008}
    routenlp = {"router_artifact": str(ROOT / "artifacts/router"), "decision_log_path": str(work / "decisions.jsonl"),
                "verdicts_path": str(work / "verdicts.jsonl"), "shadow_audit": {"fraction": 0.0},
                "tasks": {"banking77": {"kind": "structured", "tau": 0.92}}}
    routenlp.update(settings.pop("routenlp", {}))
    document = {
        "model_list": [{"model_name": "routenlp",
                        "litellm_params": {"model": f"openai/fake-t{k}", "api_key": "not-used",
                                           "api_base": f"http://127.0.0.1:{upstream_port}/t{k}/v1",
                                           "timeout": 30, "max_retries": 0,
                                           "input_cost_per_token": price, "output_cost_per_token": price},
                        "model_info": {"id": f"fake-t{k}", "routenlp_tier": k}} for k, price in prices.items()],
        "litellm_settings": {"callbacks": "litellm_routenlp.proxy_hook.routenlp"},
        "router_settings": {"num_retries": 0, **settings.pop("router_settings", {})},
        "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
        "routenlp_settings": routenlp,
    }
    config = work / "proxy_config.yaml"
    config.write_text(yaml.safe_dump(document, sort_keys=False))
    return config


@pytest.fixture(scope="module")
def verdict_proxy(tmp_path_factory, start_upstream):
    from litellm_routenlp.proxy_process import ProxyProcess, free_port

    upstream = start_upstream()
    work = tmp_path_factory.mktemp("verdicts")
    port = free_port()
    config = fake_tier_config(work, upstream.port, routenlp={"metrics_port": port})
    process = ProxyProcess(config, log_path=work / "proxy.log", cwd=ROOT)
    process.start(timeout=240)
    process.work, process.metrics_port = work, port
    yield process
    process.stop()


@pytest.mark.proxy
def test_the_verdict_route_needs_the_key_and_a_known_request(verdict_proxy):
    import httpx

    proxy = verdict_proxy
    auth = {"Authorization": f"Bearer {proxy.master_key}"}
    reply = httpx.post(proxy.base_url + "/v1/chat/completions", headers=auth, timeout=60,
                       json={"model": "routenlp", "messages": [{"role": "user", "content": "my card has not arrived"}],
                             "metadata": {"task": "banking77"}, "max_tokens": 8})
    assert reply.status_code == 200, reply.text[:300]
    request_id = reply.headers["x-routenlp-request-id"]
    url = proxy.base_url + "/routenlp/verdicts"
    body = {"verdicts": [{"request_id": request_id, "acceptable": False, "note": "wrong intent"}]}
    assert httpx.post(url, json=body, timeout=30).status_code == 401            # no key: LiteLLM's own 401
    wrong = httpx.post(url, json=body, timeout=30, headers={"Authorization": "Bearer sk-wrong"})
    # LiteLLM's own refusal of an unknown key (without a DB: 400 "No connected db" / 401)
    assert wrong.status_code in (400, 401) and "stored" not in wrong.text, wrong.text
    assert not (proxy.work / "verdicts.jsonl").read_text().strip()
    unknown = httpx.post(url, json={"request_id": "not-a-request", "acceptable": True}, headers=auth, timeout=30)
    assert unknown.status_code == 404 and "unknown request id 'not-a-request'" in unknown.json()["error"]["message"]
    bad = httpx.post(url, json={"request_id": request_id, "acceptable": "no"}, headers=auth, timeout=30)
    assert bad.status_code == 400 and "`acceptable` must be true or false" in bad.json()["error"]["message"]
    stored = httpx.post(url, json=body, headers=auth, timeout=30)
    assert stored.status_code == 200, stored.text
    assert stored.json()["stored"][0]["task"] == "banking77"
    assert httpx.post(url, json=body, headers=auth, timeout=30).status_code == 409  # once per request and source
    lines = [json.loads(line) for line in (proxy.work / "verdicts.jsonl").read_text().splitlines()]
    assert [(v["request_id"], v["acceptable"], v["source"], v["note"]) for v in lines] == \
        [(request_id, False, "client", "wrong intent")]
    metrics = httpx.get(f"http://127.0.0.1:{proxy.metrics_port}/metrics", timeout=10).text
    assert 'routenlp_audit_verdicts_total{source="client",task="banking77",verdict="unacceptable"} 1.0' in metrics
