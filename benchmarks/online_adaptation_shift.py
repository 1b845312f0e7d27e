"""A shift on the real all-pairs data, with and without online adaptation (issue 13 item 6).

Data: ``cascades_9llm`` (../shared/data): MedMCQA (1,000) and TruthfulQA (517), every query answered by
llama3.2-1b / llama3.1-8b / llama3.1-70b / gpt-4o (T1..T4) with the authors' 0/1 correctness and the
answer's uncertainty u.  One served task, "qa", whose mix shifts:

1. calibrate the paper's rule (start at T1; escalate while u > delta_k) on a 10% MedMCQA / 90% TruthfulQA
   mix drawn from half of each dataset: delta_k = the q-quantile of u at tier k, q the largest grid
   value whose calibration miscoverage (unacceptable final answers) is <= alpha;
2. stream the other mix (90% / 10%) from the other half, ``--stream`` queries; a shadow audit samples
   ``--audit`` of them and its verdict is the data's correctness of the answer served;
3. without adaptation the deltas stay; with adaptation every verdict moves the scale s by the plugin's
   own ACI step (``litellm_routenlp.online_adaptation.aci_step``, step ``--step``, s in [0, 1]) and
   the deltas served are s * delta.

Figures: long-run audited quality over the stream (acceptable share of the audited verdicts) with its
95% Wilson interval, its second half, and the cost relative to all-top-tier, mean and spread over
``--seeds`` seeds (each seed: another split, calibration sample, stream and audit sample).  Only stream
rows are scored; calibration never sees them.  Writes docs/online_adaptation_shift.png.

    .venv/bin/python benchmarks/online_adaptation_shift.py [--seeds 5] [--stream 4000] [--audit 0.2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coopt.multimodel import load_cascades_9llm  # noqa: E402
from coopt.ops_report import wilson  # noqa: E402
from litellm_routenlp.online_adaptation import aci_step  # noqa: E402


def arrays(records):
    quality = np.array([[r.tiers[t].quality for t in ("T1", "T2", "T3", "T4")] for r in records]) >= 1.0
    unc = np.array([[1.0 if r.tiers[t].uncertainty is None else r.tiers[t].uncertainty
                     for t in ("T1", "T2", "T3", "T4")] for r in records])
    cost = np.array([[r.tiers[t].cost_usd for t in ("T1", "T2", "T3", "T4")] for r in records])
    return quality, unc, cost


def serve(unc_row, deltas):
    """The paper's rule: the tier whose answer is kept and the tiers asked."""
    for k in range(3):
        if unc_row[k] <= deltas[k]:
            return k
    return 3


def calibrate(quality, unc, alpha):
    grid = np.linspace(0.0, 1.0, 101)
    best = np.zeros(3)
    for q in grid:
        deltas = np.quantile(unc[:, :3], q, axis=0)
        kept = np.array([serve(u, deltas) for u in unc])
        if 1.0 - quality[np.arange(len(kept)), kept].mean() <= alpha:
            best = deltas
    return best


def mix(rng, pools, shares, n):
    """n row indices per pool (with replacement) in the given shares, shuffled."""
    parts = [np.stack([np.full(int(round(n * s)), p), rng.choice(len(pools[p][0]), int(round(n * s)))], 1)
             for p, s in enumerate(shares)]
    rows = np.concatenate(parts)
    return rows[rng.permutation(len(rows))]


