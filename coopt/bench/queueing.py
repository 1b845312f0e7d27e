"""Latency under load: a discrete-event simulation of the tiers as queues (the paper's Appendix J).

Queries arrive as a Poisson process.  Each follows its path of tiers (routed tier, then every tier it
escalated to).  Every tier but the top one is an M/M/c queue: ``c`` workers, first come first
served, exponential service times whose mean is the tier's mean latency in the data (or, with
``service="empirical"``, each query's own recorded latency).  The top tier is a rate-limited API: at
most ``top_rate_per_s`` requests start per second (FIFO), and any number run at once.  Defaults are
the paper's set-up: T1 8 workers, T2 and T3 4 each, the top tier at 60 requests/s, SLA p99 <= 500 ms.

Paths only go upward in cost order, so the network is feed-forward: the tiers are simulated one
after the other, tier k's arrivals being the fresh queries routed to it plus the completions of the
tiers below that escalate to it.  Each tier is then the classic FIFO multi-server recursion
(start = max(arrival, earliest free worker)), which is exact for FIFO queues.

:func:`erlang_c` and :func:`mmc_mean_wait` give the closed-form M/M/c waiting time the tests
compare the simulation against.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from litellm_routenlp.latency_budget import LatencyBudget, TierLatencies, choose_escalation, choose_start


@dataclass
class QueueConfig:
    """Appendix J defaults; every field can be set from the command line."""

    arrivals_per_min: tuple[float, ...] = (1000.0, 5000.0, 10000.0, 20000.0)
    headline_per_min: float = 1000.0
    workers: tuple[int, ...] = (8, 4, 4)          # tiers below the top, cheapest first; the last repeats
    top_rate_per_s: Optional[float] = 60.0        # None: the top tier is a queue like the others
    sla_ms: float = 500.0
    n_arrivals: int = 20000
    warmup_fraction: float = 0.1
    service: str = "exponential"                  # or "empirical"

    def workers_of(self, tier: int, K: int) -> Optional[int]:
        """Workers of 0-based ``tier``; None for a rate-limited top tier."""
        if tier == K - 1 and self.top_rate_per_s is not None:
            return None
        return int(self.workers[min(tier, len(self.workers) - 1)])

    def to_dict(self) -> dict[str, Any]:
        return {"arrivals_per_min": list(self.arrivals_per_min), "headline_per_min": self.headline_per_min,
                "workers_below_top": list(self.workers), "top_rate_per_s": self.top_rate_per_s,
                "sla_ms": self.sla_ms, "n_arrivals": self.n_arrivals, "warmup_fraction": self.warmup_fraction,
                "service": self.service}


def fifo_multi_server(arrivals: np.ndarray, service: np.ndarray, workers: int) -> np.ndarray:
    """Start times of FIFO service with ``workers`` servers (arrivals sorted ascending)."""
    free = [0.0] * workers
    starts = np.empty(len(arrivals))
    pop, push = heapq.heappop, heapq.heappush
    for i, (arrival, duration) in enumerate(zip(arrivals.tolist(), service.tolist())):
        earliest = pop(free)
        start = arrival if arrival > earliest else earliest
        starts[i] = start
        push(free, start + duration)
    return starts


def rate_limited(arrivals: np.ndarray, rate_per_s: float) -> np.ndarray:
    """Start times when at most ``rate_per_s`` requests may start per second, FIFO (sorted arrivals).

    start_i = max(arrival_i, start_{i-1} + 1/rate), solved in closed form with a running maximum.
    """
    gap = 1.0 / rate_per_s
    index = np.arange(len(arrivals)) * gap
    return np.maximum.accumulate(arrivals - index) + index


def simulate(paths: np.ndarray, mean_service_s: Sequence[float], arrivals_per_s: float,
             config: QueueConfig, rng: np.random.Generator,
             service_s: Optional[np.ndarray] = None) -> dict[str, Any]:
    """End-to-end latency of ``config.n_arrivals`` Poisson arrivals, each taking the path of a query
    drawn at random from ``paths`` (bool (m, K): the tiers each query tried, as :class:`Routes.tried`).

    ``service_s`` (m, K) gives each query's own service time per tier for
    ``config.service == "empirical"``.  Returns p50/p99/mean latency (ms), the share over the SLA and
    each tier's offered utilisation (>= 1 means the queue grows without bound over the window).
    """
    paths = np.asarray(paths, dtype=bool)
    K = paths.shape[1]
    n = config.n_arrivals
    arrival = np.cumsum(rng.exponential(1.0 / arrivals_per_s, size=n))
    which = rng.integers(0, len(paths), size=n)
    tried = paths[which]
    ready = arrival.copy()                  # when each query reaches its next tier
    utilisation = []
    for k in range(K):
        visiting = np.nonzero(tried[:, k])[0]
        if visiting.size == 0:
            utilisation.append(0.0)
            continue
        order = visiting[np.argsort(ready[visiting], kind="stable")]
        at = ready[order]
        if config.service == "empirical" and service_s is not None:
            duration = service_s[which[order], k]
        else:
            duration = rng.exponential(mean_service_s[k], size=order.size)
        workers = config.workers_of(k, K)
        rate_k = order.size / arrival[-1]
        if workers is None:
            starts = rate_limited(at, config.top_rate_per_s)
            utilisation.append(rate_k / config.top_rate_per_s)
        else:
            starts = fifo_multi_server(at, duration, workers)
            utilisation.append(rate_k * mean_service_s[k] / workers)
        ready[order] = starts + duration
    latency_ms = (ready - arrival) * 1000.0
    kept = latency_ms[int(n * config.warmup_fraction):]
    return {"p50_ms": float(np.percentile(kept, 50)), "p99_ms": float(np.percentile(kept, 99)),
            "mean_ms": float(kept.mean()), "sla_violation": float((kept > config.sla_ms).mean()),
            "utilisation": [float(u) for u in utilisation]}


#: the guards the bench compares: none, and the proxy's latency budget (--sla-ms) stated at p99 and at p50
SLA_MODES = (None, "p99", "p50")


def simulate_sla(paths: np.ndarray, mean_service_s: Sequence[float], arrivals_per_s: float, config: QueueConfig,
                 rng: np.random.Generator, quantile: Optional[str] = None, finals: Optional[np.ndarray] = None,
                 allowed: Optional[np.ndarray] = None, quality: Optional[np.ndarray] = None,
                 cost: Optional[np.ndarray] = None, service_s: Optional[np.ndarray] = None,
                 window: int = 20, max_age_s: float = 300.0) -> dict[str, Any]:
    """The tiers as in :func:`simulate`, event by event, with or without the proxy's SLA-aware routing.

    With ``quantile`` ("p99" / "p50") every query carries the budget ``config.sla_ms`` at that quantile
    and the proxy's own decision code (:mod:`litellm_routenlp.latency_budget`) decides, from rolling
    windows of the time each tier took on the visits that ended before the decision (queueing
    included: what the proxy measures of a call): a start tier expected over budget is replaced, and an
    escalation over budget goes to another tier or stops.  After a replaced start the query follows
    the tiers of its own path above the new one (each escalation checked again); whatever it ends on
    is its answer (``finals`` gives the answer of a path left as it was).  Feedback needs the events in
    time order, hence an event loop here rather than :func:`simulate`'s tier-by-tier recursion.

    ``allowed`` (m, K) bool: the tiers each query may use (the proxy's ``routenlp_tasks``);
    ``quality`` / ``cost`` (m, K): per tier, to report quality and cost ratios against the top tier
    over the simulated draws.  Returns :func:`simulate`'s figures plus ``forced`` (share of queries
    a budget moved) and, when given, ``quality_ratio`` and ``cost_ratio``.
    """
    paths = np.asarray(paths, dtype=bool)
    m, K = paths.shape
    n = config.n_arrivals
    arrival = np.cumsum(rng.exponential(1.0 / arrivals_per_s, size=n))
    which = rng.integers(0, m, size=n)
    if config.service == "empirical" and service_s is not None:
        duration = np.asarray(service_s)[which]
    else:
        duration = rng.exponential(np.asarray(mean_service_s, dtype=np.float64)[None, :], size=(n, K))
    own = [np.nonzero(row)[0].tolist() for row in paths]
    last = [p[-1] for p in own] if finals is None else [int(f) for f in finals]
    may = ([list(range(1, K + 1))] * m if allowed is None
           else [(np.nonzero(row)[0] + 1).tolist() for row in np.asarray(allowed, dtype=bool)])
    clock = [0.0]
    latencies = TierLatencies(window=window, max_age_s=max_age_s, clock=lambda: clock[0])
    budget = LatencyBudget(config.sla_ms, quantile) if quantile else None
    workers = [config.workers_of(k, K) for k in range(K)]
    gap = 1.0 / config.top_rate_per_s if config.top_rate_per_s else 0.0
    busy, waiting, next_slot = [0] * K, [deque() for _ in range(K)], [0.0] * K
    at_tier = np.zeros(n)
    done = np.zeros(n)
    final = np.zeros(n, dtype=np.int64)
    paid = np.zeros(n)
    forced = np.zeros(n, dtype=bool)
    moved = np.zeros(n, dtype=bool)
    visits = np.zeros(K)
    heap: list[tuple[float, int, int, int]] = [(float(arrival[i]), i, -1, i) for i in range(n)]  # (t, seq, tier, query)
    heapq.heapify(heap)
    seq = n
    push, pop = heapq.heappush, heapq.heappop

    def enqueue(i: int, k: int, t: float) -> None:
        nonlocal seq
        at_tier[i] = t
        visits[k] += 1
        if workers[k] is None:                       # rate-limited API: FIFO start slots, no worker limit
            start = max(t, next_slot[k])
            next_slot[k] = start + gap
        elif busy[k] < workers[k]:
            busy[k] += 1
            start = t
        else:
            waiting[k].append(i)
            return
        seq += 1
        push(heap, (start + duration[i, k], seq, k, i))

    while heap:
        t, _, k, i = pop(heap)
        row = which[i]
        if k < 0:                                    # a fresh arrival: its start tier
            start_tier = own[row][0]
            if budget is not None:
                clock[0] = t
                chosen, note = choose_start(budget, latencies, start_tier + 1, may[row])
                forced[i] |= note.forced
                moved[i] |= chosen - 1 != start_tier
                start_tier = chosen - 1
            enqueue(i, start_tier, t)
            continue
        latencies.observe(k + 1, (t - at_tier[i]) * 1000.0, now=t)
        if workers[k] is not None:
            if waiting[k]:
                j = waiting[k].popleft()
                seq += 1
                push(heap, (t + duration[j, k], seq, k, j))
            else:
                busy[k] -= 1
        if cost is not None:
            paid[i] += cost[row, k]
        above = [tier for tier in own[row] if tier > k]
        target = above[0] if above else None
        if target is not None and budget is not None:
            clock[0] = t
            chosen, note = choose_escalation(budget, latencies, k + 1, target + 1, may[row], (t - arrival[i]) * 1000.0)
            forced[i] |= note.forced
            moved[i] |= chosen is None or chosen - 1 != target
            target = None if chosen is None else chosen - 1
        if target is None:
            done[i] = t
            final[i] = last[row] if not moved[i] else k
            continue
        enqueue(i, target, t)
    latency_ms = (done - arrival) * 1000.0
    keep = slice(int(n * config.warmup_fraction), None)
    kept = latency_ms[keep]
    span = arrival[-1]
    out: dict[str, Any] = {
        "p50_ms": float(np.percentile(kept, 50)), "p99_ms": float(np.percentile(kept, 99)),
        "mean_ms": float(kept.mean()), "sla_violation": float((kept > config.sla_ms).mean()),
        "forced": float(forced[keep].mean()),
        "utilisation": [float(visits[k] / span / config.top_rate_per_s) if workers[k] is None
                        else float(visits[k] / span * mean_service_s[k] / workers[k]) for k in range(K)]}
    rows, top = which[keep], K - 1
    if quality is not None:
        reference = float(np.sum(quality[rows, top]))
        out["quality_ratio"] = float(np.sum(quality[rows, final[keep]]) / reference) if reference else None
    if cost is not None:
        reference = float(np.sum(cost[rows, top]))
        out["cost_ratio"] = float(np.sum(paid[keep]) / reference) if reference else None
    return out


def erlang_c(workers: int, arrival_rate: float, service_rate: float) -> float:
    """P(an arrival waits) in an M/M/c queue (Erlang C); requires arrival_rate < workers * service_rate."""
    offered = arrival_rate / service_rate
    rho = offered / workers
    if rho >= 1:
        raise ValueError(f"unstable queue: utilisation {rho:.3f} >= 1")
    term = sum(offered ** k / math.factorial(k) for k in range(workers))
    tail = offered ** workers / math.factorial(workers) / (1 - rho)
    return tail / (term + tail)


def mmc_mean_wait(workers: int, arrival_rate: float, service_rate: float) -> float:
    """Mean time in queue (before service) of an M/M/c queue: C(c, a) / (c mu - lambda)."""
    return erlang_c(workers, arrival_rate, service_rate) / (workers * service_rate - arrival_rate)
