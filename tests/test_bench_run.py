"""``routenlp bench`` end to end: a file a user brings, and a small subset of a real shared set.

Both runs use every registered system, one seed and a short queue simulation, so the whole file
stays well under a minute after the first embedding of the prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from routenlp_core.allpairs import AllPairsRecord, Portfolio, TaskSpec, TierResult, TierSpec, write_allpairs, write_portfolio

ROOT = Path(__file__).resolve().parent.parent
ENCODER = ROOT / "artifacts" / "encoder"
pytestmark = pytest.mark.needs(artifacts=["encoder/model.onnx"])  # missing: fail saying how to build it


def _synthetic_file(folder: Path) -> tuple[Path, Path]:
    """80 queries, two tasks, three tiers; harder-looking prompts need bigger tiers."""
    rng = np.random.default_rng(0)
    portfolio = Portfolio(tiers=(TierSpec("T1", "tiny"), TierSpec("T2", "mid"), TierSpec("T3", "big")),
                          tasks={"tickets": TaskSpec("accuracy", 1.0, "structured"),
                                 "answers": TaskSpec("rougeL", 0.5, "generation")})
    records = []
    for i in range(80):
        task = "tickets" if i % 2 else "answers"
        difficulty = i % 3
        words = ["refund", "order", "password", "invoice", "delivery"][i % 5]
        prompt = f"{'please explain in detail why ' * difficulty}my {words} issue number {i}"
        tiers = {}
        for k in range(3):
            good = k >= difficulty or rng.random() < 0.1
            quality = float(good) if task == "tickets" else float(np.clip(0.3 + 0.3 * good + 0.1 * rng.random(), 0, 1))
            tiers[f"T{k + 1}"] = TierResult(output="a", quality=quality, cost_usd=0.001 * 10 ** k,
                                            latency_ms=20.0 * 3 ** k,
                                            uncertainty=float(np.clip(0.6 - 0.4 * good + 0.1 * rng.random(), 0, 1)))
        records.append(AllPairsRecord(id=f"q{i}", task=task, prompt=prompt, tiers=tiers))
    return write_allpairs(records, folder / "mine.jsonl"), write_portfolio(portfolio, folder / "mine.yaml")


def _recompute_ratio(data_path: Path, decisions: list[dict], system: str, top: str) -> tuple[float, float]:
    """Quality and cost ratios from decisions.jsonl and the data alone (what a reader would do)."""
    from routenlp_core.decision_record import DecisionRecord

    rows = {json.loads(line)["id"]: json.loads(line) for line in data_path.read_text().splitlines() if line}
    by_task: dict[str, list[float]] = {}
    for decision in decisions:
        if decision["system"] != system:
            continue
        record = DecisionRecord.from_dict(decision)  # each line is the proxy's record format
        row = rows[record.request_id]
        q = row["tiers"][record.final_tier]["quality"]
        c = sum(row["tiers"][t]["cost_usd"] for t in record.path)
        sums = by_task.setdefault(row["task"], [0.0, 0.0, 0.0, 0.0, 0])
        sums[0] += q
        sums[1] += c
        sums[2] += row["tiers"][top]["quality"]
        sums[3] += row["tiers"][top]["cost_usd"]
        sums[4] += 1
    n = sum(s[4] for s in by_task.values())
    return (sum(s[4] / n * s[0] / s[2] for s in by_task.values()),
            sum(s[4] / n * s[1] / s[3] for s in by_task.values()))


def test_bench_cli_on_a_file_a_user_brings(tmp_path):
    from coopt.bench.systems import SYSTEMS
    from routenlp_cli.cli import main

    data_path, portfolio_path = _synthetic_file(tmp_path)
    out = tmp_path / "out"
    status = main(["bench", "--data", str(data_path), "--portfolio", str(portfolio_path), "--out", str(out),
                   "--seeds", "1", "--n-arrivals", "2000", "--bootstrap", "100", "--no-progress",
                   "--cache", str(tmp_path / "cache.safetensors"), "--encoder", str(ENCODER)])
    assert status == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["systems"]) == set(SYSTEMS)
    entry = results["systems"]["RouteNLP"]
    for key in ("quality_ratio", "cost_ratio", "p99_ms", "sla_violation"):
        assert set(entry[key]) == {"mean", "std"}
    assert set(entry["tier_shares"]) == {"T1", "T2", "T3"}
    assert results["systems"]["Always-top"]["cost_ratio"]["mean"] == pytest.approx(1.0)
    assert results["split"]["fractions"] == [0.6, 0.2, 0.2]
    decisions = [json.loads(line) for line in (out / "decisions.jsonl").read_text().splitlines()]
    n_test = results["split"]["sizes"]["test"]
    assert len(decisions) == len(SYSTEMS) * n_test
    for system in ("RouteNLP", "FrugalGPT", "AutoMix", "Oracle"):
        quality, cost = _recompute_ratio(data_path, decisions, system, "T3")
        assert quality == pytest.approx(results["systems"][system]["quality_ratio"]["mean"])
        assert cost == pytest.approx(results["systems"][system]["cost_ratio"]["mean"])
    assert "| **RouteNLP** |" in (out / "table.md").read_text()
    for image in ("cost_quality.png", "tier_shares.png"):
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the oracle is a bound: it answers acceptably whenever any tier can, so no system does so more often
    acceptable = {name: entry["acceptable_rate"]["mean"] for name, entry in results["systems"].items()}
    assert acceptable["Oracle"] >= max(acceptable.values()) - 1e-12


def test_bench_rejects_data_and_dataset_together(tmp_path, capsys):
    from routenlp_cli.cli import main

    status = main(["bench", "--data", "x.jsonl", "--portfolio", "p.yaml", "--dataset", "routerbench",
                   "--out", str(tmp_path)])
    assert status == 2
    assert "either --data" in capsys.readouterr().err


def test_bench_on_a_subset_of_a_real_shared_set(tmp_path, data_dir):
    """cascades_9llm (measured cost, latency and logprob uncertainty), 150 queries per task."""
    from coopt.bench.run import BenchConfig, bench_files
    from coopt.bench.queueing import QueueConfig
    from coopt.multimodel import combine, load_cascades_9llm

    records, portfolio = combine(load_cascades_9llm("medmcqa", limit=150, data_dir=data_dir),
                                 load_cascades_9llm("truthfulqa", limit=150, data_dir=data_dir))
    data_path = write_allpairs(records, tmp_path / "cascades.jsonl")
    portfolio_path = write_portfolio(portfolio, tmp_path / "cascades.yaml")
    config = BenchConfig(seeds=1, bootstrap=100, queue=QueueConfig(n_arrivals=2000), encoder_dir=ENCODER,
                         progress=False)
    results = bench_files([data_path], portfolio_path, tmp_path / "out", config, name="cascades-subset")
    systems = results["systems"]
    assert results["data"]["uncertainty_available"] == [True, True, True, True]
    # the paper rule's cascade is calibrated and used: thresholds recorded
    assert "thresholds" in systems["RouteNLP (paper rule)"]["per_seed"][0]["operating_point"]
    # the certified policy (posterior_threshold by default): a certificate per task, from the cross-fitted train + calibration rows; a task
    # that is refused goes to the top tier, a certified one has its threshold
    ours = systems["RouteNLP"]["per_seed"][0]
    point = ours["operating_point"]
    assert point["policy"] == "posterior_threshold" and set(point["certificates"]) == {"medmcqa", "truthfulqa"}
    n_pool = results["split"]["sizes"]["train"] + results["split"]["sizes"]["calibration"]
    assert point["n_certification"] == n_pool
    for task, certificate in point["certificates"].items():
        if point["threshold"][task] is not None:
            assert certificate["certified"], certificate["message"]
        else:  # refused, or the top tier is the cheapest certified choice: the top tier serves the task
            assert ours["per_task"][task]["quality_ratio"] == pytest.approx(1.0) and ours["per_task"][task]["cost_ratio"] == pytest.approx(1.0)
    assert ours["certified"] == all(c["certified"] for c in point["certificates"].values())
    assert set(ours["per_task"]["medmcqa"]) == {"quality_ratio", "cost_ratio", "met_target"}
    assert systems["RouteNLP w/o cascade"]["escalation_rate"]["mean"] == 0.0
    assert systems["Oracle"]["quality_ratio"]["mean"] > 1.0   # some queries only a cheaper tier gets right
    assert systems["Oracle"]["cost_ratio"]["mean"] < systems["Always-top"]["cost_ratio"]["mean"]
    assert set(results["sweeps"]["alpha"]) == {"0.01", "0.05", "0.1", "0.2", "0.3"}
    assert {"shifted", "matched"} <= set(results["sweeps"]["shift"])
    assert results["goal"]["evaluated"]
    assert 0.0 <= systems["RouteNLP"]["sla_violation"]["mean"] <= 1.0
    assert 0.0 < systems["FrugalGPT"]["vs_routenlp"]["cost"]["p"] <= 1.0


def test_cost_at_the_paper_rules_quality_reads_each_tasks_curve_and_weights_by_volume():
    """Issue 14's "cheaper than the paper rule at the quality it reaches": per task the cheapest knob
    value reaching the other rule's task quality, weighted by the task's test rows."""
    from coopt.bench.run import at_quality_of

    mine = [{"curve_points": {"a": {"n": 30, "points": [(1.0, 1.0), (0.98, 0.7), (0.95, 0.4)]},
                              "b": {"n": 10, "points": [(1.0, 1.0), (0.97, 0.5)]}}}]
    paper = [{"quality_ratio": 0.97, "cost_ratio": 0.6,
              "per_task": {"a": {"quality_ratio": 0.96}, "b": {"quality_ratio": 0.99}}}]
    out = at_quality_of(mine, paper)
    # task a: 0.98 >= 0.96 -> 0.7 (0.95 is below); task b: only 1.0 >= 0.99 -> 1.0
    assert out["per_seed"] == [pytest.approx((30 * 0.7 + 10 * 1.0) / 40)]
    assert out["seeds_reached"] == 1
    paper[0]["per_task"]["b"]["quality_ratio"] = 1.01  # no knob value reaches it
    assert at_quality_of(mine, paper)["per_seed"] == [None]
