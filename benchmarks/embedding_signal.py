"""Is there per-query signal in the prompts' embeddings at all?  (issue 14: why RouteNLP ~ Random on routerbench)

    .venv/bin/python benchmarks/embedding_signal.py [--datasets routerbench cascades_9llm routellm] [--seeds 0 1 2]

For each shared set and seed (the benchmark's own 60/20/20 split and the static encoder's cached
embeddings), a logistic regression (scikit-learn, the model Hybrid LLM's baseline uses) on
[embedding; task one-hot] is fitted on the training rows for two labels per tier k below the top:
"tier k acceptable" and "tier k as good as the top tier" (q_k >= q_top, Hybrid LLM's label).  Its
log-loss on the calibration rows is printed beside the per-task prior's (the training rows'
per-task rate: no prompt).  If the regression does not beat the prior, no router reading these
embeddings can route better than by task, and the router's acceptance head is not to blame.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def logloss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def main() -> int:
    from sklearn.linear_model import LogisticRegression

    from coopt.bench.datasets import materialise
    from coopt.bench.run import default_cache_path, load_bench_data
    from routenlp_core.allpairs import load_portfolio

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["routerbench", "cascades_9llm", "routellm"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--C", type=float, default=0.1, help="inverse L2 strength of the regression")
    parser.add_argument("--encoder", default=str(ROOT / "artifacts/encoder-static"))
    args = parser.parse_args()
    encoder = Path(args.encoder)
    work = ROOT / "artifacts/cache/embedding-signal"
    print(f"{'set':<14} {'label':<22} {'LR log-loss':>12} {'prior':>8} {'gain':>8}   (calibration rows, mean over seeds)")
    for name in args.datasets:
        data_path, portfolio_path = materialise(name, work, None)
        data = load_bench_data([data_path], load_portfolio(portfolio_path))
        data.load_embeddings(encoder, default_cache_path(encoder))
        for k in range(data.K - 1):
            labels = {f"T{k + 1} acceptable": data.acceptable[:, k],
                      f"T{k + 1} as good as top": data.quality[:, k] >= data.quality[:, -1]}
            for label, values in labels.items():
                y = values.astype(np.int64)
                ours, prior = [], []
                for seed in args.seeds:
                    split = data.split(seed, (0.6, 0.2, 0.2))
                    train, calib = split.train, split.calib
                    base = np.zeros(len(calib))
                    for task in np.unique(data.task_ids[calib]):
                        base[data.task_ids[calib] == task] = y[train][data.task_ids[train] == task].mean()
                    prior.append(logloss(base, y[calib]))
                    if len(np.unique(y[train])) < 2:
                        ours.append(prior[-1])
                        continue
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        model = LogisticRegression(C=args.C, max_iter=500).fit(data.features(train), y[train])
                    ours.append(logloss(model.predict_proba(data.features(calib))[:, 1], y[calib]))
                print(f"{name:<14} {label:<22} {np.mean(ours):>12.4f} {np.mean(prior):>8.4f} "
                      f"{np.mean(prior) - np.mean(ours):>+8.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
