"""Quality ratio, cost ratio and tier shares of a system's routes, relative to Always-top.

A system's routes on n queries are two arrays (:class:`Routes`): which tiers each query tried and
which tier's answer it kept.  Cascades only escalate upward, so the tried tiers, in cost order, are
the path.  From them and the all-pairs data every figure follows:

* quality of a query = quality of the kept answer; cost = the sum over every tier tried (a
  cascaded query pays for each answer it asked for); latency = the sum of the tried tiers' latencies.
* quality ratio = sum_t w_t * (sum of the system's quality on task t / sum of the top tier's), with
  w_t the task's share of the queries (volume-weighted over tasks, as the paper's Table 2);
  cost ratio the same with cost.  Always-top therefore scores exactly 1.0 and 1.0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from routenlp_core.decision_record import Attempt, DecisionRecord


@dataclass
class Routes:
    """A system's decisions on ``rows`` as arrays: ``tried`` bool (n, K), ``final`` int (n,) 0-based."""

    rows: np.ndarray
    tried: np.ndarray
    final: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rows = np.asarray(self.rows, dtype=np.int64)
        self.tried = np.asarray(self.tried, dtype=bool)
        self.final = np.asarray(self.final, dtype=np.int64)
        n = len(self.rows)
        if self.tried.shape[0] != n or self.final.shape != (n,):
            raise ValueError(f"routes of {n} rows: tried {self.tried.shape}, final {self.final.shape}")
        if n and not self.tried[np.arange(n), self.final].all():
            raise ValueError("every query's final tier must be among the tiers it tried")

    @classmethod
    def single(cls, rows: np.ndarray, tiers: np.ndarray, K: int, **info: Any) -> "Routes":
        """Routes of a one-shot router: each query tries exactly one tier."""
        tiers = np.asarray(tiers, dtype=np.int64)
        tried = np.zeros((len(tiers), K), dtype=bool)
        tried[np.arange(len(tiers)), tiers] = True
        return cls(rows=rows, tried=tried, final=tiers, info=dict(info))

    @classmethod
    def from_paths(cls, rows: np.ndarray, paths: Sequence[Sequence[int]], K: int, **info: Any) -> "Routes":
        """Routes from 0-based tier paths (each increasing); the last tier of a path is kept."""
        tried = np.zeros((len(paths), K), dtype=bool)
        final = np.zeros(len(paths), dtype=np.int64)
        for i, path in enumerate(paths):
            if list(path) != sorted(set(path)) or not path:
                raise ValueError(f"path {list(path)} must be non-empty and strictly increasing")
            tried[i, list(path)] = True
            final[i] = path[-1]
        return cls(rows=rows, tried=tried, final=final, info=dict(info))

    def paths(self) -> list[list[int]]:
        return [np.nonzero(row)[0].tolist() for row in self.tried]

    def decisions(self, data: Any, **labels: Any) -> list[DecisionRecord]:
        """Each query's decision record (the proxy's format; tiers 1-based, every tier tried priced from
        the data, all but the kept one escalated), ``labels`` (system, seed) kept beside its fields."""
        out = []
        for row, path, final in zip(self.rows, self.paths(), self.final):
            attempts = tuple(Attempt(tier=k + 1, tier_name=data.tier_names[k], cost_usd=float(np.nan_to_num(data.cost[row, k])),
                                     latency_ms=float(data.latency[row, k]), escalated=k != final) for k in path)
            out.append(DecisionRecord(request_id=str(data.ids[row]), task=str(data.task_names[row]), task_status="known",
                                      attempts=attempts, final_tier=data.tier_names[final],
                                      total_cost_usd=float(sum(a.cost_usd for a in attempts)), extra=labels))
        return out


