"""Step 2: failure clusters per task -- where, in the router's own feature space, the cheap tiers fail.

Per task: the router's penultimate features of the failed queries (``RouterModel.penultimate``, 256-d)
-> PCA to 128 dimensions (fewer when there are fewer samples: at most n - 1) -> k-means for each k in
{5, 10, 20} that the sample allows (2 <= k < n), keeping the k with the best silhouette -> clusters
ranked by size x mean quality gap -> the top 5.  scikit-learn does the maths; everything is seeded.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from litellm_routenlp.router_model import RouterModel

PCA_DIM = 128
K_CANDIDATES = (5, 10, 20)
TOP_CLUSTERS = 5
EXAMPLES_PER_CLUSTER = 5


@dataclass
class Cluster:
    """One failure cluster of a task."""

    cluster_id: int
    size: int
    mean_gap: float
    score: float                       # size x mean gap: the ranking key
    members: list[int]                 # indices into the task's failures
    examples: list[str]                # up to five queries nearest the centroid
    mean_uncertainty: Optional[float] = None


@dataclass
class TaskClusters:
    """The clustering of one task's failures and its ranking."""

    task: str
    n_failures: int
    pca_dim: int
    k: int
    silhouette: Optional[float]
    silhouettes: dict[int, float] = field(default_factory=dict)   # every k tried
    clusters: list[Cluster] = field(default_factory=list)          # all clusters, best-ranked first
    top: list[int] = field(default_factory=list)                   # cluster ids of the top 5

    def chosen(self) -> list[Cluster]:
        by_id = {cluster.cluster_id: cluster for cluster in self.clusters}
        return [by_id[i] for i in self.top]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["silhouettes"] = {str(k): v for k, v in self.silhouettes.items()}
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TaskClusters":
        clusters = [Cluster(**c) for c in raw.get("clusters", [])]
        return cls(task=raw["task"], n_failures=raw["n_failures"], pca_dim=raw["pca_dim"], k=raw["k"],
                   silhouette=raw.get("silhouette"),
                   silhouettes={int(k): v for k, v in raw.get("silhouettes", {}).items()},
                   clusters=clusters, top=list(raw.get("top", [])))


def cluster_failures(task: str, features: np.ndarray, gaps: Sequence[float], texts: Sequence[str],
                     uncertainties: Optional[Sequence[Optional[float]]] = None,
                     k_candidates: Sequence[int] = K_CANDIDATES,
                     pca_dim: int = PCA_DIM, top_n: int = TOP_CLUSTERS, seed: int = 0) -> TaskClusters:
    """Cluster one task's failures and rank the clusters (see module docstring).

    With fewer than 3 failures there is nothing to choose a k from: they form one cluster.
    """
    from sklearn.cluster import KMeans  # local: scikit-learn costs ~1 s to import; only clustering needs it
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score

    features = np.asarray(features, dtype=np.float64)
    gaps_arr = np.asarray(gaps, dtype=np.float64)
    n = features.shape[0]
    if n != len(gaps_arr) or n != len(texts):
        raise ValueError(f"task {task}: {n} feature rows, {len(gaps_arr)} gaps and {len(texts)} texts")
    if n == 0:
        return TaskClusters(task=task, n_failures=0, pca_dim=0, k=0, silhouette=None)
    dim = int(max(1, min(pca_dim, n - 1, features.shape[1]))) if n > 1 else 1
    reduced = PCA(n_components=dim, random_state=seed).fit_transform(features) if n > 1 else features[:, :1]
    silhouettes: dict[int, float] = {}
    best: Optional[tuple[float, int, np.ndarray, np.ndarray]] = None
    distinct = len(np.unique(reduced.round(12), axis=0))
    for k in k_candidates:
        if not 2 <= k < n or k > distinct:
            continue
        model = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(reduced)
        if len(set(model.labels_.tolist())) < 2:
            continue
        value = float(silhouette_score(reduced, model.labels_, random_state=seed))
        silhouettes[k] = round(value, 6)
        if best is None or value > best[0]:
            best = (value, k, model.labels_, model.cluster_centers_)
    if best is None:  # too few (distinct) failures for any candidate k: one cluster
        labels = np.zeros(n, dtype=int)
        centers = reduced.mean(axis=0, keepdims=True)
        k, silhouette = 1, None
    else:
        silhouette, k, labels, centers = best
    clusters = []
    u = None if uncertainties is None else np.array([np.nan if v is None else float(v) for v in uncertainties])
    for cluster_id in range(k):
        members = np.nonzero(labels == cluster_id)[0]
        if len(members) == 0:
            continue
        distance = np.linalg.norm(reduced[members] - centers[cluster_id], axis=1)
        nearest = members[np.argsort(distance, kind="stable")][:EXAMPLES_PER_CLUSTER]
        mean_gap = float(gaps_arr[members].mean())
        mean_u = None
        if u is not None and np.any(~np.isnan(u[members])):
            mean_u = round(float(np.nanmean(u[members])), 6)
        clusters.append(Cluster(cluster_id=cluster_id, size=int(len(members)), mean_gap=round(mean_gap, 6),
                                score=round(len(members) * mean_gap, 6), members=[int(i) for i in members],
                                examples=[texts[i] for i in nearest], mean_uncertainty=mean_u))
    clusters.sort(key=lambda c: (-c.score, -c.size, c.cluster_id))
    top = [c.cluster_id for c in clusters if c.score > 0][:top_n]
    return TaskClusters(task=task, n_failures=n, pca_dim=dim, k=k,
                        silhouette=None if silhouette is None else round(float(silhouette), 6),
                        silhouettes=silhouettes, clusters=clusters, top=top)


