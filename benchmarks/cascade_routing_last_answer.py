"""A `routenlp bench --plugin` module: cascade routing certified with ``answer_rule: last`` and a finer lambda grid.

The experiment behind README "Certified cascade routing on the shared sets", reason 2.  With the
paper's answer rule (keep the best-estimated answer), lambda -> 0 asks every tier and may return a
cheaper tier's answer, so Learn-then-Test's safest candidate can already fail; with ``last`` (keep
the most capable tier's answer) lambda -> 0 is the top tier's answer.  Registers ``RouteNLP-last``:

    PYTHONPATH=benchmarks .venv/bin/routenlp bench --dataset routerbench --out /tmp/exp-last \\
        --systems "Always-top,RouteNLP-last" --plugin cascade_routing_last_answer --no-sweeps

``ROUTENLP_EXP_GRID`` sets the number of lambdas (geometric, 1e-3 .. 10; default 61).
"""

from __future__ import annotations

import functools
import os

import numpy as np

import calibration.fit_cascade_routing as fit_cascade_routing
from coopt.bench.routenlp import RouteNLP
from coopt.bench.systems import register
from litellm_routenlp.policy import CascadeRouting

GRID = tuple(float(v) for v in np.round(np.geomspace(1e-3, 10.0, int(os.environ.get("ROUTENLP_EXP_GRID", "61"))), 6))
# every CascadeRouting the fitting module builds (fold replays and the final policy) keeps the last answer
fit_cascade_routing.CascadeRouting = functools.partial(CascadeRouting, answer_rule="last")


@register("RouteNLP-last")
class RouteNLPLastAnswer(RouteNLP):
    @property
    def lambdas(self) -> tuple[float, ...]:
        return GRID
