"""What a stricter or looser guarantee costs: RouteNLP certified at several targets and deltas, on test rows.

    .venv/bin/python benchmarks/certificate_tradeoff.py [--datasets cascades_9llm routerbench]
        [--seeds 0 1 2 3 4] [--targets 0.95 0.97 0.99] [--deltas 0.05 0.1 0.2 0.5] [--guarantees ltt crc]

The README's "Choosing target and delta" in figures.  For each shared set and seed this fits
``RouteNLP`` once, exactly as ``routenlp bench`` does (the benchmark's 60/20/20 split, the static
encoder, the router and the posterior cross-fitted on the train + calibration rows), and then only
re-runs the certificate for every (target, delta) and guarantee: the out-of-fold decisions the
certificate reads do not depend on either, so every row of the table is the same policy family on
the same rows, certified at a different strength.  Each certified policy routes the seed's test
rows; printed: mean +- std over seeds of the test quality ratio and cost ratio, the seeds whose test
quality ratio reached the target, and the worst task's mean quality ratio.  Wall time: about
1-2 min per seed and set (the router fits), the certificates are seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    from threadpoolctl import threadpool_limits

    from coopt.bench.data import default_cache_path
    from coopt.bench.datasets import materialise
    from coopt.bench.metrics import summarise, served_only
    from coopt.bench.routenlp import RouteNLP
    from coopt.bench.run import load_bench_data
    from coopt.bench.systems import FitContext
    from routenlp_core.allpairs import load_portfolio

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["cascades_9llm", "routerbench"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.95, 0.97, 0.99])
    parser.add_argument("--deltas", nargs="+", type=float, default=[0.05, 0.1, 0.2, 0.5])
    parser.add_argument("--guarantees", nargs="+", default=["ltt", "crc"], choices=["ltt", "crc"])
    parser.add_argument("--encoder", default=str(ROOT / "artifacts/encoder-static"))
    args = parser.parse_args()
    encoder = Path(args.encoder)
    settings = [("crc", target, None) for target in args.targets if "crc" in args.guarantees]
    settings += [("ltt", target, delta) for target in args.targets for delta in args.deltas if "ltt" in args.guarantees]
    with tempfile.TemporaryDirectory(prefix="certificate-tradeoff-") as scratch, threadpool_limits(limits=1):
        for name in args.datasets:
            data_path, portfolio_path = materialise(name, Path(scratch) / "data", None)
            data = load_bench_data([data_path], load_portfolio(portfolio_path))
            data.load_embeddings(encoder, default_cache_path(encoder))
            figures: dict[tuple, list[dict]] = {key: [] for key in settings}
            for seed in args.seeds:
                ctx = FitContext(data=data, split=data.split(seed), work_dir=Path(scratch) / name,
                                 encoder_dir=encoder, cache_path=default_cache_path(encoder))
                for guarantee, target, delta in settings:
                    ctx.target_quality = target
                    system = RouteNLP(delta=delta if delta is not None else 0.1)
                    system.guarantee = guarantee
                    system.fit(ctx)  # the cross-fit is cached in ctx.shared: only the certificate re-runs
                    figures[(guarantee, target, delta)].append(
                        summarise(data, served_only(data, system.route(ctx.split.test))))
                print(f"  {name} seed {seed} done", file=sys.stderr, flush=True)
            print(f"\n## {name}: RouteNLP (posterior_threshold) on the test rows, {len(args.seeds)} seeds")
            print("| guarantee | target | delta | test Q | test C | seeds with Q >= target | worst task's mean Q |")
            print("| --- | --- | --- | --- | --- | --- | --- |")
            for (guarantee, target, delta), runs in figures.items():
                q = np.array([r["quality_ratio"] for r in runs])
                c = np.array([r["cost_ratio"] for r in runs])
                tasks = sorted({t for r in runs for t in r["per_task"]})
                worst = min((np.mean([r["per_task"][t]["quality_ratio"] for r in runs if t in r["per_task"]]), t)
                            for t in tasks)
                print(f"| {'LTT-WSR' if guarantee == 'ltt' else 'CRC (in expectation)'} | {target} | "
                      f"{'-' if delta is None else delta} | {q.mean():.3f} ± {q.std():.3f} | {c.mean():.3f} ± {c.std():.3f} | "
                      f"{int(np.sum(q >= target - 1e-12))}/{len(q)} | {worst[0]:.3f} ({worst[1]}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