def cluster_all(failures: Sequence[Any], router: RouterModel, seed: int = 0,
                progress: bool = True) -> dict[str, TaskClusters]:
    """Cluster every task's failures (``coopt.failures.Failure``) on ``router``'s penultimate features.

    A :class:`RouterModel`, not any :class:`~litellm_routenlp.routers.Router`: the features are the
    trained head's hidden layer (``RouterModel.penultimate``), which the Router protocol has no
    notion of; co-optimisation always clusters on the encoder-head router it trained.

    Member indices refer to the task's failures in the order they appear in ``failures``.
    """
    out: dict[str, TaskClusters] = {}
    tasks = sorted({f.task for f in failures})
    for task in tqdm(tasks, desc="clustering failures", disable=not progress or not tasks):
        rows = [f for f in failures if f.task == task]
        features = router.penultimate([f.prompt for f in rows], [f.task for f in rows])
        out[task] = cluster_failures(task, features, [f.gap for f in rows], [f.prompt for f in rows],
                                     [f.uncertainty for f in rows], seed=seed)
    return out


def failures_of(task_clusters: TaskClusters, failures: Sequence[Any]) -> list[Any]:
    """The failures of ``task_clusters.task`` in member-index order."""
    return [f for f in failures if f.task == task_clusters.task]


def cluster_report(clustering: dict[str, TaskClusters]) -> str:
    """Readable report: per task, the chosen k, then the top clusters with size, gap, five queries."""
    lines = ["# Failure clusters", ""]
    for task, result in clustering.items():
        tried = ", ".join(f"k={k}: {v:.3f}" for k, v in sorted(result.silhouettes.items())) or "none (too few failures)"
        lines += [f"## {task}: {result.n_failures} failures, PCA {result.pca_dim}-d, k = {result.k} "
                  f"(silhouette {tried})", ""]
        if not result.top:
            lines += ["No cluster with a positive quality gap.", ""]
            continue
        lines += ["| rank | cluster | size | mean gap | size x gap | mean u |", "| --- | --- | --- | --- | --- | --- |"]
        for rank, cluster in enumerate(result.chosen(), start=1):
            mean_u = "-" if cluster.mean_uncertainty is None else f"{cluster.mean_uncertainty:.3f}"
            lines.append(f"| {rank} | {cluster.cluster_id} | {cluster.size} | {cluster.mean_gap:.3f} | "
                         f"{cluster.score:.2f} | {mean_u} |")
        lines.append("")
        for rank, cluster in enumerate(result.chosen(), start=1):
            lines.append(f"**#{rank} (cluster {cluster.cluster_id}, {cluster.size} failures, "
                         f"gap {cluster.mean_gap:.2f})**")
            lines += [f"- {_one_line(text)}" for text in cluster.examples]
            lines.append("")
    return "\n".join(lines) + "\n"


def write_clusters(clustering: dict[str, TaskClusters], path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({task: result.to_dict() for task, result in clustering.items()}, indent=1,
                               ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_clusters(path: str | os.PathLike[str]) -> dict[str, TaskClusters]:
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    return {task: TaskClusters.from_dict(value) for task, value in raw.items()}


def _one_line(text: str, limit: int = 120) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."
