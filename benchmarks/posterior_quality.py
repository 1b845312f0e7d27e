"""How good are the per-tier quality estimates before and after answers (issue 14 items 1 and 2)?

    .venv/bin/python benchmarks/posterior_quality.py [--datasets cascades_9llm routerbench routellm]
        [--seeds 0 1 2] [--out posterior_quality.json]

For each shared all-pairs set and seed, with the benchmark's own split (coopt.bench.data.BenchData.split:
60% train / 20% calibration / 20% test within each task) and the static encoder's cached embeddings:

1. ``train_router`` (frozen static encoder, the DESIGN loss + the acceptance BCE) on the training rows;
   served as the proxy serves it (int8 head).
2. **Ex-ante** (item 1), on the test rows: Brier and log-loss of the acceptance output against
   (a) the per-task acceptance rate of the training rows (the prior: no prompt) and (b) the
   cumulative of the route probabilities (what a format-1 router implies).
3. **Ex-post** (item 2): ``fit_posterior`` on the calibration rows (ex-ante from the same router,
   out of sample there), evaluated on the test rows for answered sets S of one and two tiers and
   every target tier j: the posterior against the ex-ante estimate alone, and against the ex-ante
   estimate recalibrated on the calibration rows (the same fit with every answer signal removed), so
   the gain of the answers is not confused with recalibration.

Log-loss clips probabilities to [1e-6, 1 - 1e-6].  Mean and standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from calibration.quality_estimators import bench_outputs, fit_posterior  # noqa: E402
from coopt.bench.data import BenchData, default_cache_path  # noqa: E402
from coopt.bench.datasets import load_shared  # noqa: E402
from coopt.train_router import train_router  # noqa: E402
from litellm_routenlp.quality_estimates import signals_of_row  # noqa: E402
from litellm_routenlp.router_model import RouterModel  # noqa: E402

ENCODER_DIR = ROOT / "artifacts" / "encoder-static"


def brier_logloss(p: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    y = np.asarray(y, dtype=np.float64)
    return float(np.mean((p - y) ** 2)), float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))


def one_seed(data: BenchData, outputs: list, seed: int, sets: list[tuple[int, ...]]) -> dict[str, Any]:
    split = data.split(seed)
    with tempfile.TemporaryDirectory(prefix="posterior-quality-") as scratch:
        train_router([data.records[i] for i in split.train], data.portfolio, Path(scratch) / "router",
                     encoder_dir=ENCODER_DIR, cache_path=default_cache_path(ENCODER_DIR), seed=seed)
        model = RouterModel.load(Path(scratch) / "router", quantized=True, with_encoder=False)

    def ex_ante(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.array([model.task_index(task) for task in data.task_names[rows]], dtype=np.int64)
        return model.predict_both_from_embeddings(data.embeddings[rows], ids)

    route_calib, accept_calib = ex_ante(split.calib)
    route_test, accept_test = ex_ante(split.test)
    y_test = data.acceptable[split.test]
    prior = np.zeros_like(accept_test)
    for task in np.unique(data.task_names[split.test]):
        train_mask = data.task_names[split.train] == task
        rate = (data.acceptable[split.train][train_mask].sum(axis=0) + 1.0) / (train_mask.sum() + 2.0)
        prior[data.task_names[split.test] == task] = rate
    cumulative = np.clip(np.cumsum(route_test, axis=1), 0, 1)
    result: dict[str, Any] = {"seed": seed, "n_train": len(split.train), "n_calib": len(split.calib),
                              "n_test": len(split.test), "ex_ante": {}, "posterior": {}}
    for name, estimate in (("head", accept_test), ("prior", prior), ("cumulative", cumulative)):
        result["ex_ante"][name] = {"all": brier_logloss(estimate, y_test),
                                   "by_tier": [brier_logloss(estimate[:, k], y_test[:, k]) for k in range(data.K)]}

    tasks_calib = data.task_names[split.calib].tolist()
    started = time.perf_counter()
    estimator = fit_posterior(tasks_calib, accept_calib, data.acceptable[split.calib], data.uncertainty[split.calib],
                              [outputs[i] for i in split.calib], sets=sets, seed=seed)
    result["fit_seconds"] = time.perf_counter() - started
    recalibrated = fit_posterior(tasks_calib, accept_calib, data.acceptable[split.calib], None, None, sets=sets,
                                 seed=seed)
    for answered in sets:
        post, recal = [], []
        for position, row in enumerate(split.test):
            task = data.task_names[row]
            post.append(estimator.predict(task, accept_test[position],
                                          signals_of_row(data.uncertainty[row], outputs[row], answered)))
            recal.append(recalibrated.predict(task, accept_test[position],
                                              signals_of_row(np.full(data.K, np.nan), None, answered)))
        post, recal = np.stack(post), np.stack(recal)
        result["posterior"][",".join(map(str, answered))] = {
            "posterior": [brier_logloss(post[:, k], y_test[:, k]) for k in range(data.K)],
            "ex_ante": [brier_logloss(accept_test[:, k], y_test[:, k]) for k in range(data.K)],
            "ex_ante_recalibrated": [brier_logloss(recal[:, k], y_test[:, k]) for k in range(data.K)]}
    return result


def summarise(runs: list[dict[str, Any]], K: int) -> list[str]:
    lines = []

    def stat(values: list[float]) -> str:
        return f"{np.mean(values):.4f}±{np.std(values):.4f}"

    lines.append("  ex-ante on test rows (all tiers): Brier / log-loss")
    for name in ("head", "prior", "cumulative"):
        brier = [run["ex_ante"][name]["all"][0] for run in runs]
        logloss = [run["ex_ante"][name]["all"][1] for run in runs]
        per_tier = " ".join(stat([run["ex_ante"][name]["by_tier"][k][1] for run in runs]) for k in range(K))
        lines.append(f"    {name:<11} {stat(brier)} / {stat(logloss)}   log-loss by tier: {per_tier}")
    lines.append("  ex-post on test rows: log-loss of P(T_j acceptable) [posterior | ex-ante | ex-ante recalibrated]")
    for key in runs[0]["posterior"]:
        cells = []
        for k in range(K):
            values = [stat([run["posterior"][key][kind][k][1] for run in runs])
                      for kind in ("posterior", "ex_ante", "ex_ante_recalibrated")]
            cells.append(f"T{k + 1}: {values[0]} | {values[1]} | {values[2]}")
        lines.append(f"    S={{{key}}}  " + "   ".join(cells))
    lines.append("  ex-post Brier [posterior | ex-ante]: " + "; ".join(
        f"S={{{key}}} " + " ".join(f"T{k + 1} {np.mean([r['posterior'][key]['posterior'][k][0] for r in runs]):.4f}|"
                                     f"{np.mean([r['posterior'][key]['ex_ante'][k][0] for r in runs]):.4f}"
                                     for k in range(K)) for key in runs[0]["posterior"]))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["cascades_9llm", "routerbench", "routellm"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    report: dict[str, Any] = {}
    for name in args.datasets:
        records, portfolio = load_shared(name)
        data = BenchData(records, portfolio)
        data.load_embeddings(ENCODER_DIR)
        outputs = bench_outputs(data)
        sets = [combo for size in (1, 2) for combo in combinations(range(1, data.K + 1), size)]
        runs = [one_seed(data, outputs, seed, sets) for seed in args.seeds]
        report[name] = runs
        print(f"{name}: n={data.n}, K={data.K}, uncertainty on tiers "
              f"{[k + 1 for k in range(data.K) if data.has_uncertainty[k]]}, seeds {args.seeds}")
        print("\n".join(summarise(runs, data.K)), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
