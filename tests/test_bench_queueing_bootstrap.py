"""The tier queue simulation against closed-form M/M/c results, and the paired bootstrap."""

from __future__ import annotations

import numpy as np
import pytest

from coopt.bench.bootstrap import PairedSample, paired_bootstrap
from coopt.bench.queueing import QueueConfig, erlang_c, mmc_mean_wait, rate_limited, simulate


def test_erlang_c_matches_a_textbook_value():
    # M/M/2 with offered load 1 (lambda = 1, mu = 1): C = 1/3, mean wait = 1/3
    assert erlang_c(2, 1.0, 1.0) == pytest.approx(1 / 3)
    assert mmc_mean_wait(2, 1.0, 1.0) == pytest.approx(1 / 3)


@pytest.mark.parametrize("workers,arrival_rate", [(1, 0.7), (4, 3.2), (8, 6.0)])
def test_simulated_mmc_waiting_time_matches_erlang_c(workers, arrival_rate):
    config = QueueConfig(n_arrivals=200_000, top_rate_per_s=None, workers=(workers,), warmup_fraction=0.1)
    result = simulate(np.ones((1, 1), dtype=bool), [1.0], arrival_rate, config, np.random.default_rng(1))
    expected_sojourn_ms = (mmc_mean_wait(workers, arrival_rate, 1.0) + 1.0) * 1000.0
    assert result["mean_ms"] == pytest.approx(expected_sojourn_ms, rel=0.05)
    assert result["utilisation"][0] == pytest.approx(arrival_rate / workers, rel=0.02)


def test_rate_limited_tier_spaces_starts_by_the_rate():
    starts = rate_limited(np.array([0.0, 0.0, 0.0, 1.0]), rate_per_s=10.0)
    assert starts.tolist() == pytest.approx([0.0, 0.1, 0.2, 1.0])


def test_a_cascaded_query_waits_at_every_tier_it_visits():
    # no queueing (huge worker pool, slow arrivals): latency = sum of the services on the path
    config = QueueConfig(n_arrivals=20_000, top_rate_per_s=None, workers=(1000,), warmup_fraction=0.0)
    one_tier = simulate(np.array([[True, False]]), [0.1, 0.4], 1.0, config, np.random.default_rng(0))
    two_tiers = simulate(np.array([[True, True]]), [0.1, 0.4], 1.0, config, np.random.default_rng(0))
    assert one_tier["mean_ms"] == pytest.approx(100.0, rel=0.05)
    assert two_tiers["mean_ms"] == pytest.approx(500.0, rel=0.05)
    assert two_tiers["sla_violation"] > one_tier["sla_violation"]


def test_bootstrap_of_identical_systems_finds_no_difference():
    rng = np.random.default_rng(0)
    values = rng.random(200)
    sample = PairedSample(a=values, b=values.copy(), reference=np.ones(200), task_ids=np.zeros(200, dtype=int))
    result = paired_bootstrap([sample], n_boot=500)
    assert result["delta"] == 0.0
    assert result["p_two_sided"] == 1.0


def test_bootstrap_is_paired_a_constant_saving_is_significant_despite_noisy_queries():
    rng = np.random.default_rng(0)
    noisy = rng.exponential(1.0, 300)
    sample = PairedSample(a=noisy * 0.98, b=noisy, reference=noisy, task_ids=np.zeros(300, dtype=int))
    result = paired_bootstrap([sample], n_boot=500)
    assert result["delta"] == pytest.approx(-0.02)
    # every resample sees A 2% cheaper: the one-sided p-value is the smallest possible, 1/(B+1)
    assert result["p_lower"] == pytest.approx(1 / 501)
    assert result["ci95"][1] < 0


def test_bootstrap_delta_is_the_volume_weighted_ratio_difference_averaged_over_seeds():
    tasks = np.array([0, 0, 1, 1])
    s1 = PairedSample(a=np.array([1.0, 1.0, 0.0, 1.0]), b=np.array([1.0, 0.0, 1.0, 1.0]),
                      reference=np.ones(4), task_ids=tasks)
    s2 = PairedSample(a=np.array([1.0, 1.0, 1.0, 1.0]), b=np.array([0.0, 0.0, 1.0, 1.0]),
                      reference=np.ones(4), task_ids=tasks)
    # seed 1: A = .5*1 + .5*.5 = .75, B = .5*.5 + .5*1 = .75 -> 0; seed 2: 1 - .5 = .5
    assert paired_bootstrap([s1, s2], n_boot=50)["delta"] == pytest.approx(0.25)