def run(seed, data, args):
    rng = np.random.default_rng(seed)
    calib_pools, stream_pools = [], []
    for quality, unc, cost in data:
        order = rng.permutation(len(quality))
        half = len(order) // 2
        calib_pools.append((quality[order[:half]], unc[order[:half]], cost[order[:half]]))
        stream_pools.append((quality[order[half:]], unc[order[half:]], cost[order[half:]]))

    def take(pools, rows):
        return tuple(np.stack([pools[p][i][j] for p, j in rows]) for i in range(3))

    cq, cu, _ = take(calib_pools, mix(rng, calib_pools, (args.calibration_medmcqa, 1 - args.calibration_medmcqa),
                                      args.calibration))
    deltas = calibrate(cq, cu, args.alpha)
    sq, su, sc = take(stream_pools, mix(rng, stream_pools, (args.stream_medmcqa, 1 - args.stream_medmcqa),
                                        args.stream))
    audited = rng.random(len(sq)) < args.audit
    out = {}
    for name, adapt in (("without adaptation", False), ("with adaptation", True)):
        scale, verdicts, scales, spent = 1.0, [], [], 0.0
        for i in range(len(sq)):
            kept = serve(su[i], deltas * scale)
            spent += sc[i][: kept + 1].sum()
            if audited[i]:
                ok = bool(sq[i][kept])
                verdicts.append(ok)
                if adapt:
                    scale = aci_step(scale, ok, args.alpha, args.step, 1.0)
            scales.append(scale)
        v = np.array(verdicts)
        low, high = wilson(int(v.sum()), len(v))
        second = v[len(v) // 2:]
        out[name] = {"quality": v.mean(), "low": low, "high": high, "second_half": second.mean(),
                     "cost_rel": spent / sc[:, 3].sum(), "n": len(v), "verdicts": v, "scales": np.array(scales)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--stream", type=int, default=4000)
    parser.add_argument("--calibration", type=int, default=600)
    parser.add_argument("--calibration-medmcqa", type=float, default=0.1, help="MedMCQA share of the calibration mix")
    parser.add_argument("--stream-medmcqa", type=float, default=0.9, help="MedMCQA share of the streamed mix")
    parser.add_argument("--audit", type=float, default=0.2, help="share of the stream the shadow audit judges")
    parser.add_argument("--alpha", type=float, default=0.35, help="target miscoverage (target quality 1 - alpha)")
    parser.add_argument("--step", type=float, default=0.05, help="ACI step gamma")
    parser.add_argument("--plot", default=str(ROOT / "docs/online_adaptation_shift.png"))
    args = parser.parse_args()
    data = [arrays(load_cascades_9llm(name)[0]) for name in ("medmcqa", "truthfulqa")]
    target = 1.0 - args.alpha
    runs = [run(seed, data, args) for seed in range(args.seeds)]
    print(f"shift: calibrated on {args.calibration_medmcqa:.0%} MedMCQA / {1 - args.calibration_medmcqa:.0%} "
          f"TruthfulQA, streamed {args.stream_medmcqa:.0%} / {1 - args.stream_medmcqa:.0%}; {args.stream} queries, "
          f"{args.audit:.0%} audited, target audited quality {target:.2f} (alpha {args.alpha}), step {args.step}, "
          f"{args.seeds} seeds")
    print(f"{'':20s} {'audited quality':>16s} {'95% Wilson (mean)':>19s} {'2nd half':>9s} {'cost/top':>9s} "
          f"{'seeds at target':>16s}")
    for name in ("without adaptation", "with adaptation"):
        cells = [r[name] for r in runs]
        q = np.array([c["quality"] for c in cells])
        at = sum(c["low"] <= target <= c["high"] or c["low"] > target for c in cells)
        print(f"{name:20s} {q.mean():8.3f} ± {q.std(ddof=1):.3f}   [{np.mean([c['low'] for c in cells]):.3f}, "
              f"{np.mean([c['high'] for c in cells]):.3f}]     {np.mean([c['second_half'] for c in cells]):8.3f} "
              f"{np.mean([c['cost_rel'] for c in cells]):9.3f} {at:>10d}/{len(cells)}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    window = 200
    for name, color in (("without adaptation", "tab:red"), ("with adaptation", "tab:blue")):
        for i, r in enumerate(runs):
            v = r[name]["verdicts"].astype(float)
            rolling = np.convolve(v, np.ones(window) / window, mode="valid")
            top.plot(np.arange(window, len(v) + 1), rolling, color=color, alpha=0.5, lw=1,
                     label=name if i == 0 else None)
        if name == "with adaptation":
            for r in runs:
                s = r[name]["scales"][np.nonzero(np.r_[True, np.diff(r[name]["scales"]) != 0])[0]]
                bottom.plot(np.arange(len(s)), s, color=color, alpha=0.5, lw=1)
    top.axhline(target, color="black", ls="--", lw=1, label=f"target {target:.2f}")
    top.set_ylabel(f"audited quality ({window}-verdict window)")
    top.legend(loc="lower right", fontsize=8)
    bottom.set_ylabel("delta scale s")
    bottom.set_xlabel("audited verdict")
    top.set_title(f"Shift {args.calibration_medmcqa:.0%} -> {args.stream_medmcqa:.0%} MedMCQA (rest TruthfulQA), "
                  "cascades_9llm; ACI on the delta scale", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
