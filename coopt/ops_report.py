"""The operations report (``routenlp report``) and its drift alerts (``routenlp check``).

What an operator needs to judge the router over a time window, read from the decision log (and, when
given, LiteLLM's spend logs through :mod:`coopt.logs`): requests, spend, the spend had every request
gone to the top tier, savings, tier shares per task, the escalation rate per (tier, task), audited
quality from verdict records, and the router's own latency; rendered as a terminal table, JSON, or
one self-contained HTML page whose plots are PNGs embedded as base64 (matplotlib's Agg backend: no
display, no files beside the page).

Reading.  The requests come from :func:`coopt.logs.read_decision_log` (one record per served
request; retracted and failed requests dropped -- the same view as the co-optimisation loop).  That
reader skips a corrupt line silently and ``read_decisions(strict=True)`` stops at the first one, but
the report must *name* every corrupt line and still read the rest, and needs fields the
:class:`~coopt.logs.RequestRecord` does not carry (``router.router_ms``, failed requests); so one
extra pass over the raw lines (:func:`scan_decision_log`) collects those and the warnings, with a
tqdm progress bar on large files.

All-top-tier spend.  Per task, the top tier's observed mean cost per call where it answered in the
window, times the task's requests ("observed").  A task the top tier never answered in the window is
"priced" instead: the top tier's per-token prices in the proxy config times each request's token
counts (its first call's ``prompt_tokens`` / ``completion_tokens``), which only LiteLLM's spend-log
rows record (the decision record has none), so this needs ``--spend-logs-json``; the completion
tokens are the cheaper tier's, an approximation of the top tier's.  Without either the task is
"unknown" and the savings are over the other tasks (the output says which, and how each was estimated).

Alerts.  (a) The paper's rule: a (tier, task) escalation rate up more than 10% relative to its
calibration baseline.  So that noise does not fire it, the rule is applied to the lower end of the
window's 95% Wilson interval (scipy.stats.binomtest(...).proportion_ci(method="wilson")): it fires
when that lower bound exceeds 1.1 x baseline.  The baseline: the thresholds / policy file's
per-cell ``escalation_rate`` (written by ``routenlp calibrate``: the share of the calibration
queries reaching the tier that the rule escalates); ``--baseline FILE`` (the JSON of
``routenlp report --json`` over a reference window) overrides it or stands in for a file without it.
(b) Audited quality: per task, the acceptable share of the verdicts (``{request_id, acceptable,
source}`` JSONL) joined to the window's requests; it fires when the upper end of its 95% Wilson
interval is below the task's certified target (the policy file's ``tasks.<t>.certificate.target``;
else 1 - ``alpha`` of the thresholds file, the paper rule's guarantee; ``--target task=x`` overrides).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from tqdm import tqdm  # maintained progress bar; byte-based so it is right before the end is known

from litellm_routenlp.config import read_yaml
from litellm_routenlp.pricing import price_usage
from coopt.logs import (_normalise_row, join_spend_logs, merge_sources, read_decision_log, read_spend_logs_json,
                        tier_names_by_model_id)

DRIFT_FACTOR = 1.1          # the paper's rule: escalation rate up more than 10% relative to baseline
CONFIDENCE = 0.95
PROGRESS_MIN_BYTES = 16 << 20  # show a progress bar from this log size on
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


# --------------------------------------------------------------------------------------------------
# time window


def parse_when(text: Optional[str], now: Optional[datetime] = None) -> Optional[datetime]:
    """``2026-12-01T10:00``, ``2026-12-01`` (UTC when no zone), ``now``, or relative: ``24h``, ``30m``, ``7d``."""
    if text is None or text == "":
        return None
    now = now or datetime.now(timezone.utc)
    if text.strip().lower() == "now":
        return now
    match = _RELATIVE.match(text)
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
    iso = text.strip()
    iso = iso[:-1] + "+00:00" if iso.endswith(("Z", "z")) else iso   # Python 3.10's fromisoformat lacks "Z"
    try:
        when = datetime.fromisoformat(iso)
    except ValueError:
        raise ValueError(f"time {text!r}: expected ISO 8601 (2026-12-01T10:00Z) or relative like 24h, 30m, 7d") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def parse_window(since: Optional[str], until: Optional[str],
                 now: Optional[datetime] = None) -> tuple[Optional[datetime], Optional[datetime]]:
    """``--since`` / ``--until`` against one ``now``; an empty window is an error, not an empty report."""
    now = now or datetime.now(timezone.utc)
    start, end = parse_when(since, now), parse_when(until, now)
    if start is not None and end is not None and start >= end:
        raise ValueError(f"--since {since} ({start.isoformat()}) is not before --until {until} ({end.isoformat()})")
    return start, end


def _ts(value: Any) -> Optional[datetime]:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _in_window(when: Optional[datetime], since: Optional[datetime], until: Optional[datetime]) -> bool:
    if when is None:
        return since is None and until is None
    return (since is None or when >= since) and (until is None or when < until)


# --------------------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True)
class LogWarning:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass
class RawScan:
    """What the raw pass over a decision log found (module docstring: why a second pass)."""

    router_ms: dict[str, float] = field(default_factory=dict)      # request id -> router latency
    tokens: dict[str, tuple[int, int]] = field(default_factory=dict)  # call id -> (prompt, completion), spend rows
    failed: list[dict[str, Any]] = field(default_factory=list)     # requests that got no answer
    warnings: list[LogWarning] = field(default_factory=list)
    lines: int = 0


def scan_decision_log(path: str | os.PathLike[str], since: Optional[datetime] = None,
                      until: Optional[datetime] = None, progress: Optional[bool] = None) -> RawScan:
    """One pass over the raw lines: router latency, failed requests, and a warning per corrupt line.

    ``progress``: None shows a tqdm bar on stderr for logs of at least :data:`PROGRESS_MIN_BYTES`.
    """
    path = Path(path)
    size = path.stat().st_size
    show = size >= PROGRESS_MIN_BYTES if progress is None else progress
    out = RawScan()
    with open(path, "rb") as handle, tqdm(total=size, unit="B", unit_scale=True, desc=f"reading {path.name}",
                                          disable=not show, file=sys.stderr) as bar:
        for number, raw in enumerate(handle, start=1):
            bar.update(len(raw))
            out.lines = number
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                torn = not raw.endswith(b"\n")
                out.warnings.append(LogWarning(str(path), number, (
                    "torn last line (a write in progress or a crash), skipped" if torn
                    else f"corrupt decision record, skipped ({error.__class__.__name__}: {error})")))
                continue
            if not isinstance(record, dict):
                out.warnings.append(LogWarning(str(path), number, f"not a JSON object ({type(record).__name__}), skipped"))
                continue
            if not _in_window(_ts(record.get("ts")), since, until):
                continue
            request_id = record.get("request_id")
            router = record.get("router") if isinstance(record.get("router"), dict) else {}
            latency = router.get("router_ms")
            if request_id and isinstance(latency, (int, float)) and not isinstance(latency, bool):
                out.router_ms.setdefault(str(request_id), float(latency))
            if not record.get("attempts") and record.get("outcome") != "failed_after_answer":
                out.failed.append({"request_id": request_id, "task": record.get("task"), "ts": record.get("ts"),
                                   "error": record.get("error")})
    return out


@dataclass(frozen=True)
class Verdict:
    request_id: str
    acceptable: bool
    source: str


def read_verdicts(path: str | os.PathLike[str], warnings: list[LogWarning]) -> list[Verdict]:
    """Verdict records ``{request_id, acceptable: bool, source}``; a bad line is a warning, not the end."""
    out = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                warnings.append(LogWarning(str(path), number, f"corrupt verdict, skipped ({error})"))
                continue
            if not isinstance(record, dict) or not record.get("request_id") or \
                    not isinstance(record.get("acceptable"), bool):
                warnings.append(LogWarning(str(path), number,
                                           "verdict needs `request_id` (string) and `acceptable` (true/false), skipped"))
                continue
            out.append(Verdict(str(record["request_id"]), record["acceptable"], str(record.get("source") or "?")))
    return out


# --------------------------------------------------------------------------------------------------
# statistics


def wilson(k: int, n: int, confidence: float = CONFIDENCE) -> Optional[tuple[float, float]]:
    """Wilson score interval of k successes in n (scipy's binomtest; None when n == 0)."""
    if n <= 0:
        return None
    from scipy.stats import binomtest  # local: scipy.stats costs ~1.2 s to import; `routenlp check` may need no interval

    interval = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))


