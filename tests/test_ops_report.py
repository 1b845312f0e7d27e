"""``routenlp report`` / ``routenlp check`` (coopt/ops_report.py) on recorded decision logs.

- a small log in the plugin's record format (attempts built from the cascade's own ``Attempt``), with a
  corrupt line, a failed and a retracted request: every figure checked against values computed by hand;
- ``tests/data/ops_report_decisions.jsonl``, recorded from the real proxy (default proxy_config.yaml,
  real test-split queries of banking77 / clinc150 / bitext, see the README section): figures checked
  against an independent pass over the raw JSON lines;
- drift alerts: a shifted escalation rate fires, the baseline log and a small noisy window do not;
  audited quality below target fires, at target does not;
- the HTML page rendered by real headless Chromium and the screenshot checked as a picture.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from coopt.ops_report import build_report, load_requests, parse_when, parse_window, render_html, wilson
from litellm_routenlp.cascade import Attempt
from routenlp_cli.cli import main

ROOT = Path(__file__).resolve().parent.parent
RECORDED = ROOT / "tests/data/ops_report_decisions.jsonl"
CHROMIUM = "/usr/bin/chromium"
T0 = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
NO_THRESHOLDS = ["--thresholds", "/nonexistent/thresholds.json"]


def attempt(tier: int, cost: float, escalated: bool = False, uncertainty: float = 0.3) -> dict:
    raw = asdict(Attempt(tier=tier, tier_name=f"T{tier}", model_id=f"routenlp-t{tier}", uncertainty=uncertainty,
                         threshold=0.5 if tier < 4 else None, cost_usd=cost, latency_ms=12.0, escalated=escalated))
    raw["call_id"] = f"call-{tier}"
    return raw


def record(request_id: str, task: str, minute: float, attempts: list[dict], router_ms: float) -> dict:
    """A decision record with the keys ``RouteNLPCallback._finish`` writes."""
    final = attempts[-1]["tier_name"] if attempts else None
    return {"request_id": request_id, "client_call_id": f"client-{request_id}",
            "ts": (T0 + timedelta(minutes=minute)).isoformat(), "task": task, "task_status": "known",
            "router": {"probabilities": {}, "routed_tier": attempts[0]["tier_name"] if attempts else None,
                       "wanted_tier": None, "reason": "test", "healthy_tiers": ["T1", "T2", "T3", "T4"],
                       "router_ms": router_ms},
            "attempts": attempts, "final_tier": final, "total_cost_usd": sum(a["cost_usd"] for a in attempts),
            "total_latency_ms": 40.0, "escalation_error": None, "escalation_skipped": None, "stream": False,
            "key_alias": None, "prompt": f"query {request_id}"}


def write_log(path: Path, lines: list) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for line in lines:
            handle.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


@pytest.fixture()
def small_log(tmp_path):
    return write_log(tmp_path / "decisions.jsonl", [
        record("old", "banking77", -24 * 60, [attempt(1, 0.5)], 99.0),           # before --since
        record("r1", "banking77", 0, [attempt(1, 0.001)], 2.0),
        record("r2", "banking77", 1, [attempt(1, 0.001, True), attempt(4, 0.08)], 4.0),
        '{"request_id": "torn", "task": "bank',                                     # line 4: corrupt
        record("r3", "banking77", 2, [attempt(4, 0.12)], 6.0),
        record("r4", "bitext", 3, [attempt(2, 0.01)], 8.0),
        record("r5", "bitext", 4, [attempt(2, 0.01, True), attempt(3, 0.05, True), attempt(4, 0.40)], 10.0),
        record("r6", "clinc150", 5, [attempt(1, 0.002)], 1.0),
        {"request_id": "r6", "ts": (T0 + timedelta(minutes=5.1)).isoformat(), "outcome": "failed_after_answer",
         "attempts": [], "final_tier": None, "error": "lost"},                     # retracts r6
        {"request_id": "r7", "ts": (T0 + timedelta(minutes=6)).isoformat(), "task": "bitext",
         "router": {"routed_tier": "T2"}, "attempts": [], "final_tier": None, "error": "APIError: down"},
    ])


def test_figures_match_hand_computed_values(small_log):
    since = T0 - timedelta(hours=1)
    records, scan = load_requests([small_log], since=since)
    report = build_report(records, scan, since=since, top_tier="T4")
    t = report["totals"]
    # served in the window: r1..r5 (old is before the window, r6 retracted, r7 failed without an answer)
    assert t["requests"] == 5 and t["failed_requests"] == 1 and t["escalated_requests"] == 2
    assert t["spend_usd"] == pytest.approx(0.001 + 0.081 + 0.12 + 0.01 + 0.46)          # 0.672
    bank, bitext = report["tasks"]["banking77"], report["tasks"]["bitext"]
    # banking77: T4 answered r2 (0.08) and r3 (0.12): mean 0.10 x 3 requests
    assert bank["top_tier_mean_cost_usd"] == pytest.approx(0.10) and bank["all_top_usd"] == pytest.approx(0.30)
    assert bank["savings_usd"] == pytest.approx(0.30 - 0.202)
    assert bitext["all_top_usd"] == pytest.approx(0.80) and bitext["savings_usd"] == pytest.approx(0.33)
    assert t["all_top_usd"] == pytest.approx(1.10) and t["savings_usd"] == pytest.approx(0.428)
    assert t["savings_pct"] == pytest.approx(100 * 0.428 / 1.10)
    assert bank["tier_shares"] == pytest.approx({"T1": 1 / 3, "T4": 2 / 3})
    assert bitext["tier_shares"] == pytest.approx({"T2": 0.5, "T4": 0.5})
    assert "clinc150" not in report["tasks"]
    esc = report["escalation"]
    assert (esc["banking77"]["T1"]["escalated"], esc["banking77"]["T1"]["n"]) == (1, 2)
    assert (esc["bitext"]["T2"]["rate"], esc["bitext"]["T3"]["rate"]) == (0.5, 1.0)
    assert "T4" not in esc["banking77"]                                    # the top tier never escalates
    assert esc["banking77"]["T1"]["wilson_95"] == pytest.approx([0.0945, 0.9055], abs=1e-4)  # Wilson 1/2
    # router latency over r1..r5: [2, 4, 6, 8, 10] -> p50 6, p99 (linear) 2 + 0.99 * 4 * 2
    assert report["router_latency"] == {"n": 5, "p50_ms": 6.0, "p99_ms": pytest.approx(9.92)}
    assert len(report["warnings"]) == 1
    assert report["warnings"][0].startswith(f"{small_log}:4: corrupt decision record, skipped (JSONDecodeError")
    assert report["audited"] is None and report["alerts"] == []


def test_cli_report_names_the_corrupt_line_reads_the_rest_and_strict_says_so(small_log, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["report", "--decisions", str(small_log), *NO_THRESHOLDS, "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"warning: {small_log}:4: corrupt decision record" in captured.err
    assert "requests 6" in captured.out and "no verdicts" in captured.out  # no window: "old" counts too
    assert json.loads(out.read_text())["totals"]["requests"] == 6
    assert main(["report", "--decisions", str(small_log), *NO_THRESHOLDS, "--strict"]) == 3
    assert main(["check", "--decisions", str(small_log), *NO_THRESHOLDS, "--strict"]) == 3
    assert main(["report", "--decisions", str(tmp_path / "missing.jsonl")]) == 2


def test_window_parsing():
    now = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)
    assert parse_when("24h", now) == now - timedelta(hours=24)
    assert parse_when("90m", now) == now - timedelta(minutes=90)
    assert parse_when("2026-12-01T10:00", now) == datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc)
    assert parse_when("2026-12-01T10:00+02:00", now).utcoffset() == timedelta(hours=2)
    with pytest.raises(ValueError, match="relative like 24h"):
        parse_when("yesterday", now)
    assert parse_when("2026-12-01T10:00Z", now) == datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc)
    with pytest.raises(ValueError, match="is not before --until"):
        parse_window("1h", "2h", now)


def test_recorded_proxy_log_figures_match_an_independent_pass():
    raw = [json.loads(line) for line in RECORDED.read_text().splitlines() if line.strip()]
    served = [r for r in raw if r.get("attempts")]
    assert len(served) >= 100 and {r["task"] for r in served} == {"banking77", "clinc150", "bitext"}
    records, scan = load_requests([RECORDED])
    report = build_report(records, scan, top_tier="T4")
    assert scan.warnings == []
    assert report["totals"]["requests"] == len(served)
    assert report["totals"]["spend_usd"] == pytest.approx(sum(r["total_cost_usd"] for r in served))
    for task in ("banking77", "clinc150", "bitext"):
        rows = [r for r in served if r["task"] == task]
        top = [a["cost_usd"] for r in rows for a in r["attempts"] if a["tier_name"] == "T4" and a["error"] is None]
        if top:
            assert report["tasks"][task]["all_top_usd"] == pytest.approx(np.mean(top) * len(rows))
        shares = {tier: sum(r["final_tier"] == tier for r in rows) / len(rows) for tier in {r["final_tier"] for r in rows}}
        assert report["tasks"][task]["tier_shares"] == pytest.approx(shares)
        for tier, cell in report["escalation"][task].items():
            answered = [a for r in rows for a in r["attempts"] if a["tier_name"] == tier and a["error"] is None]
            assert (cell["n"], cell["escalated"]) == (len(answered), sum(a["escalated"] for a in answered))
    ms = sorted(r["router"]["router_ms"] for r in served)
    assert report["router_latency"]["p50_ms"] == pytest.approx(float(np.median(ms)))
    assert 0 < report["router_latency"]["p50_ms"] < 50


# ----------------------------------------------------------------------------------- drift alerts


def escalation_log(path: Path, n: int, escalate_every: list[bool]) -> Path:
    """banking77 requests at T1; request i escalates to T4 when ``escalate_every[i % len]``."""
    lines = []
    for i in range(n):
        up = escalate_every[i % len(escalate_every)]
        attempts = [attempt(1, 0.001, up)] + ([attempt(4, 0.1)] if up else [])
        lines.append(record(f"{path.stem}-{i}", "banking77", i * 0.5, attempts, 1.0))
    return write_log(path, lines)


def test_escalation_drift_fires_on_a_shift_and_not_on_baseline_or_noise(tmp_path, capsys):
    base = escalation_log(tmp_path / "base.jsonl", 400, [True] + [False] * 4)                       # 20%
    shifted = escalation_log(tmp_path / "shifted.jsonl", 400, [True] * 7 + [False] * 13)            # 35%
    noisy = escalation_log(tmp_path / "noisy.jsonl", 60, [True] + [False] * 3)                      # 25%, n=60
    baseline = tmp_path / "baseline.json"
    assert main(["report", "--decisions", str(base), *NO_THRESHOLDS, "--json", str(baseline)]) == 0
    assert json.loads(baseline.read_text())["escalation"]["banking77"]["T1"]["rate"] == pytest.approx(0.2)
    capsys.readouterr()

    assert main(["check", "--decisions", str(base), *NO_THRESHOLDS, "--baseline", str(baseline)]) == 0
    assert capsys.readouterr().out.strip() == "ok"
    # 25% > 1.1 x 20% as a raw rate, but 15/60 is within noise: the Wilson lower bound is below 22%
    assert 0.25 > 1.1 * 0.2 and wilson(15, 60)[0] < 1.1 * 0.2
    assert main(["check", "--decisions", str(noisy), *NO_THRESHOLDS, "--baseline", str(baseline)]) == 0
    assert capsys.readouterr().out.strip() == "ok"

    assert main(["check", "--decisions", str(shifted), *NO_THRESHOLDS, "--baseline", str(baseline)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ALERT escalation_drift task=banking77 tier=T1: escalation rate 35.0%")
    assert "> 1.1 x baseline 20.0%" in lines[0]


def test_baseline_from_a_thresholds_file_that_records_escalation_rates(tmp_path, capsys):
    shifted = escalation_log(tmp_path / "shifted.jsonl", 400, [True] * 7 + [False] * 13)
    thresholds = tmp_path / "thresholds.json"
    thresholds.write_text(json.dumps({"format_version": 2, "alpha": 0.05, "thresholds": {
        "T1": {"banking77": {"delta": 0.5, "n": 300, "escalation_rate": 0.30}}}}))
    assert main(["check", "--decisions", str(shifted), "--thresholds", str(thresholds)]) == 0   # 35%: lower 30.5%
    thresholds.write_text(json.dumps({"format_version": 2, "alpha": 0.05, "thresholds": {
        "T1": {"banking77": {"delta": 0.5, "n": 300, "escalation_rate": 0.20}}}}))
    assert main(["check", "--decisions", str(shifted), "--thresholds", str(thresholds)]) == 1
    assert "calibration" in capsys.readouterr().err


def test_audited_quality_below_target_fires_and_at_target_does_not(tmp_path, capsys):
    log = escalation_log(tmp_path / "d.jsonl", 200, [False])
    verdicts = tmp_path / "verdicts.jsonl"

    def write_verdicts(acceptable: int, total: int) -> None:
        write_log(verdicts, [{"request_id": f"d-{i}", "acceptable": i < acceptable, "source": "shadow_audit"}
                             for i in range(total)] + ["not json", {"request_id": "d-1"}])

    thresholds = tmp_path / "thresholds.json"   # target 1 - alpha = 0.95 for the tasks it lists
    thresholds.write_text(json.dumps({"alpha": 0.05, "thresholds": {"T1": {"banking77": {"delta": 0.5}}}}))
    write_verdicts(188, 200)                    # 94%: upper bound above 95%
    assert main(["check", "--decisions", str(log), "--thresholds", str(thresholds), "--verdicts", str(verdicts)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "ok" and f"{verdicts}:201: corrupt verdict" in captured.err
    assert f"{verdicts}:202: verdict needs `request_id`" in captured.err
    write_verdicts(170, 200)                    # 85%: upper bound 89.3% < 95%
    assert main(["check", "--decisions", str(log), "--thresholds", str(thresholds), "--verdicts", str(verdicts)]) == 1
    assert capsys.readouterr().out.startswith("ALERT audited_quality task=banking77: audited acceptable 85.0% (170/200")
    # a target given on the command line wins over the file's
    assert main(["check", "--decisions", str(log), "--thresholds", str(thresholds), "--verdicts", str(verdicts),
                 "--target", "banking77=0.85"]) == 0


# ----------------------------------------------------------------------------------- HTML in Chromium


def screenshot(page: Path, png: Path, profile: Path, chromium: str = CHROMIUM) -> None:
    if not Path(chromium).is_file():
        pytest.fail(f"{chromium} not found: the HTML report test renders the page in real headless Chromium; "
                    "install it with `apt-get install -y chromium` (.ci/run does this)")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1200,1600",
                    page.resolve().as_uri()], check=True, capture_output=True, timeout=120)


def test_missing_chromium_fails_and_says_how_to_get_it(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y chromium"):
        screenshot(tmp_path / "x.html", tmp_path / "x.png", tmp_path, chromium=str(tmp_path / "no-chromium"))


def near(image: np.ndarray, colour: tuple[int, int, int], tolerance: int = 40) -> int:
    return int((np.abs(image[..., :3].astype(int) - np.array(colour)).max(axis=-1) <= tolerance).sum())


@pytest.mark.timeout(300)
def test_html_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    records, scan = load_requests([RECORDED])
    page = tmp_path / "report.html"
    text = render_html(build_report(records, scan, top_tier="T4", sources=[RECORDED.name]))
    page.write_text(text)
    assert "http://" not in text and "https://" not in text                         # self-contained
    assert text.count("src='data:image/png;base64,") == 3
    png = tmp_path / "shot.png"
    screenshot(page, png, tmp_path / "profile")
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape == (1600, 1200, 3)
    colours = len(np.unique(image.reshape(-1, 3), axis=0))
    assert colours > 500, f"only {colours} distinct colours: the page looks blank"
    white = (image.min(axis=-1) >= 250).mean()
    assert 0.3 < white < 0.97, f"{white:.0%} white"
    assert near(image, (192, 57, 43)) > 300      # the all-T4 line (#c0392b) of the spend plot
    assert near(image, (36, 113, 163)) > 300     # the spend line (#2471a3)
    assert near(image, (68, 1, 84), 50) > 5000   # the T1 band of the tier-share bars (viridis)


# ----------------------------------------------------------------------------------- LiteLLM spend logs

SPEND_ROWS = """
import json, sys
sys.path.insert(0, "tests")
import test_coopt_logs as t
rows = t.spend_rows.__wrapped__()   # the fixture's body: real litellm.Router calls -> get_logging_payload
json.dump(t._as_spend_logs_json(rows, metadata_as_string=False), open(sys.argv[1], "w"))
"""


def test_report_from_litellm_spend_logs_alone(tmp_path):
    """GET /spend/logs rows built by LiteLLM itself (test_coopt_logs' ``spend_rows``), joined by coopt.logs.

    The rows are made in a child process: run a second time in one process (after test_coopt_logs'
    own run) the fixture body captures no rows (LiteLLM keeps state from the first run)."""
    import sys

    path = tmp_path / "spend_logs.json"
    made = subprocess.run([sys.executable, "-c", SPEND_ROWS, str(path)], cwd=ROOT, timeout=240,
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-3000:]
    rows = json.loads(path.read_text())
    assert len(rows) == 6
    out = tmp_path / "report.json"
    assert main(["report", "--spend-logs-json", str(path), "--config", str(ROOT / "proxy_config.yaml"),
                 *NO_THRESHOLDS, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["top_tier"] == "T4"                              # from the proxy config, not the rows
    assert report["totals"]["requests"] == 3 and report["totals"]["escalated_requests"] == 2
    assert report["totals"]["spend_usd"] == pytest.approx(sum(float(row["spend"]) for row in rows))
    esc = report["escalation"]
    assert (esc["banking77"]["T1"]["escalated"], esc["banking77"]["T1"]["n"]) == (1, 2)
    assert (esc["clinc150"]["T1"]["rate"], esc["clinc150"]["T3"]["rate"]) == (1.0, 1.0)
    assert report["tasks"]["banking77"]["tier_shares"] == pytest.approx({"T1": 0.5, "T4": 0.5})
    assert report["router_latency"]["n"] == 0                      # spend rows carry no router latency
    assert report["tasks"]["banking77"]["all_top_method"] == "observed"

    # without banking77's T4 row the top tier never answered banking77: priced from the proxy config's T4
    # prices (0.008 per token in and out) x each request's token counts, which only the spend rows have
    kept = [row for row in rows if (row["metadata"].get("spend_logs_metadata") or {}).get("routenlp_parent_call_id")
            != "req-escalated-once"]
    assert len(kept) == 5
    path.write_text(json.dumps(kept))
    assert main(["report", "--spend-logs-json", str(path), "--config", str(ROOT / "proxy_config.yaml"),
                 *NO_THRESHOLDS, "--json", str(out)]) == 0
    bank = json.loads(out.read_text())["tasks"]["banking77"]
    client_rows = [row for row in kept if row["litellm_call_id"] in ("req-escalated-once", "req-plain")]
    assert len(client_rows) == 2 and all(row["prompt_tokens"] > 0 for row in client_rows)
    assert bank["all_top_method"] == "priced: T4 prices x tokens (2 of 2 requests)"
    assert bank["all_top_usd"] == pytest.approx(sum(0.008 * (row["prompt_tokens"] + row["completion_tokens"])
                                                    for row in client_rows))


def test_large_logs_get_a_progress_bar(small_log, capsys):
    load_requests([small_log], progress=True)          # what a log over PROGRESS_MIN_BYTES gets
    assert f"reading {small_log.name}" in capsys.readouterr().err
    load_requests([small_log])                         # a small log: no bar
    assert "reading" not in capsys.readouterr().err