def served_only(data: Any, routes: Routes) -> Routes:
    """Routes with every tier that does not serve the query's task replaced by the next one that does.

    A deployment cannot send a task to a tier restricted to other tasks (the proxy skips it), so a
    system that names such a tier is served by the next more capable eligible tier instead.  A no-op
    on data where every tier serves every task.
    """
    served = getattr(data, "served", None)
    if served is None or served.all():
        return routes
    K = routes.tried.shape[1]
    next_served = np.zeros((served.shape[0], K), dtype=np.int64)
    for task in range(served.shape[0]):
        for k in range(K):
            next_served[task, k] = next(j for j in range(k, K) if served[task, j] or j == K - 1)
    task_ids = data.task_ids[routes.rows]
    tried = np.zeros_like(routes.tried)
    for k in range(K):
        hit = routes.tried[:, k]
        tried[np.nonzero(hit)[0], next_served[task_ids[hit], k]] = True
    final = next_served[task_ids, routes.final]
    return Routes(rows=routes.rows, tried=tried, final=final, info=routes.info)


def per_query(data: Any, routes: Routes) -> dict[str, np.ndarray]:
    """Per query: quality of the kept answer, total cost and sequential latency over tiers tried."""
    rows = routes.rows
    return {"quality": data.quality[rows, routes.final],
            "cost": (data.cost[rows] * routes.tried).sum(axis=1),
            "latency": (data.latency[rows] * routes.tried).sum(axis=1)}


def _weighted_ratio(values: np.ndarray, reference: np.ndarray, task_ids: np.ndarray) -> float:
    """sum_t w_t * sum(values on t) / sum(reference on t), w_t = share of queries of task t."""
    total = 0.0
    n = len(task_ids)
    for task in np.unique(task_ids):
        mask = task_ids == task
        numerator, denominator = float(values[mask].sum()), float(reference[mask].sum())
        if denominator > 0:
            ratio = numerator / denominator
        else:  # the top tier scores 0 (or costs 0) on every query of the task: equal if also 0
            ratio = 1.0 if numerator == 0 else float("inf")
        total += mask.sum() / n * ratio
    return total


def quality_ratio(data: Any, routes: Routes) -> float:
    top = data.K - 1
    return _weighted_ratio(per_query(data, routes)["quality"], data.quality[routes.rows, top],
                           data.task_ids[routes.rows])


def cost_ratio(data: Any, routes: Routes) -> float:
    top = data.K - 1
    return _weighted_ratio(per_query(data, routes)["cost"], data.cost[routes.rows, top], data.task_ids[routes.rows])


def tier_shares(routes: Routes, K: int) -> np.ndarray:
    """Share of queries whose answer came from each tier."""
    if len(routes.final) == 0:
        return np.zeros(K)
    return np.bincount(routes.final, minlength=K) / len(routes.final)


def summarise(data: Any, routes: Routes) -> dict[str, Any]:
    """Headline figures of one system on one seed's test rows (latency ones come from queueing)."""
    values = per_query(data, routes)
    top = data.K - 1
    rows = routes.rows
    out: dict[str, Any] = {
        "quality_ratio": quality_ratio(data, routes),
        "cost_ratio": cost_ratio(data, routes),
        "tier_shares": dict(zip(data.tier_names, tier_shares(routes, data.K).tolist())),
        "escalation_rate": float((routes.tried.sum(axis=1) > 1).mean()) if len(rows) else 0.0,
        "mean_quality": float(values["quality"].mean()),
        "acceptable_rate": float(data.acceptable[rows, routes.final].mean()),
        "per_task": {},
    }
    for task_index, task in enumerate(data.tasks):
        mask = data.task_ids[rows] == task_index
        if not mask.any():
            continue
        sub = Routes(rows=rows[mask], tried=routes.tried[mask], final=routes.final[mask])
        out["per_task"][task] = {
            "n": int(mask.sum()),
            "quality_ratio": quality_ratio(data, sub),
            "cost_ratio": cost_ratio(data, sub),
            "quality": float(values["quality"][mask].mean()),
            "top_quality": float(data.quality[rows[mask], top].mean()),
        }
    return out


def mean_std(values: Sequence[float]) -> dict[str, Optional[float]]:
    array = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if array.size == 0:
        return {"mean": None, "std": None}
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if array.size > 1 else 0.0}