def _tier_number(name: Optional[str]) -> int:
    try:
        return int(str(name).lstrip("T"))
    except ValueError:
        return 1 << 30


# --------------------------------------------------------------------------------------------------
# the report


@dataclass
class Alert:
    kind: str                 # escalation_drift | audited_quality
    task: str
    tier: Optional[str]
    value: float              # the window's rate
    bound: float              # the interval end the rule compares
    limit: float              # what it is compared against
    n: int
    detail: str

    def line(self) -> str:
        where = f"task={self.task}" + (f" tier={self.tier}" if self.tier else "")
        return f"ALERT {self.kind} {where}: {self.detail}"


@dataclass
class Baseline:
    """Escalation rate per (tier, task) the drift rule compares against, and where it came from."""

    rates: dict[str, dict[str, float]]
    source: str


def load_baseline(path: str | os.PathLike[str]) -> Baseline:
    """From a ``routenlp report --json`` file, or a thresholds / policy file with per-cell ``escalation_rate``."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"baseline file not found: {path}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    rates: dict[str, dict[str, float]] = {}
    if isinstance(document, dict) and isinstance(document.get("escalation"), dict):   # a report's JSON
        for task, per_tier in document["escalation"].items():
            for tier, cell in (per_tier or {}).items():
                if isinstance(cell, dict) and isinstance(cell.get("rate"), (int, float)):
                    rates.setdefault(tier, {})[task] = float(cell["rate"])
        return Baseline(rates, f"{path} (report of {document.get('window', {}).get('first_ts')} .. "
                               f"{document.get('window', {}).get('last_ts')})")
    found = thresholds_baseline(document)
    if found is None:
        raise ValueError(f"{path}: neither a `routenlp report --json` file (no `escalation`) nor a thresholds "
                         "file with per-cell `escalation_rate`")
    return Baseline(found, f"{path} (calibration)")


def thresholds_baseline(document: Any) -> Optional[dict[str, dict[str, float]]]:
    """Per-cell ``escalation_rate`` of a thresholds / policy document, when it records one."""
    cells = document.get("thresholds") if isinstance(document, dict) else None
    if not isinstance(cells, dict):
        return None
    rates = {tier: {task: float(cell["escalation_rate"]) for task, cell in per_task.items()
                    if isinstance(cell, dict) and isinstance(cell.get("escalation_rate"), (int, float))}
             for tier, per_task in cells.items() if isinstance(per_task, dict)}
    rates = {tier: per_task for tier, per_task in rates.items() if per_task}
    return rates or None


def quality_targets(document: Any) -> dict[str, float]:
    """Certified target per task: ``tasks.<t>.certificate.target``, else 1 - alpha for every cell's task."""
    out: dict[str, float] = {}
    if not isinstance(document, dict):
        return out
    alpha = document.get("alpha")
    if isinstance(alpha, (int, float)) and 0 < alpha < 1:
        for per_task in (document.get("thresholds") or {}).values():
            for task in per_task or {}:
                out[task] = 1.0 - float(alpha)
    for task, entry in (document.get("tasks") or {}).items():
        certificate = entry.get("certificate") if isinstance(entry, dict) else None
        if isinstance(certificate, dict) and isinstance(certificate.get("target"), (int, float)):
            out[task] = float(certificate["target"])
    return out


