"""Router training and conformal calibration on the shared multi-model result sets.

    .venv/bin/python benchmarks/router_training_report.py [--out report.json] [--seed 0]

For each set (every query answered by real LLMs, loaded by :mod:`coopt.multimodel`):

* cascades_9llm MedMCQA (1,000) and TruthfulQA (517): llama3.2-1b, llama3.1-8b, llama3.1-70b, gpt-4o;
* RouterBench 0-shot test split, ARC-Challenge + MBPP + Winogrande (945, three tasks): mistral-7b,
  mixtral-8x7b, gpt-3.5-turbo, gpt-4;
* RouteLLM MMLU (14,037) and GSM8K (1,307): Mixtral-8x7B, GPT-4;
* a control where the tasks need different tiers: RouterBench *train* split, 300 ARC-Challenge + 299
  MBPP queries, two tiers (mistral-7b, gpt-4).  Mistral-7B answers 2/3 of ARC but 1/3 of MBPP, so the
  cheapest acceptable tier is mostly T1 for one task and mostly T2 for the other.  In every other
  set T1 is every task's most common label, so no router can beat the majority tier by much there
  unless the prompt text itself predicts difficulty;

it trains the router (frozen MiniLM encoder, DESIGN §3 loss, seeded, one thread, 15% validation
split per task) on the whole set and prints n, training time, validation accuracy against the
majority-tier baseline (the most common training label, one tier for every query), and validation
cross-entropy against the label prior (each task's training label frequencies).

For the cascades_9llm sets (the only ones with a per-answer uncertainty signal) it also calibrates
the cascade thresholds under a router, as DESIGN §3 asks: a router is trained on a disjoint
``--router-fraction`` of the queries; the rest is split 50/50 into calibration and held-out queries;
delta[tier][task] is fitted on the calibration queries that reach each tier under that router
(:func:`calibration.calibrate.calibrate`, risk rule, alpha 0.05), and the violation rate
Pr[q < tau and u <= delta] is measured on the held-out queries that reach each tier, replaying the
same routed cascade (:func:`calibration.calibrate.evaluate_thresholds`), with its Wilson 95% interval.  Because the
guarantee is on the expected violation, the mean over ``--repeats`` further random 50/50 splits of
the same queries (same router) is printed beside the one split's rate.

Embeddings are computed once with the exported fp32 ONNX encoder and cached in
``artifacts/cache/benchmark-embeddings-<encoder sha>.safetensors``; the first run embeds about
18,000 prompts (several minutes on one CPU thread), later runs reuse them.  The training time
reported is ``TrainReport.train_seconds`` with that cache warm (embedding time is listed apart).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from calibration.calibrate import (calibrate, deltas_of, evaluate_thresholds, fit_thresholds,  # noqa: E402
                                   router_start_tiers)
from routenlp_core.allpairs import AllPairsRecord, Portfolio, cheapest_acceptable_tier  # noqa: E402
from coopt.multimodel import load_cascades_9llm, load_routellm_evals, load_routerbench  # noqa: E402
from coopt.train_router import EmbeddingCache, sha256_file, train_router  # noqa: E402

ENCODER_DIR = ROOT / "artifacts" / "encoder"
ALPHA = 0.05
ROUTE_CONFIDENCE = 0.5  # proxy_config.yaml's default

SETS: dict[str, Callable[[], tuple[list[AllPairsRecord], Portfolio]]] = {
    "cascades_9llm/medmcqa": lambda: load_cascades_9llm("medmcqa"),
    "cascades_9llm/truthfulqa": lambda: load_cascades_9llm("truthfulqa"),
    "routerbench (arc+mbpp+winogrande)": lambda: load_routerbench(),
    "routellm/mmlu": lambda: load_routellm_evals("mmlu"),
    "routellm/gsm8k": lambda: load_routellm_evals("gsm8k"),
    # tests/test_train_router.py's set where the tasks need different tiers (see the module docstring)
    "routerbench train arc+mbpp, 2 tiers": lambda: load_routerbench(
        benchmarks=("arc_challenge", "mbpp"), split="train",
        models=("mistralai/mistral-7b-chat", "gpt-4-1106-preview"), limit=300),
}
CALIBRATED = ("cascades_9llm/medmcqa", "cascades_9llm/truthfulqa")


def default_cache_path(encoder_dir: Path) -> Path:
    sha = sha256_file(encoder_dir / "model.onnx")
    return ROOT / "artifacts" / "cache" / f"benchmark-embeddings-{sha[:16]}.safetensors"


def warm_cache(texts: list[str], encoder_dir: Path, cache_path: Path, chunk: int = 1000) -> float:
    """Embed the texts not yet cached, saving after every ``chunk`` (an interrupted run keeps its work)."""
    from litellm_routenlp.encoder import OnnxSentenceEncoder

    encoder = OnnxSentenceEncoder(encoder_dir, quantized=False, threads=1)
    cache = EmbeddingCache(cache_path, sha256_file(encoder.graph_path))
    started = time.perf_counter()
    unique = list(dict.fromkeys(texts))
    for start in range(0, len(unique), chunk):
        cache.embed(unique[start:start + chunk], encoder)
    return time.perf_counter() - started


def label_shares(records: list[AllPairsRecord], portfolio: Portfolio) -> list[float]:
    labels = np.array([cheapest_acceptable_tier(record, portfolio) for record in records])
    return [float(np.mean(labels == k)) for k in range(len(portfolio.tiers))]


def train_section(name: str, records: list[AllPairsRecord], portfolio: Portfolio, work: Path, cache_path: Path,
                  seed: int, embed_seconds: float) -> dict[str, Any]:
    report = train_router(records, portfolio, work / "router", encoder_dir=ENCODER_DIR, cache_path=cache_path,
                          seed=seed)
    return {"set": name, "tiers": [tier.model for tier in portfolio.tiers], "tasks": sorted(portfolio.tasks),
            "n": len(records), "n_train": report.n_train, "n_val": report.n_val,
            "label_shares": label_shares(records, portfolio), "embed_seconds": embed_seconds,
            "train_seconds": report.train_seconds, "epochs_run": report.epochs_run, "best_epoch": report.best_epoch,
            "val_accuracy": report.val_accuracy, "majority_baseline_accuracy": report.majority_baseline_accuracy,
            "val_route_ce": report.val_route_ce, "prior_baseline_ce": report.prior_baseline_ce,
            "per_task": report.per_task}


def repeated_splits(records: list[AllPairsRecord], portfolio: Portfolio, start: np.ndarray, repeats: int,
                    seed: int) -> dict[tuple[str, str], list[float]]:
    """Held-out violation per (tier, task) over ``repeats`` other random 50/50 splits (same router).

    One split's held-out rate is one draw: conformal risk control bounds its *expectation*, so the
    mean over many splits is what to compare with alpha.
    """
    out: dict[tuple[str, str], list[float]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for repeat in range(repeats):
            order = np.random.default_rng([seed, 1 + repeat]).permutation(len(records))
            cal, held = np.sort(order[:len(order) // 2]), np.sort(order[len(order) // 2:])
            fitted = fit_thresholds([records[i] for i in cal], portfolio, start[cal], ALPHA, "risk")
            deltas = {tier: {task: cell["delta"] for task, cell in cells.items()} for tier, cells in fitted.items()}
            measured = evaluate_thresholds([records[i] for i in held], portfolio, deltas, start[held])
            for tier, cells in measured.items():
                for task, cell in cells.items():
                    if cell["n"]:
                        out.setdefault((tier, task), []).append(cell["violation"])
    return out


def calibration_section(name: str, records: list[AllPairsRecord], portfolio: Portfolio, work: Path,
                        cache_path: Path, seed: int, router_fraction: float, repeats: int) -> dict[str, Any]:
    """Router on a disjoint share; calibrate on half the rest under it; measure on the other half."""
    from litellm_routenlp.router_model import RouterModel

    order = np.random.default_rng(seed).permutation(len(records))
    n_router = int(round(len(records) * router_fraction))
    rest = order[n_router:]
    n_cal = len(rest) // 2
    router_rows, cal_rows, held_rows = order[:n_router], rest[:n_cal], rest[n_cal:]
    router_records = [records[i] for i in sorted(router_rows)]
    cal_records = [records[i] for i in sorted(cal_rows)]
    held_records = [records[i] for i in sorted(held_rows)]
    train_router(router_records, portfolio, work / "calib_router", encoder_dir=ENCODER_DIR, cache_path=cache_path,
                 seed=seed)
    router = RouterModel.load(work / "calib_router", encoder_dir=ENCODER_DIR, quantized=True)  # as the proxy serves it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        document = calibrate(cal_records, portfolio, router_artifact=router, alpha=ALPHA, n_calib=len(cal_records),
                             route_confidence=ROUTE_CONFIDENCE, seed=seed)
    held_start = router_start_tiers(held_records, router, ROUTE_CONFIDENCE)
    held = evaluate_thresholds(held_records, portfolio, deltas_of(document), start_tiers=held_start)
    pool = [records[i] for i in sorted(rest)]
    repeated = repeated_splits(pool, portfolio, router_start_tiers(pool, router, ROUTE_CONFIDENCE), repeats, seed)
    rows = []
    for tier in portfolio.tier_names:
        for task, cell in document["thresholds"][tier].items():
            out = held[tier].get(task, {"n": 0, "violation": 0.0, "wilson_95": [0.0, 1.0]})
            draws = repeated.get((tier, task), [])
            rows.append({"tier": tier, "model": portfolio.tiers[portfolio.tier_index(tier)].model, "task": task,
                         "n_cal": cell["n"], "delta": cell["delta"], "cal_violation": cell["violation"],
                         "n_heldout": out["n"], "heldout_violation": out["violation"],
                         "heldout_wilson_95": out["wilson_95"],
                         "repeated_heldout_violation": ({"splits": len(draws), "mean": float(np.mean(draws)),
                                                         "min": float(np.min(draws)), "max": float(np.max(draws))}
                                                        if draws else None)})
    return {"set": name, "n_router": len(router_records), "n_cal": len(cal_records), "n_heldout": len(held_records),
            "heldout_start_tiers": [int(np.sum(held_start == k)) for k in range(1, len(portfolio.tiers) + 1)],
            "repeats": repeats, "rows": rows, "notes": sorted({str(w.message) for w in caught})}


def _f(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_report(training: list[dict[str, Any]], calibration: list[dict[str, Any]], args: argparse.Namespace,
                 total_seconds: float) -> None:
    print("## Router training on the shared multi-model sets\n")
    encoder_name = json.loads((ENCODER_DIR / "encoder.json").read_text()).get("name", str(ENCODER_DIR))
    print(f"Frozen {encoder_name} encoder (ONNX fp32) + 64-d task embedding + MLP 256; seed {args.seed}; "
          "validation = 15% of each task; one CPU thread.\n")
    print("| set | tiers (T1..Tk) | n | train / val | label share T1..Tk | train s | epochs (best) "
          "| val accuracy | majority tier | val CE | label prior CE |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for row in training:
        shares = " / ".join(f"{share:.2f}" for share in row["label_shares"])
        print(f"| {row['set']} | {', '.join(m.split('/')[-1] for m in row['tiers'])} | {row['n']} "
              f"| {row['n_train']} / {row['n_val']} | {shares} | {row['train_seconds']:.1f} "
              f"| {row['epochs_run']} ({row['best_epoch']}) | {row['val_accuracy']:.3f} "
              f"| {row['majority_baseline_accuracy']:.3f} | {row['val_route_ce']:.3f} | {row['prior_baseline_ce']:.3f} |")
    multi = [row for row in training if len(row["per_task"]) > 1]
    if multi:
        print("\nPer task (multi-task sets; majority = that task's most common training label):\n")
        print("| set | task | n val | val accuracy | task majority | val CE | task prior CE |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for row in multi:
            for task, cell in row["per_task"].items():
                print(f"| {row['set']} | {task} | {cell['n_val']} | {cell['val_accuracy']:.3f} "
                      f"| {cell['majority_baseline_accuracy']:.3f} | {cell['val_route_ce']:.3f} "
                      f"| {cell['prior_baseline_ce']:.3f} |")
    embed = sum(row["embed_seconds"] for row in training)
    print(f"\nLabel = cheapest tier whose answer meets tau (the top tier when none does). \"majority tier\" "
          f"always predicts the most common training label; \"label prior CE\" predicts each task's training "
          f"label frequencies (Laplace-smoothed). Embedding in this run: {embed:.0f} s (0 when cached).")
    for section in calibration:
        print(f"\n## Conformal calibration under the router: {section['set']}\n")
        print(f"Router trained on {section['n_router']} queries; thresholds fitted on {section['n_cal']} calibration "
              f"queries and measured on {section['n_heldout']} held-out queries (50/50 split of the rest), "
              f"each replaying the routed cascade (route_confidence {ROUTE_CONFIDENCE}, alpha {ALPHA}, risk rule). "
              f"Held-out queries routed to T1..Tk: {' / '.join(map(str, section['heldout_start_tiers']))}.\n")
        print(f"| tier | model | task | n cal | delta | cal violation | n held-out | held-out violation "
              f"| Wilson 95% CI | mean held-out violation, {section['repeats']} splits (min-max) |")
        print("|---|---|---|---:|---:|---:|---:|---:|---|---|")
        for row in section["rows"]:
            low, high = row["heldout_wilson_95"]
            draws = row["repeated_heldout_violation"]
            spread = "-" if draws is None else f"{draws['mean']:.3f} ({draws['min']:.3f}-{draws['max']:.3f})"
            print(f"| {row['tier']} | {row['model']} | {row['task']} | {row['n_cal']} | {_f(row['delta'], 4)} "
                  f"| {_f(row['cal_violation'])} | {row['n_heldout']} | {_f(row['heldout_violation'])} "
                  f"| [{low:.3f}, {high:.3f}] | {spread} |")
        print("\nviolation = Pr[q < tau and u <= delta] among the queries reaching the tier; the top tier never "
              "escalates (delta -), its violation is its plain error rate. delta 0.0 = escalate every answer "
              "with u > 0 (too few calibration queries to certify alpha). Conformal risk control bounds the "
              "*expected* violation by alpha; one split's held-out rate scatters around it, so the last column "
              "refits and remeasures on other random 50/50 splits of the same non-router queries.")
        unreached = [row["tier"] for row in section["rows"] if row["n_cal"] == 0]
        for tier in unreached:
            print(f"- note: no calibration query reaches {tier} under this router (it starts no query there and "
                  f"nothing escalates to it), so its delta is the fail-safe placeholder 0.0, not a fitted value")
        for note in section["notes"]:
            if not any(f"tier {tier}," in note for tier in unreached):
                print(f"- note: {note}")
    print(f"\n(total run time {total_seconds:.0f} s)")


def main() -> int:
    global ENCODER_DIR
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="also write every number as JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--router-fraction", type=float, default=0.4,
                        help="share of a cascades set that trains the calibration router (the rest: 50/50)")
    parser.add_argument("--repeats", type=int, default=20,
                        help="extra random calibration/held-out splits for the mean held-out violation")
    parser.add_argument("--cache", type=Path, default=None, help="embedding cache (safetensors)")
    parser.add_argument("--encoder-dir", type=Path, default=ENCODER_DIR,
                        help="exported encoder (MiniLM: artifacts/encoder; static: artifacts/encoder-static)")
    parser.add_argument("--sets", nargs="*", default=list(SETS), choices=list(SETS), metavar="SET",
                        help=f"subset of: {', '.join(SETS)}")
    args = parser.parse_args()
    ENCODER_DIR = args.encoder_dir
    if not (ENCODER_DIR / "model.onnx").is_file():
        print(f"missing {ENCODER_DIR}/model.onnx: run `routenlp export-encoder` first", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's quantiser chatter on the root logger
    logging.getLogger("calibration").addHandler(logging.NullHandler())  # notes are collected instead
    logging.getLogger("calibration").propagate = False
    cache_path = args.cache or default_cache_path(ENCODER_DIR)
    started = time.perf_counter()
    training, calibration = [], []
    with tempfile.TemporaryDirectory(prefix="routenlp-report-") as scratch:
        for position, name in enumerate(args.sets):
            records, portfolio = SETS[name]()
            print(f"[{name}] {len(records)} queries: embedding ...", file=sys.stderr, flush=True)
            embed_seconds = warm_cache([record.prompt for record in records], ENCODER_DIR, cache_path)
            print(f"[{name}] training ...", file=sys.stderr, flush=True)
            work = Path(scratch) / f"set{position}"
            training.append(train_section(name, records, portfolio, work, cache_path, args.seed, embed_seconds))
            if name in CALIBRATED:
                print(f"[{name}] calibrating ...", file=sys.stderr, flush=True)
                calibration.append(calibration_section(name, records, portfolio, work, cache_path, args.seed,
                                                       args.router_fraction, args.repeats))
    total = time.perf_counter() - started
    print_report(training, calibration, args, total)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"seed": args.seed, "alpha": ALPHA, "route_confidence": ROUTE_CONFIDENCE,
                                        "router_fraction": args.router_fraction, "training": training,
                                        "calibration": calibration, "total_seconds": total}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
