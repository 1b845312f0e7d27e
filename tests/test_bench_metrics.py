"""Benchmark arithmetic on a tiny all-pairs file whose every figure is computed by hand below.

Six queries, two tasks, three tiers (costs 1 : 10 : 100, latencies 10 / 100 / 1000 ms):

    id  task    quality T1/T2/T3    uncertainty T1/T2/T3   cost T1/T2/T3 ($)      cheapest acceptable
    i1  intent  1    1    1         0.1  0.1  0            .001 .01 .1             T1
    i2  intent  0    1    1         0.6  0.2  0            .001 .01 .1             T2
    i3  intent  0    0    1         0.9  0.7  0            .001 .01 .1             T3
    i4  intent  0    0    0         0.3  0.4  0            .001 .01 .1             none -> T3
    r1  reply   .7   .8   .9        0.2  0.2  0            .002 .02 .2             T1  (tau 0.6)
    r2  reply   .2   .5   .65       0.8  0.3  0            .002 .02 .2             T3

Always-top: intent quality 3, cost 0.4; reply quality 1.55, cost 0.4.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from routenlp_core.allpairs import AllPairsRecord, Portfolio, TaskSpec, TierResult, TierSpec, write_allpairs, write_portfolio
from coopt.bench.data import BenchData
from coopt.bench.metrics import Routes, cost_ratio, per_query, quality_ratio, summarise, tier_shares
from coopt.bench.routenlp import policy_routes
from coopt.bench.run import load_bench_data
from coopt.bench.systems import FitContext, Oracle, RatioScorer, pick

ROWS = [  # id, task, quality, uncertainty, cost
    ("i1", "intent", (1, 1, 1), (0.1, 0.1, 0.0), (0.001, 0.01, 0.1)),
    ("i2", "intent", (0, 1, 1), (0.6, 0.2, 0.0), (0.001, 0.01, 0.1)),
    ("i3", "intent", (0, 0, 1), (0.9, 0.7, 0.0), (0.001, 0.01, 0.1)),
    ("i4", "intent", (0, 0, 0), (0.3, 0.4, 0.0), (0.001, 0.01, 0.1)),
    ("r1", "reply", (0.7, 0.8, 0.9), (0.2, 0.2, 0.0), (0.002, 0.02, 0.2)),
    ("r2", "reply", (0.2, 0.5, 0.65), (0.8, 0.3, 0.0), (0.002, 0.02, 0.2)),
]
LATENCY = (10.0, 100.0, 1000.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> BenchData:
    folder = tmp_path_factory.mktemp("tiny")
    portfolio = Portfolio(tiers=(TierSpec("T1", "small"), TierSpec("T2", "medium"), TierSpec("T3", "large")),
                          tasks={"intent": TaskSpec("accuracy", 1.0, "structured"),
                                 "reply": TaskSpec("rougeL", 0.6, "generation")})
    records = [AllPairsRecord(id=i, task=task, prompt=f"prompt {i}",
                              tiers={f"T{k + 1}": TierResult(output="x", quality=float(q[k]), cost_usd=c[k],
                                                             latency_ms=LATENCY[k], uncertainty=u[k])
                                     for k in range(3)})
               for i, task, q, u, c in ROWS]
    write_allpairs(records, folder / "tiny.jsonl")
    write_portfolio(portfolio, folder / "tiny.yaml")
    from routenlp_core.allpairs import load_portfolio

    data = load_bench_data([folder / "tiny.jsonl"], load_portfolio(folder / "tiny.yaml"))
    data.embeddings = np.eye(6, 384, dtype=np.float32)
    return data


ALL = np.arange(6)


def test_always_top_scores_exactly_one(tiny):
    routes = Routes.single(ALL, np.full(6, 2), 3)
    assert quality_ratio(tiny, routes) == pytest.approx(1.0)
    assert cost_ratio(tiny, routes) == pytest.approx(1.0)


def test_oracle_is_the_cheapest_acceptable_tier_and_its_ratios_match_the_hand_computation(tiny):
    oracle = Oracle()
    oracle.fit(FitContext(data=tiny, split=None, work_dir=Path("."), encoder_dir=Path(".")))
    routes = oracle.route(ALL)
    assert routes.final.tolist() == [0, 1, 2, 2, 0, 2]
    # intent: quality 3/3, cost (.001+.01+.1+.1)/.4; reply: quality (.7+.65)/1.55, cost (.002+.2)/.4
    assert quality_ratio(tiny, routes) == pytest.approx(4 / 6 * 1.0 + 2 / 6 * (1.35 / 1.55))
    assert cost_ratio(tiny, routes) == pytest.approx(4 / 6 * (0.211 / 0.4) + 2 / 6 * (0.202 / 0.4))
    assert tier_shares(routes, 3).tolist() == pytest.approx([2 / 6, 1 / 6, 3 / 6])


def test_volume_weighting_counts_tasks_by_their_number_of_queries(tiny):
    # everything on T1: intent quality 1/3, reply (0.7+0.2)/1.55
    routes = Routes.single(ALL, np.zeros(6, dtype=int), 3)
    assert quality_ratio(tiny, routes) == pytest.approx(4 / 6 * (1 / 3) + 2 / 6 * (0.9 / 1.55))
    assert cost_ratio(tiny, routes) == pytest.approx(4 / 6 * (0.004 / 0.4) + 2 / 6 * (0.004 / 0.4))


def test_the_proxy_cascade_pays_for_every_tier_tried(tiny):
    from litellm_routenlp.thresholds import Thresholds

    from litellm_routenlp.policy import ConformalThresholds

    thresholds = Thresholds(deltas={"T1": {"intent": 0.5, "reply": 0.5}, "T2": {"intent": 0.5, "reply": 0.5}})
    routes = policy_routes(ConformalThresholds(thresholds, max_hops=3, no_logprobs_policy="trust_router"), tiny, ALL,
                           starts=np.ones(6, dtype=int))  # the policy's tiers are 1-based; Routes are 0-based
    assert routes.paths() == [[0], [0, 1], [0, 1, 2], [0], [0], [0, 1]]
    values = per_query(tiny, routes)
    assert values["cost"].tolist() == pytest.approx([0.001, 0.011, 0.111, 0.001, 0.002, 0.022])
    assert values["latency"].tolist() == pytest.approx([10, 110, 1110, 10, 10, 110])
    assert cost_ratio(tiny, routes) == pytest.approx(4 / 6 * (0.124 / 0.4) + 2 / 6 * (0.024 / 0.4))
    assert quality_ratio(tiny, routes) == pytest.approx(4 / 6 * 1.0 + 2 / 6 * (1.2 / 1.55))
    summary = summarise(tiny, routes)
    assert summary["escalation_rate"] == pytest.approx(3 / 6)
    # max_hops = 1 stops i3 at T2, as the proxy would
    capped = policy_routes(ConformalThresholds(thresholds, max_hops=1), tiny, ALL, starts=np.ones(6, dtype=int))
    assert capped.paths()[2] == [0, 1]


def test_the_fast_scorer_agrees_with_the_metrics(tiny):
    routes = Routes.single(ALL, np.array([0, 1, 2, 0, 1, 2]), 3)
    scorer = RatioScorer(tiny, ALL)
    quality, cost, per_row = scorer.score(routes.tried, routes.final)
    assert (quality, cost) == pytest.approx((quality_ratio(tiny, routes), cost_ratio(tiny, routes)))
    assert per_row.tolist() == per_query(tiny, routes)["quality"].tolist()


def test_pick_takes_the_cheapest_setting_at_the_target_else_the_best_quality():
    candidates = [({"t": 1}, 0.99, 0.8), ({"t": 2}, 0.97, 0.5), ({"t": 3}, 0.90, 0.1)]
    assert pick(candidates, 0.97)["t"] == 2
    assert pick(candidates, 0.995)["t"] == 1 and not pick(candidates, 0.995)["reached_target"]


def test_routes_reject_a_final_tier_that_was_not_tried():
    with pytest.raises(ValueError):
        Routes(rows=np.array([0]), tried=np.array([[True, False]]), final=np.array([1]))


def test_split_is_seeded_disjoint_and_covers_every_task(tiny):
    a, b = tiny.split(3, (0.5, 0.25, 0.25)), tiny.split(3, (0.5, 0.25, 0.25))
    assert a.test.tolist() == b.test.tolist()
    together = np.concatenate([a.train, a.calib, a.test])
    assert sorted(together.tolist()) == list(range(6))
    assert set(tiny.task_names[a.train]) == {"intent", "reply"}


def test_a_tier_that_does_not_serve_the_task_is_replaced_by_the_next_one_that_does():
    from coopt.bench.metrics import served_only

    portfolio = Portfolio(tiers=(TierSpec("T1", "a"), TierSpec("T2", "b"), TierSpec("T3", "c")),
                          tasks={"intent": TaskSpec("accuracy", 1.0, "structured")})
    not_served = TierResult(output=None, quality=0.0, cost_usd=0.0, error="not served: restricted to bitext")
    records = [AllPairsRecord(id=f"x{i}", task="intent", prompt=f"p{i}",
                              tiers={"T1": TierResult("a", 0.0, 0.001), "T2": not_served, "T3": TierResult("a", 1.0, 0.1)})
               for i in range(3)]
    data = BenchData(records, portfolio)
    assert data.served.tolist() == [[True, False, True]]
    routes = served_only(data, Routes.from_paths(np.arange(3), [[1], [0, 1], [0]], 3))
    assert routes.paths() == [[2], [0, 2], [0]]
    assert per_query(data, routes)["cost"].tolist() == pytest.approx([0.1, 0.101, 0.001])
