"""``routenlp bench``: every system, every seed, the same splits; then metrics, tests and reports.

For one benchmark (one or more all-pairs files sharing a portfolio):

1. read and validate the files, embed the prompts through the cache;
2. for each seed: split every (file, task) group into train / calibration / test; fit every system
   on train + calibration (:mod:`coopt.bench.systems`); route the test rows; score quality and cost
   ratios against Always-top; simulate the tier queues at each arrival rate; run RouteNLP's sweeps
   (alpha, threshold perturbation, tau, route confidence) and the task-mix shift test;
3. aggregate mean and std over seeds, paired-bootstrap RouteNLP against each other system, check the
   goal (quality ratio >= target at the lowest cost ratio), and write the outputs
   (:mod:`coopt.bench.report`).
"""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from threadpoolctl import threadpool_limits  # scikit-learn's own dependency (declared in the train extra)
from tqdm import tqdm

from routenlp_core.allpairs import Portfolio, data_sha256, load_portfolio, read_allpairs
from calibration.calibrate import deltas_of, evaluate_thresholds
import coopt.bench.baselines  # noqa: F401  (importing registers the baselines)
from coopt.bench import report, routenlp
from coopt.bench.datasets import SHARED_DATASETS, materialise
from coopt.bench.bootstrap import PairedSample, paired_bootstrap
from coopt.bench.data import BenchData, default_cache_path
from coopt.bench.metrics import Routes, cost_ratio, mean_std, per_query, quality_ratio, served_only, summarise
from coopt.bench.queueing import SLA_MODES, QueueConfig, simulate, simulate_sla
from coopt.bench.report import write_json
from coopt.bench.systems import SYSTEMS, TARGET_QUALITY, FitContext

DEFAULT_ORDER = ("Always-top", "Always-T2", "Rule-based", "RouteNLP", "RouteNLP (CRC)", "RouteNLP (paper rule)",
                 "RouteNLP w/o cascade",
                 "RouteNLP w/o task cond.", "Random", "FrugalGPT", "Hybrid LLM", "RouteLLM", "AutoMix", "kNN",
                 "Oracle")
ALPHA_SWEEP = (0.01, 0.05, 0.1, 0.2, 0.3)
PERTURBATIONS = (-0.10, -0.05, 0.0, 0.05, 0.10)
REFERENCE = "RouteNLP"
PAPER_RULE = "RouteNLP (paper rule)"  # its alpha/delta/tau/route-confidence sweeps are Tables 12-13


