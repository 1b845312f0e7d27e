"""The run's figures as tables and plots: per-iteration (paper Table 4) and targeted vs random.

``routenlp coopt report --run-dir DIR`` writes ``DIR/report.md`` and ``DIR/plots/*.png`` from the
iterations' ``metrics.json`` (and ``compare/compare.json`` when the comparison ran).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from coopt.versions import active_iteration, iteration_dir, iterations


def load_iterations(run_dir: str | Path) -> list[dict[str, Any]]:
    run_dir = Path(run_dir)
    return [json.loads((iteration_dir(run_dir, n) / "metrics.json").read_text()) for n in iterations(run_dir)]


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _students(metrics: dict[str, Any]) -> list[str]:
    keys = sorted(k for k in metrics.get("tier_acceptance_eval", {}) if k.split("/")[0] in ("T1", "T2"))
    return keys


def iteration_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per iteration -- quality, cost ratio, cheap-tier and top-tier share, students."""
    if not rows:
        return "(no iterations)\n"
    students = _students(rows[0])
    header = (["iter", "quality", "acceptance", "cost ratio", "cheap-tier share (T1+T2)", "top-tier share (T4)",
               "escalated"] + [f"{k} acceptable" for k in students] +
              ["failures", "distilled: hard+random per task", "time (steps)"])
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for m in rows:
        items = m.get("distill_items") or {}
        n_items = sum(v.get("hard", 0) + v.get("random", 0) for v in items.values()) if items else None
        # the steps' own durations: a resumed iteration's wall time would leave out the part done before
        seconds = sum((m.get("timings") or {}).values()) or m.get("seconds")
        cells = [str(m.get("iteration")), _num(m.get("quality")), _pct(m.get("acceptance")),
                 _num(m.get("cost_ratio"), 4), _pct(m.get("cheap_share")), _pct(m.get("top_share")),
                 _pct(m.get("escalation_rate"))]
        cells += [_pct((m.get("tier_acceptance_eval") or {}).get(k)) for k in students]
        per_task = ", ".join(f"{task} {v.get('hard', 0)}+{v.get('random', 0)}" for task, v in sorted(items.items()))
        cells += ["-" if m.get("n_failures") is None else str(m["n_failures"]),
                  "-" if n_items is None else f"{n_items} ({per_task})",
                  "-" if seconds is None else f"{seconds / 60:.1f} min"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def per_task_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: cost ratio and acceptance per task and iteration."""
    if not rows:
        return ""
    tasks = sorted(rows[0].get("per_task", {}))
    header = ["iter"] + [f"{t} {what}" for t in tasks for what in ("cost ratio", "acceptance", "T4 share")]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for m in rows:
        cells = [str(m.get("iteration"))]
        for task in tasks:
            t = (m.get("per_task") or {}).get(task, {})
            cells += [_num(t.get("cost_ratio"), 4), _pct(t.get("acceptance")), _pct(t.get("top_share"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison_table(result: dict[str, Any]) -> str:
    """Markdown: start, targeted and every random arm side by side, the reductions per task, and the ratio."""
    randoms = result["random"] if isinstance(result["random"], list) else [result["random"]]
    reduction = result["cost_ratio_reduction"]
    each = reduction.get("random_each") or [reduction.get("random")]
    arms = [("start (iteration 0)", result["start"], None),
            ("targeted (cluster) distillation = iteration 1", result["targeted"], reduction["targeted"])]
    arms += [(f"random, same count (draw {i + 1})", arm, gain) for i, (arm, gain) in enumerate(zip(randoms, each))]
    students = sorted(k for k in (result["start"].get("tier_acceptance_eval") or {}) if k.split("/")[0] in ("T1", "T2"))
    header = ["arm", "cost ratio", "reduction", "quality", "acceptance", "cheap share", "top share"] + \
        [f"{k} acceptable" for k in students]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for name, arm, gain in arms:
        cells = [name, _num(arm.get("cost_ratio"), 4), "-" if gain is None else f"{gain:+.4f}",
                 _num(arm.get("quality")), _pct(arm.get("acceptance")), _pct(arm.get("cheap_share")),
                 _pct(arm.get("top_share"))]
        cells += [_pct((arm.get("tier_acceptance_eval") or {}).get(k)) for k in students]
        lines.append("| " + " | ".join(cells) + " |")
    per_task = result.get("per_task") or {}
    if per_task:
        lines += ["", "| task | reduction, targeted | reduction, random (mean; each) | targeted / random |",
                  "| --- | --- | --- | --- |"]
        for task, row in per_task.items():
            ratio = row.get("targeted_over_random")
            lines.append(f"| {task} | {row['targeted']:+.4f} | {row['random_mean']:+.4f}; "
                         f"{', '.join(f'{g:+.4f}' for g in row['random_each'])} | "
                         f"{'-' if ratio is None else f'{ratio:.2f}x'} |")
    ratio = result.get("targeted_over_random")
    sd = reduction.get("random_sd")
    lines.append("")
    lines.append((f"Cost-ratio reduction, targeted / random: **{ratio:.2f}x**" if ratio is not None
                  else f"Cost-ratio reduction, targeted / random: undefined ({result.get('note')})")
                 + (f" (random: mean {reduction.get('random_mean', 0):+.4f}, sd {sd:.4f} over {len(each)} draws)"
                    if sd is not None else ""))
    return "\n".join(lines) + "\n"


def plot_iterations(rows: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    its = [m["iteration"] for m in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(its, [m["cost_ratio"] for m in rows], marker="o", color="tab:red", label="cost ratio (vs all-T4)")
    left.set_xlabel("iteration")
    left.set_ylabel("cost ratio", color="tab:red")
    left.set_xticks(its)
    twin = left.twinx()
    twin.plot(its, [m["acceptance"] for m in rows], marker="s", color="tab:blue", label="acceptance")
    twin.set_ylabel("acceptance", color="tab:blue")
    left.set_title("cost and quality per iteration")
    tiers = sorted(rows[0].get("final_tier_share", {}))
    bottom = [0.0] * len(rows)
    for tier in tiers:
        values = [m["final_tier_share"].get(tier, 0.0) for m in rows]
        right.bar(its, values, bottom=bottom, label=tier)
        bottom = [b + v for b, v in zip(bottom, values)]
    right.set_xticks(its)
    right.set_xlabel("iteration")
    right.set_ylabel("share of answers")
    right.set_title("which tier answered")
    right.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    path = out_dir / "iterations.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def plot_comparison(result: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    randoms = result["random"] if isinstance(result["random"], list) else [result["random"]]
    reduction = result["cost_ratio_reduction"]
    each = reduction.get("random_each") or [reduction.get("random")]
    tasks = list(result.get("per_task") or {})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    groups = ["all"] + tasks
    targeted = [reduction["targeted"]] + [result["per_task"][t]["targeted"] for t in tasks]
    random_mean = [float(sum(each) / len(each))] + [result["per_task"][t]["random_mean"] for t in tasks]
    xs = range(len(groups))
    left.bar([x - 0.2 for x in xs], targeted, width=0.4, color="tab:green", label="targeted")
    left.bar([x + 0.2 for x in xs], random_mean, width=0.4, color="tab:gray", label=f"random (mean of {len(each)})")
    for x, task in zip(xs, groups):
        points = each if task == "all" else result["per_task"][task]["random_each"]
        left.scatter([x + 0.2] * len(points), points, color="black", s=10, zorder=3)
    left.axhline(0, color="black", linewidth=0.5)
    left.set_xticks(list(xs))
    left.set_xticklabels(groups)
    left.set_ylabel("cost-ratio reduction from iteration 0")
    ratio = result.get("targeted_over_random")
    left.set_title("targeted vs random distillation" + (f" ({ratio:.2f}x overall)" if ratio is not None else ""))
    left.legend(fontsize=8)
    students = sorted(k for k in (result["start"].get("tier_acceptance_eval") or {}) if k.split("/")[0] in ("T1", "T2"))
    arms = [("start", result["start"]), ("targeted", result["targeted"])] + \
        [(f"random {i + 1}", arm) for i, arm in enumerate(randoms)]
    width = 0.8 / len(arms)
    for position, (name, arm) in enumerate(arms):
        offset = -0.4 + width * (position + 0.5)
        right.bar([x + offset for x in range(len(students))],
                  [(arm.get("tier_acceptance_eval") or {}).get(k) or 0.0 for k in students], width=width, label=name)
    right.set_xticks(list(range(len(students))))
    right.set_xticklabels(students, fontsize=8)
    right.set_ylabel("student acceptance (eval set)")
    right.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "targeted_vs_random.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def write_report(run_dir: str | Path) -> Path:
    """``run_dir/report.md`` with the tables, and the plots beside it."""
    run_dir = Path(run_dir)
    rows = load_iterations(run_dir)
    plots = run_dir / "plots"
    parts = [f"# Co-optimisation run `{run_dir}`", "",
             f"Active iteration: {active_iteration(run_dir)}", "", "## Per iteration (evaluation set)", "",
             iteration_table(rows), "", "## Per task", "", per_task_table(rows)]
    if rows:
        plot_iterations(rows, plots)
        parts += ["", "![iterations](plots/iterations.png)", ""]
    compare = run_dir / "compare" / "compare.json"
    if compare.is_file():
        result = json.loads(compare.read_text())
        plot_comparison(result, plots)
        parts += ["## Targeted vs random distillation (same number of examples, from iteration 0)", "",
                  comparison_table(result), "", "![targeted vs random](plots/targeted_vs_random.png)", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
