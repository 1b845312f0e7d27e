"""Latency of one post-answer estimate, ``PosteriorEstimator.predict`` (issue 14: under 0.2 ms).

    .venv/bin/python benchmarks/posterior_latency.py [--n 20000] [--tiers 4]

Fits an estimator on simulated calibration rows (every answered set of a K-tier portfolio, two
tasks, answer texts for agreement), then times single calls as the proxy makes them (one request,
the ex-ante vector and the answers so far) with ``time.perf_counter_ns``, after a warm-up, for
one, two and three answers.  Prints p50 / p99 / mean in microseconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from calibration.quality_estimators import fit_posterior  # noqa: E402
from litellm_routenlp.quality_estimates import AnswerSignals  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="timed calls per answered-set size")
    parser.add_argument("--tiers", type=int, default=4)
    args = parser.parse_args()
    K, rng = args.tiers, np.random.default_rng(0)
    rows = 800
    tasks = list(rng.choice(["a", "b"], size=rows))
    difficulty = rng.normal(size=rows)
    ex_ante = 1 / (1 + np.exp(-(np.linspace(-1, 2, K)[None] - difficulty[:, None] + rng.normal(size=(rows, K)))))
    acceptable = rng.random((rows, K)) < ex_ante
    uncertainty = np.clip(0.5 - 0.2 * acceptable + rng.normal(scale=0.1, size=(rows, K)), 0, 1)
    outputs = [["yes" if acceptable[r, k] else "the answer is no" for k in range(K)] for r in range(rows)]
    estimator = fit_posterior(tasks, ex_ante, acceptable, uncertainty, outputs)
    print(f"estimator: {len(estimator.cells)} cells, K={K}")
    for size in range(1, min(3, K) + 1):
        answers = [AnswerSignals(tier=t, uncertainty=0.3, margin=None, text="the answer is no" if t % 2 else "yes")
                   for t in range(1, size + 1)]
        vector = ex_ante[0]
        for _ in range(500):
            estimator.predict("a", vector, answers)
        samples = np.empty(args.n)
        for i in range(args.n):
            start = time.perf_counter_ns()
            estimator.predict("a", vector, answers)
            samples[i] = (time.perf_counter_ns() - start) / 1000.0
        print(f"{size} answer(s): p50 {np.percentile(samples, 50):.1f} us, p99 {np.percentile(samples, 99):.1f} us, "
              f"mean {samples.mean():.1f} us (n={args.n})")


if __name__ == "__main__":
    main()
