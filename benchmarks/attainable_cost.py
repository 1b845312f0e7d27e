"""What cost ratio can a policy reach on each shared set at quality ratio 0.97?  (issue 14's cost goals)

    .venv/bin/python benchmarks/attainable_cost.py [--datasets cascades_9llm routerbench routellm]
        [--seeds 0 1 2 3 4] [--target 0.97] [--delta 0.1]

Three reference points per task and set, none of which reads the prompt, printed beside the goals of
issue 14 (cascades_9llm <= 0.45, routerbench <= 0.70, routellm <= 0.72):

1. **No-signal mix, means known** (in hindsight, no certificate): send a share p of the task's
   queries, picked at random, to one tier below the top and the rest to the top tier, with p as
   large as keeps the quality ratio at the target, computed from the means over *all* rows.  This is
   what a router without any per-query signal reaches if it knew the tiers' mean quality exactly.
2. **Answer-confidence cascade, in hindsight** (sets with answer log-probabilities only): the
   cheapest threshold cascade on u over any ordered subset of tiers ending at the top tier (stop at a
   tier when its u is at most its threshold), thresholds from a quantile grid, tuned on *all* rows
   at quality ratio >= target.  Optimistic by construction: an upper bound on what a u-threshold
   cascade can save, not a figure any tuned policy reaches on new rows.
3. **No-signal mix, certified** (a real policy, judged on test rows): the share p is chosen by the
   same Learn-then-Test fixed-sequence test as RouteNLP's certified policies
   (:func:`calibration.certify.ltt_fixed_sequence`, Waudby-Smith-Ramdas bound, delta) on the
   benchmark's train + calibration rows of each seed (80%, RouteNLP's certification rows), over a
   grid p = 0, 0.01, ..., 1, one sequence per tier below the top at delta / (K - 1) each
   (Bonferroni); the cheapest certified (tier, p) serves the test rows.  Test Q and C, mean +- std over seeds.

If (1) or (2) is above a goal, no policy reading only the answers' confidence (2) or only the task (1)
can meet that goal on that set; (3) is what the certificate costs when there is no per-query signal,
the yardstick for RouteNLP's certified C (README "Certified routing on the shared sets").
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: issue 14's cost goals per set
GOALS = {"cascades_9llm": 0.45, "routerbench": 0.70, "routellm": 0.72}


def mix_in_hindsight(q: np.ndarray, c: np.ndarray, target: float) -> tuple[float, str]:
    """Cheapest one-tier random mix with the top tier at quality ratio ``target`` (means over ``q``)."""
    q_top, c_top = q[:, -1].mean(), c[:, -1].mean()
    best, how = 1.0, "top only"
    for k in range(q.shape[1] - 1):
        loss = 1.0 - q[:, k].mean() / q_top
        p = 1.0 if loss <= 1.0 - target else (1.0 - target) / loss
        cost = 1.0 - p * (1.0 - c[:, k].mean() / c_top)
        if cost < best:
            best, how = cost, f"{p:.2f} to T{k + 1}"
    return best, how


def cascade_in_hindsight(q: np.ndarray, c: np.ndarray, u: np.ndarray, target: float) -> tuple[float, str]:
    """Cheapest u-threshold cascade ending at the top tier, tuned on these rows (module docstring, 2)."""
    n, K = q.shape
    need = target * q[:, -1].sum()
    best, how = c[:, -1].sum(), "top only"
    for m in range(1, K):
        for subset in itertools.combinations(range(K - 1), m):
            if np.isnan(u[:, list(subset)]).all(axis=0).any():
                continue
            levels = np.linspace(0, 1, 41 if m < 3 else 21)
            grids = [np.unique(np.nanquantile(u[:, k], levels)) for k in subset]
            for thresholds in itertools.product(*grids):
                alive = np.ones(n, dtype=bool)
                cost, quality = np.zeros(n), np.zeros(n)
                for k, threshold in zip(subset, thresholds):
                    cost[alive] += c[alive, k]
                    stop = alive & (np.nan_to_num(u[:, k], nan=np.inf) <= threshold)
                    quality[stop] = q[stop, k]
                    alive &= ~stop
                cost[alive] += c[alive, -1]
                quality[alive] = q[alive, -1]
                if quality.sum() >= need and cost.sum() < best:
                    best, how = cost.sum(), " -> ".join(f"T{k + 1}" for k in subset + (K - 1,))
    return best / c[:, -1].sum(), how


def certified_mix(q: np.ndarray, c: np.ndarray, fit: np.ndarray, test: np.ndarray, target: float, delta: float,
                  rng: np.random.Generator) -> tuple[float, float, float, str]:
    """(test quality sum, test cost sum, test top-cost sum, what) of the certified no-signal mix."""
    from calibration.certify import ltt_fixed_sequence, quality_loss

    shares = np.round(np.linspace(0.0, 1.0, 101), 2)
    draw = rng.random(len(fit))
    best = (float(c[fit, -1].mean()), None, 0.0)
    below = q.shape[1] - 1
    for k in range(below):
        # one fixed sequence per tier, each at delta / (K - 1) (Bonferroni): the family-wise error
        # over the K - 1 sequences stays <= delta, so picking the cheapest survivor keeps the guarantee
        policy_q = np.array([np.where(draw < p, q[fit, k], q[fit, -1]) for p in shares])
        index, _ = ltt_fixed_sequence(quality_loss(policy_q, q[fit, -1], target), delta / below, "wsr")
        if index is None:
            continue
        mean_cost = float(shares[index] * c[fit, k].mean() + (1 - shares[index]) * c[fit, -1].mean())
        if mean_cost < best[0]:
            best = (mean_cost, k, float(shares[index]))
    _, k, p = best
    to_k = rng.random(len(test)) < p if k is not None else np.zeros(len(test), dtype=bool)
    tier = np.where(to_k, 0 if k is None else k, q.shape[1] - 1)
    rows = np.arange(len(test))
    return (float(q[test][rows, tier].sum()), float(c[test][rows, tier].sum()), float(c[test, -1].sum()),
            "top only" if k is None else f"{p:.2f} to T{k + 1}")


def main() -> int:
    from coopt.bench.datasets import load_shared
    from coopt.bench.data import BenchData

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(GOALS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--delta", type=float, default=0.1)
    args = parser.parse_args()
    for name in args.datasets:
        records, portfolio = load_shared(name)
        data = BenchData(records, portfolio)
        print(f"\n## {name} (goal C <= {GOALS.get(name, float('nan'))}, target {args.target}, delta {args.delta})")
        print(f"{'task':<14} {'n':>6}  {'(1) mix, hindsight':<26} {'(2) u-cascade, hindsight':<34} (3) certified mix, test rows")
        totals = {"mix": 0.0, "cascade": 0.0, "top": 0.0}
        per_seed = {seed: [0.0, 0.0, 0.0, 0.0] for seed in args.seeds}  # q, q_top, cost, top cost
        splits = {seed: data.split(seed) for seed in args.seeds}
        for index, task in enumerate(data.tasks):
            rows = np.nonzero(data.task_ids == index)[0]
            tiers = [k for k in range(data.K) if data.served[index, k]]
            q, c, u = data.quality[:, tiers], data.cost[:, tiers], data.uncertainty[:, tiers]
            top_cost = float(c[rows, -1].sum())
            mix, mix_how = mix_in_hindsight(q[rows], c[rows], args.target)
            if np.isnan(u[rows, :-1]).all():
                cascade, cascade_how = mix, "no answer signal: = (1)"
            else:
                cascade, cascade_how = cascade_in_hindsight(q[rows], c[rows], u[rows], args.target)
            totals["mix"] += mix * top_cost
            totals["cascade"] += min(cascade, mix) * top_cost
            totals["top"] += top_cost
            test_q, test_c, hows = [], [], []
            for seed, split in splits.items():
                fit = np.intersect1d(np.concatenate([split.train, split.calib]), rows)
                test = np.intersect1d(split.test, rows)
                qs, cs, tops, how = certified_mix(q, c, fit, test, args.target, args.delta,
                                                  np.random.default_rng([seed, index, 14]))
                q_top = float(q[test, -1].sum())
                test_q.append(qs / max(q_top, 1e-12))
                test_c.append(cs / max(tops, 1e-300))
                hows.append(how)
                for slot, value in enumerate((qs, q_top, cs, tops)):
                    per_seed[seed][slot] += value
            print(f"{task:<14} {len(rows):>6}  {mix:.3f} ({mix_how}){'':<{max(0, 13 - len(mix_how))}} "
                  f"{cascade:.3f} ({cascade_how}){'':<{max(0, 21 - len(cascade_how))}} "
                  f"Q {np.mean(test_q):.3f} ± {np.std(test_q):.3f}, C {np.mean(test_c):.3f} ± {np.std(test_c):.3f} "
                  f"[{', '.join(hows)}]")
        seed_q = [v[0] / v[1] for v in per_seed.values()]
        seed_c = [v[2] / v[3] for v in per_seed.values()]
        print(f"{'overall':<14} {data.n:>6}  {totals['mix'] / totals['top']:.3f}{'':<22} "
              f"{totals['cascade'] / totals['top']:.3f}{'':<30} Q {np.mean(seed_q):.3f} ± {np.std(seed_q):.3f}, "
              f"C {np.mean(seed_c):.3f} ± {np.std(seed_c):.3f}, seeds with Q >= {args.target}: "
              f"{sum(v >= args.target for v in seed_q)}/{len(seed_q)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