class BenchConfig(BaseModel):
    """The benchmark's settings.  A pydantic model that rejects unknown keys (a misspelt setting is an
    error naming it, not a silently ignored default) and checks every type at construction."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, validate_assignment=True)

    seeds: int = Field(5, ge=1)
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    systems: Optional[list[str]] = None
    target_quality: float = Field(TARGET_QUALITY, gt=0.0, le=1.0)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    bootstrap: int = Field(1000, ge=0)
    sweeps: bool = True
    #: the static encoder the proxy serves (no MiniLM pass over the prompts: a cold MiniLM cache costs
    #: ~17 CPU-minutes on the shared sets); artifacts/encoder gives the MiniLM embeddings
    encoder_dir: Path = Path("artifacts/encoder-static")
    cache_path: Optional[Path] = None
    progress: bool = True
    threads: int = Field(1, ge=1)
    certify_baselines: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"seeds": list(range(self.seeds)), "split": list(self.split), "target_quality": self.target_quality,
                "queue": self.queue.to_dict(), "bootstrap_resamples": self.bootstrap, "sweeps": self.sweeps,
                "encoder": str(self.encoder_dir), "certify_baselines": self.certify_baselines}


def load_plugins(modules: Sequence[str]) -> None:
    """Import user modules that ``@register`` their own systems."""
    for module in modules:
        importlib.import_module(module)


def system_order(names: Optional[Sequence[str]]) -> list[str]:
    """Requested systems (default: all registered), ordered so every ``requires`` comes first."""
    wanted = list(names) if names else [n for n in DEFAULT_ORDER if n in SYSTEMS] + \
        [n for n in SYSTEMS if n not in DEFAULT_ORDER]
    unknown = [n for n in wanted if n not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system(s) {unknown}; registered: {', '.join(SYSTEMS)}")
    if "Always-top" not in wanted:
        wanted.insert(0, "Always-top")  # the reference every ratio is taken against
    ordered: list[str] = []

    def visit(name: str) -> None:
        if name in ordered:
            return
        for needed in getattr(SYSTEMS[name], "requires", ()):
            if needed in wanted:
                visit(needed)
        ordered.append(name)

    for name in wanted:
        visit(name)
    return ordered


def load_bench_data(paths: Sequence[Path], portfolio: Portfolio) -> BenchData:
    records, groups = [], []
    seen: set[str] = set()
    for path in paths:
        for record in read_allpairs(path, portfolio):
            if record.id in seen:
                raise ValueError(f"{path}: id {record.id!r} also appears in an earlier --data file")
            seen.add(record.id)
            records.append(record)
            groups.append(str(path))
    return BenchData(records, portfolio, groups=groups)


def _queue_figures(routes: Routes, mean_service_s: np.ndarray, config: QueueConfig, seed: int) -> dict[str, Any]:
    rates = sorted(set(config.arrivals_per_min) | {config.headline_per_min})
    out = {}
    for index, rate in enumerate(rates):
        rng = np.random.default_rng([seed, index, 99])
        out[str(int(rate))] = simulate(routes.tried, mean_service_s, rate / 60.0, config, rng)
    return out


def _sla_figures(data: BenchData, routes: Routes, mean_service_s: np.ndarray, config: QueueConfig,
                 seed: int) -> dict[str, Any]:
    """Latency, SLA violation, quality and cost at each arrival rate without and with the proxy's
    SLA-aware routing (budget ``config.sla_ms`` at p99 and at p50): the same arrivals, draws and
    service times in every mode (one generator seed per rate), so the modes are paired."""
    rates = sorted(set(config.arrivals_per_min) | {config.headline_per_min})
    allowed = data.served[data.task_ids[routes.rows]]
    out: dict[str, Any] = {}
    for index, rate in enumerate(rates):
        out[str(int(rate))] = {
            mode or "none": simulate_sla(routes.tried, mean_service_s, rate / 60.0, config,
                                         np.random.default_rng([seed, index, 99]), quantile=mode, finals=routes.final,
                                         allowed=allowed, quality=data.quality[routes.rows],
                                         cost=data.cost[routes.rows])
            for mode in SLA_MODES}
    return out


def _sweeps(system: Any, data: BenchData, test: np.ndarray, calib: np.ndarray) -> dict[str, Any]:
    """RouteNLP's Tables 12-13 figures on one seed's test rows (recalibrated on the calibration rows)."""
    def figures(routes: Routes) -> dict[str, float]:
        s = summarise(data, routes)
        return {"quality_ratio": s["quality_ratio"], "cost_ratio": s["cost_ratio"],
                "escalation_rate": s["escalation_rate"]}

    out: dict[str, Any] = {"route_confidence": {}, "alpha": {}, "delta": {}, "tau": {}}
    rc, alpha = system.route_confidence, system.alpha
    for value in system.settings["route_confidences"][1::2]:  # every other grid value keeps the plot readable
        doc = system.calibrate_on(calib, value, alpha) if alpha is not None else None
        out["route_confidence"][str(value)] = figures(system.route(test, route_confidence=value, thresholds_doc=doc))
    if system.can_cascade():
        for value in ALPHA_SWEEP:
            doc = system.calibrate_on(calib, rc, value)
            out["alpha"][str(value)] = figures(system.route(test, thresholds_doc=doc, alpha=value))
        for step in PERTURBATIONS:
            key = f"{step:+.0%}"
            out["delta"][key] = figures(system.route(test, delta_scale=1.0 + step))
            doc = system.calibrate_on(calib, rc, alpha, portfolio=system.scaled_tau_portfolio(1.0 + step))
            out["tau"][key] = figures(system.route(test, thresholds_doc=doc))
    if len(data.tasks) > 1 and system.can_cascade():
        out["shift"] = _shift_test(system, data, test, calib)
    return out


def _mix(data: BenchData, rows: np.ndarray, shares: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The largest subsample of ``rows`` whose task mix is ``shares`` (sampled without replacement)."""
    counts = np.array([np.sum(data.task_ids[rows] == t) for t in range(len(data.tasks))])
    total = int(np.min(np.where(shares > 0, counts / np.maximum(shares, 1e-12), np.inf)))
    chosen = []
    for t, share in enumerate(shares):
        pool = rows[data.task_ids[rows] == t]
        chosen.extend(rng.choice(pool, size=min(len(pool), int(round(total * share))), replace=False))
    return np.array(sorted(chosen), dtype=np.int64)