def _bucket_width(first: datetime, last: datetime, max_buckets: int = 48) -> timedelta:
    span = (last - first).total_seconds()
    for seconds in (60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400):
        if span / seconds <= max_buckets:
            return timedelta(seconds=seconds)
    return timedelta(seconds=span / max_buckets)


def build_report(records: Sequence[Any], scan: RawScan, *, since: Optional[datetime] = None,
                 until: Optional[datetime] = None, verdicts: Optional[Sequence[Verdict]] = None,
                 baseline: Optional[Baseline] = None, targets: Optional[Mapping[str, float]] = None,
                 top_tier: Optional[str] = None, top_params: Optional[Mapping[str, Any]] = None,
                 sources: Sequence[str] = ()) -> dict[str, Any]:
    """Every figure of the report, JSON-safe; ``records`` are :class:`coopt.logs.RequestRecord`.

    ``top_params``: the top tier deployment's ``litellm_params`` (its prices), for tasks the top tier
    did not answer in the window (:func:`top_tier_deployment`)."""
    records = [r for r in records if _in_window(_ts(r.ts), since, until)]
    records.sort(key=lambda r: r.ts or "")
    tiers_seen = {c.tier for r in records for c in r.calls if c.tier}
    top = top_tier or (max(tiers_seen, key=_tier_number) if tiers_seen else None)
    by_task: dict[str, list[Any]] = defaultdict(list)
    for record in records:
        by_task[record.task or "-"].append(record)

    # all-top-tier spend per task (module docstring): observed, else priced from tokens, else unknown
    top_cost: dict[str, Optional[float]] = {}
    method: dict[str, str] = {}
    for task, rows in by_task.items():
        costs = [c.cost_usd for r in rows for c in r.calls if c.tier == top and c.error is None]
        top_cost[task], method[task] = (sum(costs) / len(costs), "observed") if costs else (None, "unknown")
        if not costs and top_params:
            priced = [price for r in rows if (price := _priced_at_top(r, scan.tokens, top_params)) is not None]
            if priced:
                top_cost[task] = sum(priced) / len(priced)
                method[task] = f"priced: {top} prices x tokens ({len(priced)} of {len(rows)} requests)"

    tasks: dict[str, Any] = {}
    escalation: dict[str, dict[str, Any]] = {}
    for task, rows in sorted(by_task.items()):
        spend = sum(r.total_cost_usd for r in rows)
        finals = defaultdict(int)
        for r in rows:
            finals[r.final_tier or "?"] += 1
        per_tier: dict[str, list[int]] = defaultdict(lambda: [0, 0])   # tier -> [answered, escalated]
        for r in rows:
            for c in r.calls:
                if c.error is None and c.tier:
                    per_tier[c.tier][0] += 1
                    per_tier[c.tier][1] += int(bool(c.escalated))
        escalation[task] = {}
        for tier, (n, k) in sorted(per_tier.items(), key=lambda kv: _tier_number(kv[0])):
            if tier == top:
                continue  # the top tier never escalates
            interval = wilson(k, n)
            escalation[task][tier] = {"n": n, "escalated": k, "rate": k / n, "wilson_95": list(interval)}
        mean_top = top_cost[task]
        all_top = None if mean_top is None else mean_top * len(rows)
        tasks[task] = {
            "requests": len(rows), "spend_usd": spend,
            "all_top_usd": all_top, "all_top_method": method[task], "top_tier_mean_cost_usd": mean_top,
            "savings_usd": None if all_top is None else all_top - spend,
            "tier_shares": {t: finals[t] / len(rows) for t in sorted(finals, key=_tier_number)},
            "escalated_requests": sum(1 for r in rows if r.escalated),
        }

    known = [t for t, e in tasks.items() if e["all_top_usd"] is not None]
    spend_known = sum(tasks[t]["spend_usd"] for t in known)
    all_top_known = sum(tasks[t]["all_top_usd"] for t in known)
    totals = {
        "requests": len(records), "failed_requests": len(scan.failed),
        "spend_usd": sum(e["spend_usd"] for e in tasks.values()),
        "all_top_usd": all_top_known if known else None,
        "savings_usd": (all_top_known - spend_known) if known else None,
        "savings_pct": (100.0 * (all_top_known - spend_known) / all_top_known) if known and all_top_known > 0 else None,
        "savings_over_tasks": known,
        "tasks_without_top_estimate": sorted(t for t in tasks if t not in known),
        "escalated_requests": sum(1 for r in records if r.escalated),
    }

    latencies = [scan.router_ms[r.request_id] for r in records if r.request_id in scan.router_ms]
    latency = {"n": len(latencies), "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99)}

    audited = _audited(records, verdicts, targets or {})
    timeline = _timeline(records, top_cost)
    firsts = [r.ts for r in records if r.ts]
    report = {
        "format": "routenlp-report/1",
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sources": list(sources),
        "window": {"since": since.isoformat() if since else None, "until": until.isoformat() if until else None,
                   "first_ts": firsts[0] if firsts else None, "last_ts": firsts[-1] if firsts else None},
        "top_tier": top,
        "totals": totals, "tasks": tasks, "escalation": escalation, "audited": audited,
        "router_latency": latency, "timeline": timeline,
        "baseline": None if baseline is None else {"source": baseline.source, "rates": baseline.rates},
        "warnings": [str(w) for w in scan.warnings],
    }
    report["alerts"] = [asdict(a) | {"line": a.line()} for a in evaluate_alerts(report, baseline)]
    return report


def _priced_at_top(record: Any, tokens: Mapping[str, tuple[int, int]], params: Mapping[str, Any]) -> Optional[float]:
    """The request at the top tier's prices: the token counts of its first call that has them."""
    for call in record.calls:
        counts = tokens.get(call.call_id or "")
        if counts is not None:
            return price_usage(params, {"prompt_tokens": counts[0], "completion_tokens": counts[1]})
    return None


def top_tier_deployment(config: str | os.PathLike[str]) -> tuple[Optional[str], Optional[dict[str, Any]]]:
    """``("T<k>", litellm_params)`` of the proxy config's most expensive tier (highest ``routenlp_tier``)."""
    best: tuple[int, Optional[dict[str, Any]]] = (0, None)
    for deployment in read_yaml(Path(config)).get("model_list") or []:
        tier = (deployment.get("model_info") or {}).get("routenlp_tier")
        if isinstance(tier, int) and not isinstance(tier, bool) and tier > best[0]:
            best = (tier, dict(deployment.get("litellm_params") or {}))
    return (f"T{best[0]}", best[1]) if best[1] is not None else (None, None)


def _audited(records: Sequence[Any], verdicts: Optional[Sequence[Verdict]],
             targets: Mapping[str, float]) -> Optional[dict[str, Any]]:
    """Acceptable share per task of the verdicts that join a window request (by request id, else by
    the client's call id when only one request has it); None when no verdicts file was given."""
    if verdicts is None:
        return None
    by_id = {r.request_id: r for r in records}
    by_client: dict[str, list[Any]] = defaultdict(list)
    for r in records:
        if getattr(r, "client_call_id", None):
            by_client[r.client_call_id].append(r)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    sources: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    unmatched = 0
    for verdict in verdicts:
        record = by_id.get(verdict.request_id)
        if record is None and len(by_client.get(verdict.request_id, [])) == 1:
            record = by_client[verdict.request_id][0]
        if record is None:
            unmatched += 1
            continue
        task = record.task or "-"
        counts[task][0] += 1
        counts[task][1] += int(verdict.acceptable)
        sources[task][verdict.source] += 1
    per_task = {}
    for task, (n, k) in sorted(counts.items()):
        per_task[task] = {"n": n, "acceptable": k, "rate": k / n, "wilson_95": list(wilson(k, n)),
                          "target": targets.get(task), "sources": dict(sources[task])}
    return {"tasks": per_task, "verdicts": len(verdicts), "unmatched": unmatched}


def _timeline(records: Sequence[Any], top_cost: Mapping[str, Optional[float]]) -> dict[str, Any]:
    """Per time bucket: requests, spend, all-top estimate, final tiers, escalations per (tier, task).

    A request of a task without an all-top estimate counts its own spend there (no saving claimed),
    so the plot's savings band equals the totals' savings."""
    stamped = [(when, r) for r in records if (when := _ts(r.ts)) is not None]
    if not stamped:
        return {"bucket_seconds": None, "buckets": []}
    first, last = stamped[0][0], stamped[-1][0]
    width = _bucket_width(first, last)
    buckets: dict[int, dict[str, Any]] = {}
    for when, r in stamped:
        index = int((when - first) / width)
        bucket = buckets.setdefault(index, {"start": (first + index * width).isoformat(), "last": None, "requests": 0,
                                            "spend_usd": 0.0, "all_top_usd": 0.0, "tiers": defaultdict(int),
                                            "escalation": defaultdict(lambda: [0, 0])})
        bucket["requests"] += 1
        bucket["last"] = when.isoformat()
        bucket["spend_usd"] += r.total_cost_usd
        mean_top = top_cost.get(r.task or "-")
        bucket["all_top_usd"] += mean_top if mean_top is not None else r.total_cost_usd
        bucket["tiers"][r.final_tier or "?"] += 1
        for c in r.calls:
            if c.error is None and c.tier:
                cell = bucket["escalation"][f"{c.tier}/{r.task or '-'}"]
                cell[0] += 1
                cell[1] += int(bool(c.escalated))
    out = []
    for index in sorted(buckets):
        bucket = buckets[index]
        bucket["tiers"] = dict(bucket["tiers"])
        bucket["escalation"] = {key: {"n": n, "escalated": k} for key, (n, k) in bucket["escalation"].items()}
        out.append(bucket)
    return {"bucket_seconds": width.total_seconds(), "first_ts": first.isoformat(), "buckets": out}


def evaluate_alerts(report: Mapping[str, Any], baseline: Optional[Baseline]) -> list[Alert]:
    """(a) escalation drift per (tier, task), (b) audited quality per task (module docstring)."""
    alerts = []
    if baseline is not None:
        for task, per_tier in report["escalation"].items():
            for tier, cell in per_tier.items():
                base = baseline.rates.get(tier, {}).get(task)
                if base is None:
                    continue
                low = cell["wilson_95"][0]
                if low > DRIFT_FACTOR * base:
                    alerts.append(Alert(
                        "escalation_drift", task, tier, cell["rate"], low, DRIFT_FACTOR * base, cell["n"],
                        f"escalation rate {cell['rate']:.1%} ({cell['escalated']}/{cell['n']}, 95% Wilson lower "
                        f"{low:.1%}) > 1.1 x baseline {base:.1%}"))
    audited = report.get("audited") or {}
    for task, cell in (audited.get("tasks") or {}).items():
        target = cell.get("target")
        if target is None:
            continue
        high = cell["wilson_95"][1]
        if high < target:
            alerts.append(Alert(
                "audited_quality", task, None, cell["rate"], high, target, cell["n"],
                f"audited acceptable {cell['rate']:.1%} ({cell['acceptable']}/{cell['n']}, 95% Wilson upper "
                f"{high:.1%}) < certified target {target:.1%}"))
    return alerts


def checks_made(report: Mapping[str, Any]) -> str:
    """One line saying what the alert rules could look at (so an "ok" is not mistaken for coverage)."""
    rates = (report.get("baseline") or {}).get("rates") or {}
    cells = sum(1 for task, per_tier in report["escalation"].items() for tier in per_tier
                if task in rates.get(tier, {}))
    drift = (f"escalation drift: {cells} (tier, task) cells against {report['baseline']['source']}"
             if report.get("baseline") else "escalation drift: not checked (no baseline: give --baseline)")
    audited = report.get("audited")
    quality = ("audited quality: no verdicts" if audited is None else
               f"audited quality: {sum(1 for c in audited['tasks'].values() if c.get('target') is not None)} "
               f"tasks with a target, {audited['verdicts']} verdicts ({audited['unmatched']} outside the window)")
    return f"{drift}; {quality}"


# --------------------------------------------------------------------------------------------------
# loading everything a command names


def load_requests(decisions: Sequence[str | os.PathLike[str]], *, since: Optional[datetime] = None,
                  until: Optional[datetime] = None, spend_logs_json: Sequence[str | os.PathLike[str]] = (),
                  config: Optional[str | os.PathLike[str]] = None, progress: Optional[bool] = None
                  ) -> tuple[list[Any], RawScan]:
    """Requests of the decision logs (and spend-log JSON files, merged by :func:`coopt.logs.merge_sources`)."""
    scan = RawScan()
    sources = []
    for path in decisions:
        part = scan_decision_log(path, since, until, progress)
        scan.router_ms.update(part.router_ms)
        scan.failed += part.failed
        scan.warnings += part.warnings
        scan.lines += part.lines
        sources.append(read_decision_log(path))
    known = [record for source in sources for record in source] or None
    tiers: dict[str, str] = {}
    if spend_logs_json and config:   # the tier of a client call's row comes from its deployment id
        if not Path(config).is_file():
            raise FileNotFoundError(f"proxy config not found: {config} (--config; needed to read spend logs)")
        tiers = tier_names_by_model_id(config)
    for path in spend_logs_json:
        rows = read_spend_logs_json(path)
        for row in rows:  # the call id exactly as the join computes it, so records' call ids find their tokens
            prompt, completion = row.get("prompt_tokens"), row.get("completion_tokens")
            if isinstance(prompt, int) and isinstance(completion, int):
                scan.tokens[_normalise_row(row)["call_id"]] = (prompt, completion)
        sources.append(join_spend_logs(rows, tiers, None, "spend_logs_json", known))
    if not sources:
        raise ValueError("give at least one decision log (--decisions) or --spend-logs-json file")
    return merge_sources(*sources), scan


# --------------------------------------------------------------------------------------------------
# rendering


def _usd(value: Optional[float]) -> str:
    return "unknown" if value is None else f"${value:,.4f}"


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def render_text(report: Mapping[str, Any]) -> str:
    """The terminal table."""
    t = report["totals"]
    w = report["window"]
    lines = [f"RouteNLP report  {w['first_ts'] or '-'} .. {w['last_ts'] or '-'}"
             + (f"  (window {w['since'] or '...'} .. {w['until'] or 'now'})" if w["since"] or w["until"] else ""),
             f"requests {t['requests']}  (failed, no answer: {t['failed_requests']}; escalated: {t['escalated_requests']})",
             f"spend {_usd(t['spend_usd'])}   all-{report['top_tier']} estimate {_usd(t['all_top_usd'])}   "
             f"savings {_usd(t['savings_usd'])}" + (f" ({t['savings_pct']:.1f}%)" if t["savings_pct"] is not None else ""),
             "  all-top estimate per task: " + _methods(report),
             ""]
    tiers = sorted({tier for e in report["tasks"].values() for tier in e["tier_shares"]}, key=_tier_number)
    header = f"{'task':<14}{'requests':>9}{'spend':>12}{'all-top':>12}{'savings':>12}  " + \
        "".join(f"{tier:>7}" for tier in tiers)
    lines += ["tier shares (tier that answered)", header, "-" * len(header)]
    for task, e in report["tasks"].items():
        lines.append(f"{task:<14}{e['requests']:>9}{_usd(e['spend_usd']):>12}{_usd(e['all_top_usd']):>12}"
                     f"{_usd(e['savings_usd']):>12}  " + "".join(f"{_pct(e['tier_shares'].get(tier)):>7}" for tier in tiers))
    lines += ["", "escalation rate per tier and task (95% Wilson interval; baseline)"]
    rates = (report.get("baseline") or {}).get("rates") or {}
    for task, per_tier in report["escalation"].items():
        for tier, cell in per_tier.items():
            low, high = cell["wilson_95"]
            base = rates.get(tier, {}).get(task)
            lines.append(f"  {task:<14}{tier:<5}{cell['escalated']:>6}/{cell['n']:<6}{_pct(cell['rate']):>7}  "
                         f"[{_pct(low)}, {_pct(high)}]  baseline {_pct(base)}")
    audited = report.get("audited")
    lines += ["", "audited quality"]
    if audited is None:
        lines.append("  no verdicts")
    else:
        for task, cell in audited["tasks"].items():
            low, high = cell["wilson_95"]
            lines.append(f"  {task:<14}{cell['acceptable']:>6}/{cell['n']:<6}{_pct(cell['rate']):>7}  "
                         f"[{_pct(low)}, {_pct(high)}]  target {_pct(cell['target'])}")
        lines.append(f"  ({audited['verdicts']} verdicts, {audited['unmatched']} not in the window)")
    lat = report["router_latency"]
    lines += ["", f"router latency  p50 {_ms(lat['p50_ms'])}  p99 {_ms(lat['p99_ms'])}  (n={lat['n']})", ""]
    lines += [a["line"] for a in report["alerts"]] or ["alerts: none"]
    lines.append(checks_made(report))
    return "\n".join(lines)


def _methods(report: Mapping[str, Any]) -> str:
    """How each task's all-top figure was made ("observed" = the top tier's mean cost per call x requests)."""
    parts = [f"{task} {entry['all_top_method']}" for task, entry in report["tasks"].items()]
    note = ("observed = the top tier's mean cost per call in the window x requests"
            if any(entry["all_top_method"] == "observed" for entry in report["tasks"].values()) else "")
    if report["totals"]["tasks_without_top_estimate"]:
        note += ("; " if note else "") + "unknown tasks (no top-tier answer, no token counts) are left out of the savings"
    return ", ".join(parts) + (f" ({note})" if note else "")


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def plots(report: Mapping[str, Any]) -> dict[str, bytes]:
    """PNG bytes of the three plots (matplotlib, Agg backend: headless, no display)."""
    import matplotlib  # local: only the HTML report's plots need it, and Agg must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    buckets = report["timeline"]["buckets"]
    times = [datetime.fromisoformat(b["start"]) for b in buckets]

    def png(figure: Any) -> bytes:
        buffer = io.BytesIO()
        figure.tight_layout()
        figure.savefig(buffer, format="png", dpi=100)
        plt.close(figure)
        return buffer.getvalue()

    def time_axis(axis: Any) -> None:
        locator = mdates.AutoDateLocator()
        axis.xaxis.set_major_locator(locator)
        axis.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))

    figure, axis = plt.subplots(figsize=(10, 3.6))
    if buckets:
        ends = [datetime.fromisoformat(report["timeline"]["first_ts"])] + [datetime.fromisoformat(b["last"]) for b in buckets]
        spend = np.concatenate([[0.0], np.cumsum([b["spend_usd"] for b in buckets])])
        all_top = np.concatenate([[0.0], np.cumsum([b["all_top_usd"] for b in buckets])])
        axis.plot(ends, all_top, label=f"all-{report['top_tier']} estimate", color="#c0392b", marker="o", ms=3)
        axis.plot(ends, spend, label="spend", color="#2471a3", marker="o", ms=3)
        axis.fill_between(ends, spend, all_top, color="#27ae60", alpha=0.25, label="savings")
        axis.legend(loc="upper left")
        time_axis(axis)
    axis.set_title("cumulative spend and savings (USD)")
    axis.set_ylabel("USD")
    axis.grid(alpha=0.3)
    out["spend"] = png(figure)

    figure, axis = plt.subplots(figsize=(10, 3.6))
    tiers = sorted({t for b in buckets for t in b["tiers"]}, key=_tier_number)
    if buckets:
        width_days = 0.85 * report["timeline"]["bucket_seconds"] / 86400.0
        colours = plt.cm.viridis(np.linspace(0.1, 0.9, max(len(tiers), 1)))
        bottom = np.zeros(len(buckets))
        for tier, colour in zip(tiers, colours):
            share = np.array([b["tiers"].get(tier, 0) / b["requests"] for b in buckets])
            axis.bar(times, share, width=width_days, bottom=bottom, color=colour, label=tier, align="edge")
            bottom += share
        axis.legend(loc="upper left", ncol=len(tiers), framealpha=0.9)
        time_axis(axis)
    axis.set_ylim(0, 1.12)
    axis.set_title("tier shares over time (tier that answered)")
    axis.set_ylabel("share of requests")
    out["tiers"] = png(figure)

    figure, axis = plt.subplots(figsize=(10, 3.6))
    cells = [(task, tier, cell) for task, per_tier in report["escalation"].items() for tier, cell in per_tier.items()]
    rates = (report.get("baseline") or {}).get("rates") or {}
    if cells:
        x = np.arange(len(cells))
        values = np.array([c["rate"] for _, _, c in cells])
        low = values - np.array([c["wilson_95"][0] for _, _, c in cells])
        high = np.array([c["wilson_95"][1] for _, _, c in cells]) - values
        fired = {(a["task"], a["tier"]) for a in report["alerts"] if a["kind"] == "escalation_drift"}
        colours = ["#c0392b" if (task, tier) in fired else "#2471a3" for task, tier, _ in cells]
        axis.bar(x, values, yerr=[low, high], capsize=4, color=colours, alpha=0.85, label="window (95% Wilson)")
        first = True
        for i, (task, tier, _) in enumerate(cells):
            base = rates.get(tier, {}).get(task)
            if base is not None:
                axis.hlines(base, i - 0.4, i + 0.4, colors="black", linestyles="-", label="baseline" if first else None)
                axis.hlines(DRIFT_FACTOR * base, i - 0.4, i + 0.4, colors="black", linestyles=":",
                            label="1.1 x baseline" if first else None)
                first = False
        axis.set_xticks(x, [f"{tier}\n{task}" for task, tier, _ in cells])
        axis.legend(loc="upper left")
    axis.set_ylim(0, 1.05)
    axis.set_title("escalation rate per tier and task (red: drift alert)")
    out["escalation"] = png(figure)
    return out


_CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#1b2631;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:22px 0 6px}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ccd1d1;padding:3px 8px;text-align:right}
th{background:#eaf2f8} td:first-child,th:first-child{text-align:left}
.kpi{display:inline-block;margin:6px 18px 6px 0;padding:8px 14px;background:#f4f6f6;border-radius:6px}
.kpi b{display:block;font-size:20px} .alert{background:#fdedec;border-left:5px solid #c0392b;padding:6px 10px;margin:4px 0}
.ok{background:#e9f7ef;border-left:5px solid #27ae60;padding:6px 10px} .note{color:#566573;font-size:12px}
img{display:block;max-width:100%;margin:6px 0}"""


def render_html(report: Mapping[str, Any]) -> str:
    """One self-contained page: inline CSS, the plots as base64 PNG ``data:`` URIs, no external asset."""
    e = html.escape
    t = report["totals"]
    w = report["window"]
    images = {name: base64.b64encode(data).decode("ascii") for name, data in plots(report).items()}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>RouteNLP report</title><style>{_CSS}</style>"
             "</head><body>",
             f"<h1>RouteNLP operations report</h1><div class='note'>{e(str(w['first_ts']))} .. {e(str(w['last_ts']))}"
             f" &middot; sources: {e(', '.join(report['sources']))} &middot; generated {e(report['generated'])}</div>"]
    if report["alerts"]:
        parts += [f"<div class='alert'>{e(a['line'])}</div>" for a in report["alerts"]]
    else:
        parts.append("<div class='ok'>no alert</div>")
    parts.append(f"<div class='note'>{e(checks_made(report))}</div>")
    kpis = [("requests", str(t["requests"])), ("spend", _usd(t["spend_usd"])),
            (f"all-{report['top_tier']} estimate", _usd(t["all_top_usd"])),
            ("savings", _usd(t["savings_usd"]) + (f" ({t['savings_pct']:.1f}%)" if t["savings_pct"] is not None else "")),
            ("router p50 / p99", f"{_ms(report['router_latency']['p50_ms'])} / {_ms(report['router_latency']['p99_ms'])}")]
    parts.append("<div>" + "".join(f"<span class='kpi'>{e(k)}<b>{e(v)}</b></span>" for k, v in kpis) + "</div>")
    parts.append(f"<div class='note'>all-top estimate per task: {e(_methods(report))}</div>")
    parts.append(f"<h2>Spend and savings over time</h2><img alt='spend' src='data:image/png;base64,{images['spend']}'>")
    tiers = sorted({tier for x in report["tasks"].values() for tier in x["tier_shares"]}, key=_tier_number)
    rows = "".join(f"<tr><td>{e(task)}</td><td>{x['requests']}</td><td>{_usd(x['spend_usd'])}</td>"
                   f"<td>{_usd(x['all_top_usd'])}</td><td>{_usd(x['savings_usd'])}</td>"
                   + "".join(f"<td>{_pct(x['tier_shares'].get(tier))}</td>" for tier in tiers) + "</tr>"
                   for task, x in report["tasks"].items())
    parts.append("<h2>Per task</h2><table><tr><th>task</th><th>requests</th><th>spend</th><th>all-top</th>"
                 "<th>savings</th>" + "".join(f"<th>{e(tier)}</th>" for tier in tiers) + f"</tr>{rows}</table>")
    parts.append(f"<h2>Tier shares over time</h2><img alt='tiers' src='data:image/png;base64,{images['tiers']}'>")
    parts.append(f"<h2>Escalation rates</h2><img alt='escalation' src='data:image/png;base64,{images['escalation']}'>")
    audited = report.get("audited")
    parts.append("<h2>Audited quality</h2>")
    if audited is None:
        parts.append("<p>no verdicts</p>")
    else:
        parts.append("<table><tr><th>task</th><th>verdicts</th><th>acceptable</th><th>95% Wilson</th><th>target</th></tr>"
                     + "".join(f"<tr><td>{e(task)}</td><td>{c['n']}</td><td>{_pct(c['rate'])}</td>"
                               f"<td>{_pct(c['wilson_95'][0])} .. {_pct(c['wilson_95'][1])}</td>"
                               f"<td>{_pct(c['target'])}</td></tr>" for task, c in audited["tasks"].items())
                     + "</table>")
    if report["warnings"]:
        parts.append("<h2>Log warnings</h2>" + "".join(f"<div class='note'>{e(x)}</div>" for x in report["warnings"]))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_json(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def write_html(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report), encoding="utf-8")
    return path


def parse_targets(pairs: Iterable[str]) -> dict[str, float]:
    """``--target task=0.9`` options."""
    out = {}
    for pair in pairs:
        task, _, value = pair.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not task or not 0 < number <= 1:
            raise ValueError(f"--target {pair!r}: expected task=value with 0 < value <= 1")
        out[task] = number
    return out
