"""The benchmark's outputs: results.json, table.md (laid out like the paper's Table 2) and PNG plots.

``decisions.jsonl`` is written while the benchmark runs (:mod:`coopt.bench.run`): one line per
system, seed and test query (a ``routenlp_core.decision_record.DecisionRecord``, the proxy's format, with
``system`` and ``seed`` beside its fields), from which every figure here can be recomputed with the data file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

#: utilisation from which a tier's queue counts as saturated in the table (marked with †)
SATURATED = 0.95


def jsonable(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: Path, document: Any) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(document, indent=2, allow_nan=False, default=jsonable) + "\n")
    temporary.replace(path)


def _pm(stat: dict[str, Any], digits: int = 3, percent: bool = False) -> str:
    if stat is None or stat.get("mean") is None:
        return "-"
    scale = 100.0 if percent else 1.0
    mean, std = stat["mean"] * scale, (stat["std"] or 0.0) * scale
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _p(value: Any) -> str:
    if value is None:
        return "-"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def table_markdown(results: dict[str, Any]) -> str:
    """Table 2's layout: per system, per-task quality/cost ratios, then the aggregate and the SLA figures."""
    systems = results["systems"]
    meta = results.get("data", {})
    tasks = list(meta.get("tasks", {}))
    tiers = meta.get("tiers", [])
    headline = int(results.get("config", {}).get("queue", {}).get("headline_per_min", 0))
    lines = [f"### {meta.get('name', 'benchmark')}: n = {meta.get('n')}, tiers {', '.join(tiers)}, "
             f"{len(results.get('split', {}).get('seeds', []))} seeds, test share "
             f"{results.get('split', {}).get('fractions', ['?'] * 3)[2]}",
             "",
             "Quality ratio (Q) and cost ratio (C) relative to Always-top, volume-weighted over tasks; "
             f"mean ± std over seeds. p99 and SLA violation (latency > {results.get('config', {}).get('queue', {}).get('sla_ms', 500):.0f} ms) "
             f"from the queue simulation at {headline} queries/min. p(cost): paired bootstrap, one-sided, "
             "H0 = RouteNLP is not cheaper.",
             ""]
    header = ["System"] + [f"{task} Q / C" for task in tasks] + ["Q ratio", "C ratio", "min seed Q", "seeds >= target",
                                                                   "certified", "tier shares (" + "/".join(tiers) + ")",
                                                                   "p99 ms", "SLA viol.", "p(cost)"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    any_unstable = False
    for name, entry in systems.items():
        per_task = [f"{entry['per_task'][t]['quality_ratio']['mean']:.3f} / {entry['per_task'][t]['cost_ratio']['mean']:.3f}"
                    if entry["per_task"].get(t, {}).get("quality_ratio", {}).get("mean") is not None else "-"
                    for t in tasks]
        shares = "/".join(f"{entry['tier_shares'][t]['mean'] * 100:.0f}" for t in tiers)
        p_cost = entry.get("vs_routenlp", {}).get("cost", {}).get("p")
        label = f"**{name}**" if name == "RouteNLP" else name
        unstable = entry.get("peak_utilisation_at_headline", 0.0) >= SATURATED
        any_unstable = any_unstable or unstable
        n_seeds = len(entry.get("per_seed", []))
        lines.append("| " + " | ".join([label] + per_task + [_pm(entry["quality_ratio"]), _pm(entry["cost_ratio"]),
                                                            f"{entry.get('min_seed_quality_ratio', float('nan')):.3f}",
                                                            f"{entry.get('seeds_meeting_target', '-')}/{n_seeds}",
                                                            "yes" if entry.get("certified") else "no",
                                                            shares, f"{entry['p99_ms']['mean']:.0f}{'†' if unstable else ''}",
                                                            f"{entry['sla_violation']['mean'] * 100:.1f}%",
                                                            _p(p_cost)]) + " |")
    if any_unstable:
        lines += ["", f"† in at least one seed a tier runs at >= {SATURATED:.0%} of its capacity at this arrival rate: "
                      "its queue is saturated (or grows for the whole simulated window), so this p99 depends on "
                      "the window's length."]
    metrics = {name: entry["router_metrics"] for name, entry in systems.items() if entry.get("router_metrics")}
    if metrics:
        lines += ["", "Two tiers: RouteLLM's router metrics on the test rows (PGR = (Q - Q_weak) / (Q_strong - Q_weak); "
                      "APGR = area under PGR against the share of strong calls over the system's knob; CPT(x) = the "
                      "share of strong calls at which PGR first reaches x; Random with the same shares: APGR 0.5, "
                      "CPT(x) = x).", "",
                  "| System | strong share | PGR | APGR | CPT(50%) | CPT(80%) |", "|---|---|---|---|---|---|"]
        for name, m in metrics.items():
            lines.append(f"| {name} | {_pm(m['strong_share'])} | {_pm(m['pgr'])} | {_pm(m['apgr'])} | "
                         f"{_pm(m['cpt50'])} | {_pm(m['cpt80'])} |")
    goal = results.get("goal", {})
    if goal.get("evaluated"):
        lines += ["", goal_sentence(goal)]
    return "\n".join(lines) + "\n"


#: the paper's pilot headline for SLA-aware routing (issue 12), placed beside the bench's own figures
PAPER_SLA_HEADLINE = "p99 1,847 ms -> 387 ms"


def sla_markdown(results: dict[str, Any]) -> str:
    """SLA-aware routing in the queue simulation: per RouteNLP system and arrival rate, without a
    budget and with the proxy's guard (budget = the SLA, at p99 and at p50)."""
    rows = {name: entry["sla_routing"] for name, entry in results["systems"].items() if entry.get("sla_routing")}
    if not rows:
        return ""
    sla_ms = results.get("config", {}).get("queue", {}).get("sla_ms", 500)
    lines = ["", f"#### SLA-aware routing in the queue simulation (budget {sla_ms:.0f} ms; paper's pilot: "
                 f"{PAPER_SLA_HEADLINE})", "",
             "The proxy's own guard (`litellm_routenlp/latency_budget.py`) on every query, reading rolling "
             "windows of the 20 latest visits per tier (queueing included); `none` = no budget. Same arrivals "
             "and service times in every mode. Q / C ratio: against the top tier over the simulated draws "
             "(not task-weighted). mean ± std over seeds.", ""]
    for name, by_rate in rows.items():
        lines += [f"**{name}**", "", "| queries/min | budget at | p50 ms | p99 ms | SLA viol. | moved by the budget "
                                     "| Q ratio | C ratio |", "|---|---|---|---|---|---|---|---|"]
        for rate, modes in by_rate.items():
            for mode, cell in modes.items():
                lines.append(f"| {int(rate):,} | {mode} | {cell['p50_ms']['mean']:,.0f} | {cell['p99_ms']['mean']:,.0f} | "
                             f"{cell['sla_violation']['mean'] * 100:.1f}% | {cell['forced']['mean'] * 100:.1f}% | "
                             f"{_pm(cell['quality_ratio'])} | {_pm(cell['cost_ratio'])} |")
        lines.append("")
    return "\n".join(lines)


def must_show_sentence(goal: dict[str, Any]) -> str:
    """Issue 14's bar for RouteNLP, field by field."""
    if "must_show" not in goal:
        return ""
    target = goal["target_quality_ratio"]
    parts = [f"mean Q >= {target}: {'yes' if goal['quality_reached'] else 'no'}",
             f"no seed below {target - 0.01:.2f}: {'yes' if goal['no_seed_below'] else 'no'} "
             f"(min {goal['min_seed_quality_ratio']:.3f})",
             f"no task's mean more than 0.01 below: {'yes' if goal.get('no_task_below_0.01') else 'no'}",
             f"every task's mean within 0.01 either side: {'yes' if goal['every_task_within_0.01'] else 'no'} ("
             + ", ".join(f"{task} {value:.3f}" for task, value in sorted(goal["task_means"].items())) + ")",
             f"cheaper than every baseline reaching Q >= {target}: {'yes' if goal['lowest_cost_at_target'] else 'no'}"]
    if "cheaper_than_paper_rule" in goal:
        paper = goal["paper_rule"]
        at = goal.get("at_paper_rule_quality")
        if at and at["seeds_reached"] == len(at["per_seed"]):
            where = f"RouteNLP's knob curves at that quality on the test rows: C {at['cost_ratio']:.3f}"
        elif at:
            where = (f"RouteNLP's knob curves reach that quality on {at['seeds_reached']} of {len(at['per_seed'])} "
                     f"seeds" + (f" (C {at['cost_ratio']:.3f} there)" if at["seeds_reached"] else ""))
        else:
            where = f"RouteNLP's operating point: C {goal['routenlp_cost_ratio']:.3f}"
        parts.append(f"cheaper than the paper rule at the quality it reaches (Q {paper['quality_ratio']:.3f}, "
                     f"C {paper['cost_ratio']:.3f}; {where}): {'yes' if goal['cheaper_than_paper_rule'] else 'no'}")
    return f"Must-show (issue 14) {'**met**' if goal['must_show'] else '**not met**'}: " + "; ".join(parts) + "."


def goal_sentence(goal: dict[str, Any]) -> str:
    target = goal["target_quality_ratio"]
    text = (f"Goal (quality ratio >= {target} at the lowest cost ratio of the non-oracle baselines): "
            f"{'**met**' if goal['met'] else '**not met**'}. RouteNLP Q = {goal['routenlp_quality_ratio']:.3f}, "
            f"C = {goal['routenlp_cost_ratio']:.3f}")
    if not goal["quality_reached"]:
        text += f"; quality short of the target by {goal['quality_shortfall']:.3f}"
    cheapest = goal.get("cheapest_other")
    if cheapest:
        text += (f"; cheapest baseline {cheapest['system']} C = {cheapest['cost_ratio']:.3f} "
                 f"(Q = {cheapest['quality_ratio']:.3f})")
    at_target = goal.get("cheapest_other_at_target")
    if at_target:
        text += (f"; cheapest baseline reaching Q >= {target}: {at_target['system']} C = {at_target['cost_ratio']:.3f}"
                 f" ({'RouteNLP cheaper' if goal['lowest_cost_at_target'] else 'RouteNLP costlier'} by "
                 f"{abs(goal['routenlp_cost_ratio'] - at_target['cost_ratio']):.3f})")
    else:
        text += f"; no baseline reaches Q >= {target}"
    return text + "." + ("\n\n" + must_show_sentence(goal) if "must_show" in goal else "")


def sweeps_markdown(results: dict[str, Any]) -> str:
    sweeps = results.get("sweeps") or {}
    if not sweeps:
        return ""
    lines = ["", "#### RouteNLP sweeps (test split, mean over seeds; Tables 12-13)", ""]
    for kind, title in (("route_confidence", "route confidence"), ("alpha", "alpha (recalibrated)"),
                        ("delta", "calibrated delta perturbed"), ("tau", "task tau perturbed (recalibrated)")):
        cells = sweeps.get(kind) or {}
        if not cells:
            continue
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
        lines.append("|---|" + "---|" * len(cells))
        lines.append("| Q ratio | " + " | ".join(f"{c['quality_ratio']['mean']:.3f}" for c in cells.values()) + " |")
        lines.append("| C ratio | " + " | ".join(f"{c['cost_ratio']['mean']:.3f}" for c in cells.values()) + " |")
        lines.append("| escalated | " + " | ".join(f"{c['escalation_rate']['mean'] * 100:.1f}%" for c in cells.values()) + " |")
        lines.append("")
    shift = sweeps.get("shift")
    if shift:
        lines.append("Shift test: calibrate on mix " + ", ".join(f"{t} {s:.0%}" for t, s in shift["calibration_mix"].items())
                     + "; test on " + ", ".join(f"{t} {s:.0%}" for t, s in shift["test_mix"].items()) + ".")
        lines.append("")
        lines.append("| calibration | Q ratio | C ratio | violation (non-top tiers) |")
        lines.append("|---|---|---|---|")
        for label in ("matched", "shifted"):
            cell = shift[label]
            lines.append(f"| {label} | {_pm(cell['quality_ratio'])} | {_pm(cell['cost_ratio'])} | {_pm(cell['violation'])} |")
        lines.append("")
    return "\n".join(lines)


def plot_cost_quality(results: dict[str, Any], path: Path) -> None:
    import matplotlib  # local: only the figures need it, and the Agg backend must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = results["systems"]
    fig, ax = plt.subplots(figsize=(8.5, 6))
    colours = plt.get_cmap("tab20").colors
    for index, (name, entry) in enumerate(systems.items()):
        q, c = entry["quality_ratio"], entry["cost_ratio"]
        marker = "*" if name == "RouteNLP" else ("D" if entry["family"] == "bound" else
                                                 "s" if entry["family"] == "routenlp" else "o")
        ax.errorbar(c["mean"], q["mean"], xerr=c["std"], yerr=q["std"], fmt=marker, capsize=2,
                    color=colours[(2 * index) % 20 + (index // 10) % 2], markersize=13 if name == "RouteNLP" else 6,
                    elinewidth=0.8, label=name)
        ax.annotate(name, (c["mean"], q["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=6.5)
        seeds = entry.get("per_seed") or []
        if seeds:  # every seed's test point, so the spread behind the mean is visible
            ax.scatter([s_["cost_ratio"] for s_ in seeds], [s_["quality_ratio"] for s_ in seeds], s=9, alpha=0.45,
                       marker=marker, color=colours[(2 * index) % 20 + (index // 10) % 2], linewidths=0)
    sweeps = results.get("sweeps") or {}
    for kind, style in (("route_confidence", "k--"), ("alpha", "r:"), ("delta", "g-.")):
        cells = sweeps.get(kind) or {}
        if len(cells) > 1:
            xs = [cell["cost_ratio"]["mean"] for cell in cells.values()]
            ys = [cell["quality_ratio"]["mean"] for cell in cells.values()]
            ax.plot(xs, ys, style, linewidth=1, label=f"RouteNLP {kind} sweep")
    target = results.get("goal", {}).get("target_quality_ratio")
    if target:
        ax.axhline(target, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("cost ratio (vs Always-top)")
    ax.set_ylabel("quality ratio (vs Always-top)")
    ax.set_title(f"{results.get('data', {}).get('name', '')}: cost-quality plane")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_tier_shares(results: dict[str, Any], path: Path) -> None:
    import matplotlib  # local: only the figures need it, and the Agg backend must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = results["systems"]
    tiers = results.get("data", {}).get("tiers", [])
    names = list(systems)
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(names) + 1.5))
    left = np.zeros(len(names))
    for tier in tiers:
        shares = np.array([systems[name]["tier_shares"][tier]["mean"] for name in names])
        ax.barh(names, shares, left=left, label=tier)
        left += shares
    ax.invert_yaxis()
    ax.set_xlabel("share of test queries answered by each tier")
    ax.set_xlim(0, 1)
    ax.legend(ncol=len(tiers), fontsize=8, loc="lower right")
    ax.set_title(f"{results.get('data', {}).get('name', '')}: tier shares")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_all(out_dir: Path, results: dict[str, Any], data: Any = None) -> None:
    out_dir = Path(out_dir)
    write_json(out_dir / "results.json", results)
    (out_dir / "table.md").write_text(table_markdown(results) + sweeps_markdown(results) + sla_markdown(results))
    plot_cost_quality(results, out_dir / "cost_quality.png")
    plot_tier_shares(results, out_dir / "tier_shares.png")


def write_summary(out_dir: Path, all_results: dict[str, dict[str, Any]], seconds: float) -> None:
    parts = [f"# routenlp bench: {len(all_results)} data sets, {seconds:.0f} s in all\n"]
    for name, results in all_results.items():
        parts.append(table_markdown(results) + sla_markdown(results))
    (Path(out_dir) / "summary.md").write_text("\n".join(parts))