def _shift_test(system: Any, data: BenchData, test: np.ndarray, calib: np.ndarray) -> dict[str, Any]:
    """Calibrate on one task mix (first task 80%), test on another (last task 80%), vs a matched mix."""
    T = len(data.tasks)
    mix_a = np.full(T, 0.2 / (T - 1))
    mix_a[0] = 0.8
    mix_b = mix_a[::-1].copy()
    rng = np.random.default_rng([system.ctx.seed, 13])
    test_b = _mix(data, test, mix_b, rng)
    out: dict[str, Any] = {"calibration_mix": dict(zip(data.tasks, mix_a.tolist())),
                           "test_mix": dict(zip(data.tasks, mix_b.tolist()))}
    for label, calib_rows in (("shifted", _mix(data, calib, mix_a, rng)), ("matched", _mix(data, calib, mix_b, rng))):
        doc = system.calibrate_on(calib_rows, system.route_confidence, system.alpha)
        routes = system.route(test_b, thresholds_doc=doc)
        s = summarise(data, routes)
        start = system.start_tiers(system.router.proba_rows(test_b), system.route_confidence, test_b)
        violation, n = 0.0, 0
        if doc is not None:
            measured = evaluate_thresholds([data.records[i] for i in test_b], data.portfolio,
                                           deltas_of({"thresholds": doc}), start)
            for tier in data.tier_names[:-1]:
                for cell in measured.get(tier, {}).values():
                    violation += cell["violation"] * cell["n"]
                    n += cell["n"]
        out[label] = {"n_calibration": int(len(calib_rows)), "n_test": int(len(test_b)),
                      "quality_ratio": s["quality_ratio"], "cost_ratio": s["cost_ratio"],
                      "violation": violation / n if n else None}
    return out


