"""Co-optimisation steps 2-3: failure clusters and the distillation data, on small fixed data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from coopt.clusters import cluster_failures, cluster_report, read_clusters, write_clusters
from coopt.failures import Failure
from coopt.logs import RequestRecord, TierCall
from coopt.selection import composition, hardest, random_count, select_random, select_targeted

# Five well-separated groups in 40-d: (size, quality gap of every member)
GROUPS = [(30, 0.2), (12, 1.0), (20, 0.9), (8, 0.5), (25, 0.0)]


def _blobs(seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, size=(len(GROUPS), 40))
    features, gaps, texts, group = [], [], [], []
    for g, (size, gap) in enumerate(GROUPS):
        features.append(centres[g] + rng.normal(0, 0.3, size=(size, 40)))
        gaps += [gap] * size
        texts += [f"group{g} query {i}" for i in range(size)]
        group += [g] * size
    return np.concatenate(features), gaps, texts, np.array(group)


def test_clusters_are_found_by_silhouette_and_ranked_by_size_times_gap() -> None:
    features, gaps, texts, group = _blobs()

    result = cluster_failures("banking77", features, gaps, texts)

    assert result.pca_dim == min(128, len(texts) - 1, 40)
    assert set(result.silhouettes) == {5, 10, 20}
    assert result.k == max(result.silhouettes, key=result.silhouettes.get) == 5
    # every cluster is pure (one group) at the chosen k, and the ranking is size x mean gap
    for cluster in result.clusters:
        assert len(set(group[cluster.members])) == 1
    scores = [c.score for c in result.clusters]
    assert scores == sorted(scores, reverse=True)
    top_groups = [int(group[c.members[0]]) for c in result.chosen()]
    assert top_groups == [2, 1, 0, 3]   # 20 x 0.9 = 18 > 12 x 1.0 = 12 > 30 x 0.2 = 6 > 8 x 0.5 = 4; 25 x 0 never
    assert all(len(c.examples) == min(5, c.size) for c in result.clusters)


def test_pca_dimension_shrinks_with_few_samples_and_tiny_inputs_form_one_cluster() -> None:
    features, gaps, texts, _ = _blobs()
    few = cluster_failures("t", features[:7], gaps[:7], texts[:7])
    assert few.pca_dim == 6 and set(few.silhouettes) <= {5}
    two = cluster_failures("t", features[:2], gaps[:2], texts[:2])
    assert two.k == 1 and two.clusters[0].size == 2 and two.silhouette is None
    empty = cluster_failures("t", np.zeros((0, 40)), [], [])
    assert empty.n_failures == 0 and empty.top == []


def test_cluster_report_and_json_round_trip(tmp_path) -> None:
    features, gaps, texts, _ = _blobs()
    result = cluster_failures("clinc150", features, gaps, texts)
    report = cluster_report({"clinc150": result})
    assert "clinc150" in report and "size x gap" in report
    assert report.count("- group") == sum(len(c.examples) for c in result.chosen())
    again = read_clusters(write_clusters({"clinc150": result}, tmp_path / "c.json"))["clinc150"]
    assert again.top == result.top and [c.members for c in again.clusters] == [c.members for c in result.clusters]


def _failures_and_pool():
    features, gaps, texts, group = _blobs()
    rng = np.random.default_rng(1)
    failures = [Failure(request_id=f"r{i}", task="banking77", prompt=texts[i], failed_tier="T1",
                        uncertainty=float(rng.uniform(0.3, 0.9)), failed_output="x", teacher_tier="T4",
                        teacher_output="card_arrival", gap=float(gaps[i] * rng.uniform(0.5, 1.0)))
                for i in range(len(texts))]
    ok = [RequestRecord(request_id=f"ok{i}", task="banking77", prompt=f"easy query {i}",
                        calls=(TierCall(tier="T1", uncertainty=0.05),), source="decision_log") for i in range(300)]
    escalated = [RequestRecord(request_id=f.request_id, task="banking77", prompt=f.prompt,
                               calls=(TierCall(tier="T1", escalated=True), TierCall(tier="T4")), source="decision_log")
                 for f in failures]
    return features, failures, ok + escalated


def test_selection_takes_the_hardest_30_percent_of_each_chosen_cluster_plus_20_percent_random() -> None:
    features, failures, pool = _failures_and_pool()
    clustering = {"banking77": cluster_failures("banking77", features, [f.gap for f in failures],
                                                [f.prompt for f in failures])}

    items = select_targeted(failures, clustering, pool, hard_fraction=0.3, random_share=0.2, seed=0)

    hard = [i for i in items if i.kind == "hard"]
    random_items = [i for i in items if i.kind == "random"]
    expected_hard = 0
    for cluster in clustering["banking77"].chosen():
        members = [failures[i] for i in cluster.members]
        chosen = {i.prompt for i in hard if i.cluster_id == cluster.cluster_id}
        assert len(chosen) == math.ceil(0.3 * cluster.size)
        cutoff = min(f.gap for f in members if f.prompt in chosen)
        assert all(f.gap <= cutoff for f in members if f.prompt not in chosen)   # the hardest were taken
        expected_hard += len(chosen)
    assert len(hard) == expected_hard
    assert len(random_items) == random_count(len(hard), 0.2)
    assert len(random_items) / len(items) == pytest.approx(0.2, abs=0.02)
    assert not {i.prompt for i in random_items} & {i.prompt for i in hard}
    assert all(i.teacher_output == "card_arrival" for i in hard)    # labels reuse the teacher's failure answer
    assert composition(items) == {"banking77": {"hard": len(hard), "random": len(random_items)}}
    # deterministic for a seed, different for another
    assert select_targeted(failures, clustering, pool, seed=0) == items
    assert {i.prompt for i in select_targeted(failures, clustering, pool, seed=1) if i.kind == "random"} != \
        {i.prompt for i in random_items}


def test_hardest_orders_by_gap_then_uncertainty_and_random_control_matches_counts() -> None:
    rows = [Failure(f"r{i}", "t", f"q{i}", "T1", u, None, "T4", "a", gap)
            for i, (gap, u) in enumerate([(0.5, 0.1), (0.9, 0.2), (0.9, 0.8), (0.1, 0.9)])]
    assert [f.request_id for f in hardest(rows, 0.5)] == ["r2", "r1"]
    assert random_count(8, 0.2) == 2 and random_count(0, 0.2) == 0
    _, _, pool = _failures_and_pool()
    control = select_random(pool, {"banking77": 17}, seed=3)
    assert len(control) == 17 and len({i.prompt for i in control}) == 17 and all(i.kind == "random" for i in control)