def run_benchmark(data: BenchData, out_dir: Path, config: BenchConfig, meta: dict[str, Any],
                  progress_bar: Any = None) -> dict[str, Any]:
    """Fit, route and score every system for every seed; write the outputs to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # calibrate() logs a warning for every thin (tier, task) cell; the bench records the cells' n in
    # results.json instead of printing thousands of lines over the sweeps
    calibration_log = logging.getLogger("calibration.calibrate")
    level = calibration_log.level
    calibration_log.setLevel(logging.ERROR)
    try:
        return _run_benchmark(data, out_dir, config, meta, progress_bar)
    finally:
        calibration_log.setLevel(level)


def _run_benchmark(data: BenchData, out_dir: Path, config: BenchConfig, meta: dict[str, Any],
                   progress_bar: Any) -> dict[str, Any]:
    names = system_order(config.systems)
    mean_service_s = data.latency.mean(axis=0) / 1000.0
    per_seed: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    test_values: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in names}
    test_tasks: list[np.ndarray] = []
    sweeps: list[dict[str, Any]] = []
    timings: dict[str, float] = {name: 0.0 for name in names}
    decisions_path = out_dir / "decisions.jsonl"
    work = out_dir / "work"
    splits = [data.split(seed, config.split) for seed in range(config.seeds)]
    with open(decisions_path, "w", encoding="utf-8") as decisions:
        for seed, split in enumerate(splits):
            ctx = FitContext(data=data, split=split, work_dir=work, encoder_dir=config.encoder_dir,
                             cache_path=config.cache_path, target_quality=config.target_quality,
                             certify=config.certify_baselines)
            test_tasks.append(data.task_ids[split.test])
            for name in names:
                if progress_bar is not None:
                    progress_bar.set_postfix_str(f"{meta.get('name', '')} seed {seed} {name}"[:60])
                started = time.perf_counter()
                system = SYSTEMS[name]()
                system.fit(ctx)
                routes = served_only(data, system.route(split.test))
                ctx.test_routes[name] = routes
                figures = summarise(data, routes)
                figures["queue"] = _queue_figures(routes, mean_service_s, config.queue, seed)
                if SYSTEMS[name].family == "routenlp":  # every RouteNLP system, with and without SLA-aware routing (issue 12)
                    figures["sla_routing"] = _sla_figures(data, routes, mean_service_s, config.queue, seed)
                figures["operating_point"] = system.operating_point
                figures["notes"] = list(system.notes)
                figures["certified"] = certified_flag(system)
                # the knob curve on the test rows: RouteLLM's APGR/CPT on 2-tier sets, and every RouteNLP
                # system's cost at the paper rule's quality (issue 14, :func:`at_quality_of`)
                curve = getattr(system, "curve", None) if data.K == 2 or SYSTEMS[name].family == "routenlp" else None
                curve_routes = None if curve is None else [served_only(data, r) for r in curve(split.test)]
                if curve_routes is not None:
                    figures["curve_points"] = task_curve_points(data, curve_routes)
                if data.K == 2:
                    figures["router_metrics"] = two_tier_metrics(data, split.test, routes, curve_routes)
                if name == PAPER_RULE and config.sweeps and isinstance(system, routenlp.RouteNLPPaperRule):
                    sweeps.append(_sweeps(system, data, split.test, split.calib))
                per_seed[name].append(figures)
                values = per_query(data, routes)
                test_values[name].append(values)
                for record in routes.decisions(data, system=name, seed=seed):
                    decisions.write(record.to_json() + "\n")
                timings[name] += time.perf_counter() - started
                if progress_bar is not None:
                    progress_bar.update(1)
    top = data.K - 1
    reference_values = [{"quality": data.quality[split.test, top], "cost": data.cost[split.test, top]}
                        for split in splits]
    results = aggregate(data, names, per_seed, test_values, reference_values, test_tasks, config)
    results["data"] = meta
    results["split"] = {"fractions": list(config.split), "seeds": list(range(config.seeds)),
                        "by": "file and task", "sizes": {
                            "train": int(len(splits[0].train)), "calibration": int(len(splits[0].calib)),
                            "test": int(len(splits[0].test))}}
    results["config"] = config.to_dict()
    results["sweeps"] = aggregate_sweeps(sweeps)
    results["seconds_per_system"] = {name: round(seconds, 2) for name, seconds in timings.items()}
    results["goal"] = goal(results, config.target_quality)
    report.write_all(out_dir, results, data)
    return results


def aggregate(data: BenchData, names: Sequence[str], per_seed: dict[str, list[dict[str, Any]]],
              test_values: dict[str, list[dict[str, np.ndarray]]], reference_values: list[dict[str, np.ndarray]],
              test_tasks: list[np.ndarray], config: BenchConfig) -> dict[str, Any]:
    headline = str(int(config.queue.headline_per_min))
    systems_out: dict[str, Any] = {}
    for name in names:
        seeds = per_seed[name]
        entry: dict[str, Any] = {
            "family": SYSTEMS[name].family,
            "quality_ratio": mean_std([s["quality_ratio"] for s in seeds]),
            "cost_ratio": mean_std([s["cost_ratio"] for s in seeds]),
            "p99_ms": mean_std([s["queue"][headline]["p99_ms"] for s in seeds]),
            "sla_violation": mean_std([s["queue"][headline]["sla_violation"] for s in seeds]),
            "tier_shares": {tier: mean_std([s["tier_shares"][tier] for s in seeds]) for tier in data.tier_names},
            "escalation_rate": mean_std([s["escalation_rate"] for s in seeds]),
            "acceptable_rate": mean_std([s["acceptable_rate"] for s in seeds]),
            "per_task": {task: {metric: mean_std([s["per_task"][task][metric] for s in seeds if task in s["per_task"]])
                                for metric in ("quality_ratio", "cost_ratio", "quality", "top_quality")}
                         for task in data.tasks},
            "load": {rate: {metric: mean_std([s["queue"][rate][metric] for s in seeds])
                            for metric in ("p50_ms", "p99_ms", "mean_ms", "sla_violation")}
                     for rate in seeds[0]["queue"]},
            "utilisation_at_headline": [mean_std([s["queue"][headline]["utilisation"][k] for s in seeds])["mean"]
                                        for k in range(data.K)],
            "peak_utilisation_at_headline": max(max(s["queue"][headline]["utilisation"]) for s in seeds),
            "per_seed": [{"quality_ratio": s["quality_ratio"], "cost_ratio": s["cost_ratio"],
                          "met_target": bool(s["quality_ratio"] >= config.target_quality - 1e-12),
                          "per_task": {task: {"quality_ratio": cell["quality_ratio"], "cost_ratio": cell["cost_ratio"],
                                              "met_target": bool(cell["quality_ratio"] >= config.target_quality - 1e-12)}
                                       for task, cell in s["per_task"].items()},
                          "certified": s["certified"], "router_metrics": s.get("router_metrics"),
                          "operating_point": s["operating_point"]} for s in seeds],
            "min_seed_quality_ratio": min(s["quality_ratio"] for s in seeds),
            "seeds_meeting_target": sum(bool(s["quality_ratio"] >= config.target_quality - 1e-12) for s in seeds),
            "certified": all(s["certified"] for s in seeds),
            "notes": sorted({note for s in seeds for note in s["notes"]}),
        }
        if "sla_routing" in seeds[0]:
            entry["sla_routing"] = {
                rate: {mode: {metric: mean_std([s["sla_routing"][rate][mode][metric] for s in seeds])
                              for metric in ("p50_ms", "p99_ms", "sla_violation", "forced", "quality_ratio",
                                             "cost_ratio")}
                       for mode in modes}
                for rate, modes in seeds[0]["sla_routing"].items()}
        if REFERENCE in test_values and name != REFERENCE:
            entry["vs_routenlp"] = {}
            for metric, key in (("cost", "p_cost"), ("quality", "p_quality")):
                samples = [PairedSample(a=test_values[REFERENCE][i][metric], b=test_values[name][i][metric],
                                        reference=reference_values[i][metric], task_ids=test_tasks[i])
                           for i in range(len(test_tasks))]
                result = paired_bootstrap(samples, config.bootstrap, seed=0)
                entry["vs_routenlp"][metric] = {"delta": result["delta"], "ci95": result["ci95"],
                                                "p": result["p_lower"] if metric == "cost" else result["p_two_sided"]}
        if "curve_points" in seeds[0] and PAPER_RULE in per_seed and name != PAPER_RULE:
            entry["at_paper_rule_quality"] = at_quality_of(seeds, per_seed[PAPER_RULE])
        if seeds[0].get("router_metrics"):
            entry["router_metrics"] = {key: mean_std([s["router_metrics"][key] for s in seeds
                                                      if s["router_metrics"].get(key) is not None])
                                       for key in ("apgr", "cpt50", "cpt80", "pgr", "strong_share")}
        systems_out[name] = entry
    return {"systems": systems_out}


def task_curve_points(data: BenchData, curve: Sequence[Routes]) -> dict[str, Any]:
    """Per task: its test rows and the (quality ratio, cost ratio) of every knob value's routes."""
    out: dict[str, Any] = {}
    rows = curve[0].rows
    for index, task in enumerate(data.tasks):
        mask = data.task_ids[rows] == index
        if not mask.any():
            continue
        subs = [Routes(rows=r.rows[mask], tried=r.tried[mask], final=r.final[mask]) for r in curve]
        out[task] = {"n": int(mask.sum()), "points": [(quality_ratio(data, r), cost_ratio(data, r)) for r in subs]}
    return out


def at_quality_of(seeds: Sequence[dict[str, Any]], other: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A system's cost where its knob curves reach another system's test quality, seed by seed.

    Issue 14 asks for RouteNLP "lower [in cost] than the paper-rule RouteNLP at the quality that rule
    reaches".  Both rules set their knob per task, so per seed and task: the cheapest test cost
    ratio over RouteNLP's knob values whose test quality ratio on the task is at least the paper
    rule's on the same rows; the tasks are then weighted by volume, as every ratio of the bench.
    This reads RouteNLP's frontier on the test rows (the knob picked in hindsight) against the
    paper rule's operating point: it compares what the two decision rules can do at one quality,
    not RouteNLP's certified operating point (that is the headline row).  None for a seed where a
    task's curve never reaches the paper rule's quality."""
    costs: list[Optional[float]] = []
    for mine, theirs in zip(seeds, other):
        total, n, reached = 0.0, 0, True
        for task, cell in mine["curve_points"].items():
            want = theirs["per_task"][task]["quality_ratio"]
            reach = [c for q, c in cell["points"] if q >= want - 1e-12]
            if not reach:
                reached = False
                break
            total += cell["n"] * min(reach)
            n += cell["n"]
        costs.append(total / n if reached and n else None)
    reached = [c for c in costs if c is not None]
    return {"cost_ratio": mean_std(reached), "per_seed": costs, "seeds_reached": len(reached),
            "quality_ratio": mean_std([s["quality_ratio"] for s in other]),
            "other_cost_ratio": mean_std([s["cost_ratio"] for s in other])}


def certified_flag(system: Any) -> bool:
    """Whether the system's operating point carries a finite-sample certificate on every task."""
    per_task = getattr(system, "certified_tasks", None)
    if per_task is not None:
        return bool(per_task) and all(per_task.values())
    return bool(getattr(system, "certified", False))


def pgr_curve_metrics(shares: Sequence[float], pgrs: Sequence[float]) -> dict[str, Optional[float]]:
    """APGR and CPT(50%) / CPT(80%) from (share of calls to the strong tier, PGR) points (RouteLLM).

    The curve is anchored at (0, 0) (every query to the weak tier) and (1, 1) (every query to the
    strong one), interpolated linearly over the share of strong calls; APGR is its area (trapezoid
    on a 1% grid), CPT(x) the smallest share of strong calls whose interpolated PGR reaches x.
    Random routing has PGR = share in expectation: APGR 0.5, CPT(x) = x.
    """
    points = sorted(zip([0.0, *shares, 1.0], [0.0, *pgrs, 1.0]))
    xs = np.array([p[0] for p in points])
    ys = np.array([p[1] for p in points])
    # several knob values can give one share: keep the best PGR at each share (the router's frontier)
    unique = np.unique(xs)
    best = np.array([ys[xs == x].max() for x in unique])
    grid = np.linspace(0.0, 1.0, 101)
    curve = np.interp(grid, unique, best)
    apgr = float(np.sum((curve[1:] + curve[:-1]) / 2.0) / (len(grid) - 1))

    def cpt(level: float) -> Optional[float]:
        hit = np.nonzero(curve >= level - 1e-12)[0]
        return float(grid[hit[0]]) if hit.size else None

    return {"apgr": apgr, "cpt50": cpt(0.5), "cpt80": cpt(0.8)}


def two_tier_metrics(data: Any, rows: np.ndarray, routes: Routes, curve: Optional[Sequence[Routes]] = None) -> dict[str, Any]:
    """PGR and share of strong calls at the operating point; APGR/CPT over the system's knob curve
    (``curve``: the test routes at every knob value, already restricted to served tiers)."""
    weak, strong = data.quality[rows, 0].mean(), data.quality[rows, 1].mean()
    gap = strong - weak

    def point(r: Routes) -> tuple[float, Optional[float]]:
        share = float(r.tried[:, 1].mean())
        quality = float(data.quality[r.rows, r.final].mean())
        return share, (quality - weak) / gap if abs(gap) > 1e-12 else None

    share, pgr = point(routes)
    out: dict[str, Any] = {"strong_share": share, "pgr": pgr, "apgr": None, "cpt50": None, "cpt80": None}
    if curve is not None and abs(gap) > 1e-12:
        points = [point(r) for r in curve]
        out.update(pgr_curve_metrics([p[0] for p in points], [p[1] for p in points]))
    return out


def aggregate_sweeps(sweeps: list[dict[str, Any]]) -> dict[str, Any]:
    if not sweeps:
        return {}
    out: dict[str, Any] = {}
    for kind in ("route_confidence", "alpha", "delta", "tau"):
        keys = sweeps[0].get(kind, {}).keys()
        out[kind] = {key: {metric: mean_std([s[kind][key][metric] for s in sweeps])
                           for metric in ("quality_ratio", "cost_ratio", "escalation_rate")} for key in keys}
    if "shift" in sweeps[0]:
        out["shift"] = {"calibration_mix": sweeps[0]["shift"]["calibration_mix"],
                        "test_mix": sweeps[0]["shift"]["test_mix"]}
        for label in ("shifted", "matched"):
            out["shift"][label] = {metric: mean_std([s["shift"][label][metric] for s in sweeps])
                                   for metric in ("quality_ratio", "cost_ratio", "violation", "n_calibration", "n_test")}
    return out


def goal(results: dict[str, Any], target: float) -> dict[str, Any]:
    """RouteNLP's quality ratio >= target with the lowest cost ratio of all non-oracle baselines."""
    systems_out = results["systems"]
    if REFERENCE not in systems_out:
        return {"evaluated": False}
    ours = systems_out[REFERENCE]
    quality, cost = ours["quality_ratio"]["mean"], ours["cost_ratio"]["mean"]
    others = {name: entry for name, entry in systems_out.items()
              if entry["family"] in ("baseline", "reference") and name != "Always-top"}
    cheapest = min(others.items(), key=lambda item: item[1]["cost_ratio"]["mean"]) if others else None
    at_quality = {name: entry for name, entry in others.items() if entry["quality_ratio"]["mean"] >= target}
    cheapest_at_quality = min(at_quality.items(), key=lambda item: item[1]["cost_ratio"]["mean"]) if at_quality else None
    out = {"evaluated": True, "target_quality_ratio": target, "routenlp_quality_ratio": quality,
           "routenlp_cost_ratio": cost, "quality_reached": quality >= target,
           "quality_shortfall": max(0.0, target - quality)}
    if cheapest is not None:
        out["cheapest_other"] = {"system": cheapest[0], "cost_ratio": cheapest[1]["cost_ratio"]["mean"],
                                 "quality_ratio": cheapest[1]["quality_ratio"]["mean"]}
        out["lowest_cost_of_all"] = cost <= cheapest[1]["cost_ratio"]["mean"] + 1e-12
    if cheapest_at_quality is not None:
        out["cheapest_other_at_target"] = {"system": cheapest_at_quality[0],
                                           "cost_ratio": cheapest_at_quality[1]["cost_ratio"]["mean"],
                                           "quality_ratio": cheapest_at_quality[1]["quality_ratio"]["mean"]}
        out["lowest_cost_at_target"] = cost <= cheapest_at_quality[1]["cost_ratio"]["mean"] + 1e-12
    else:
        out["lowest_cost_at_target"] = True
    out["met"] = bool(out["quality_reached"] and out.get("lowest_cost_of_all", True))
    out["met_among_systems_at_target"] = bool(out["quality_reached"] and out["lowest_cost_at_target"])
    # issue 14's "must show": mean >= target, no seed below target - 0.01, every task's mean within
    # 0.01 of its target, cheaper than every baseline reaching the target and than the paper rule
    out["min_seed_quality_ratio"] = ours["min_seed_quality_ratio"]
    out["no_seed_below"] = bool(ours["min_seed_quality_ratio"] >= target - 0.01 - 1e-12)
    task_means = {task: cell["quality_ratio"]["mean"] for task, cell in ours["per_task"].items()
                  if cell["quality_ratio"]["mean"] is not None}
    out["task_means"] = task_means
    # "within 0.01 of its target" read both ways: a task far above its target (certified at the top
    # tier) keeps the promise but spends cost it was allowed to save, so it does not count as within
    out["no_task_below_0.01"] = bool(all(v >= target - 0.01 - 1e-12 for v in task_means.values()))
    out["every_task_within_0.01"] = bool(all(abs(v - target) <= 0.01 + 1e-12 for v in task_means.values()))
    paper = systems_out.get(PAPER_RULE)
    if paper is not None:
        out["paper_rule"] = {"quality_ratio": paper["quality_ratio"]["mean"], "cost_ratio": paper["cost_ratio"]["mean"]}
        at = ours.get("at_paper_rule_quality")
        if at is not None:
            # at the quality the paper rule reaches (RouteNLP's knob curves), not at RouteNLP's operating
            # point; a seed whose curves never reach that quality counts against RouteNLP
            every = at["seeds_reached"] == len(at["per_seed"])
            out["at_paper_rule_quality"] = {"cost_ratio": at["cost_ratio"]["mean"], "per_seed": at["per_seed"],
                                            "seeds_reached": at["seeds_reached"]}
            out["cheaper_than_paper_rule"] = bool(every and at["cost_ratio"]["mean"] < paper["cost_ratio"]["mean"])
        else:
            out["cheaper_than_paper_rule"] = bool(cost < paper["cost_ratio"]["mean"])
    out["must_show"] = bool(out["quality_reached"] and out["no_seed_below"] and out["every_task_within_0.01"]
                            and out["lowest_cost_at_target"] and out.get("cheaper_than_paper_rule", True))
    return out


def bench_files(data_paths: Sequence[Path], portfolio_path: Path, out_dir: Path, config: BenchConfig,
                name: Optional[str] = None) -> dict[str, Any]:
    """Benchmark one or more all-pairs files sharing ``portfolio_path``; outputs go to ``out_dir``."""
    started = time.perf_counter()
    portfolio = load_portfolio(portfolio_path)
    data = load_bench_data([Path(p) for p in data_paths], portfolio)
    cache_path = config.cache_path or default_cache_path(config.encoder_dir)
    config.cache_path = cache_path
    with tqdm(total=len(data.prompts), desc=f"embed {name or ''}".strip(), unit="q", disable=not config.progress,
              leave=False) as bar:
        bar.update(0)
        data.load_embeddings(config.encoder_dir, cache_path, progress=bar.update, threads=config.threads)
    meta = {"name": name or Path(data_paths[0]).stem, "files": [str(p) for p in data_paths],
            "sha256": {str(p): data_sha256(p) for p in data_paths}, "portfolio": portfolio.to_dict(),
            "n": data.n, "tasks": {task: int(np.sum(data.task_names == task)) for task in data.tasks},
            "tiers": data.tier_names, "latency_measured": data.latency_measured.tolist(),
            "uncertainty_available": data.has_uncertainty.tolist(),
            "mean_service_ms": data.latency.mean(axis=0).round(2).tolist()}
    names = system_order(config.systems)
    # One BLAS thread: on a shared 2-core machine a multi-threaded BLAS oversubscribes the cores and
    # scikit-learn's solvers ran ~40x slower here; the work is many small fits, not one big one.
    with threadpool_limits(limits=config.threads), \
            tqdm(total=config.seeds * len(names), desc=f"bench {meta['name']}", unit="fit",
                 disable=not config.progress) as bar:
        results = run_benchmark(data, out_dir, config, meta, progress_bar=bar)
    results["seconds"] = round(time.perf_counter() - started, 1)

    write_json(Path(out_dir) / "results.json", results)
    return results


def bench_shared(names: Sequence[str], out_dir: Path, config: BenchConfig,
                 data_dir: Optional[Path] = None) -> dict[str, dict[str, Any]]:
    """Materialise each shared set into ``out_dir/data`` and benchmark it into ``out_dir/<name>``."""
    started = time.perf_counter()
    if list(names) == ["all"]:
        names = list(SHARED_DATASETS)
    out_dir = Path(out_dir)
    all_results = {}
    for name in names:
        data_path, portfolio_path = materialise(name, out_dir / "data", data_dir)
        all_results[name] = bench_files([data_path], portfolio_path, out_dir / name, config, name=name)
    report.write_summary(out_dir, all_results, time.perf_counter() - started)
    return all_results
