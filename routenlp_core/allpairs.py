"""The all-pairs table: every query answered by every tier, scored by the task metric.

This module is THE definition of the format shared by labelling, router training, calibration and
the benchmarks.  One JSON object per line::

    {"id": "medmcqa-17", "task": "medmcqa", "prompt": "<text the router sees>",
     "reference": <optional, any JSON>,
     "tiers": {"T1": {"output": "B", "quality": 0.0, "cost_usd": 1.6e-05,
                      "latency_ms": 112.0, "uncertainty": 0.36},
               "T2": {...}, ...}}

Per tier: ``quality`` in [0, 1] (the task metric of that tier's answer), ``cost_usd`` >= 0,
``latency_ms`` >= 0 or null (unknown), ``uncertainty`` >= 0 or null (the tier gave no logprobs; the
value is :func:`litellm_routenlp.uncertainty.token_uncertainty` of its answer), ``output`` a string
or null.  A failed call carries ``"error": "<message>"``, and then ``quality`` must be 0 and
``output`` null, so a failure can never count as an acceptable answer.

The portfolio YAML names the tiers (cheapest first) and the tasks::

    tiers:
      - {name: T1, model: llama3.2-1b}
      - {name: T2, model: llama3.1-8b}
    tasks:
      medmcqa: {metric: accuracy, tau: 1.0, kind: structured}

``tau`` is the task's quality bar: a tier is *acceptable* for a query when its quality >= tau.

Validation is strict because every later step (training labels, conformal thresholds) silently
inherits a bad row: each problem raises :class:`AllPairsError` naming the file, the line and the field.
NaN and Infinity are rejected even though Python's json module would accept them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence

import yaml

if TYPE_CHECKING:
    import numpy as np

FORMAT_KINDS = ("structured", "generation")
UNKNOWN_TASK = "__unknown__"  # reserved: the router's task-agnostic slot


class AllPairsError(ValueError):
    """An all-pairs file or portfolio is malformed; the message names file, line and field."""


@dataclass(frozen=True)
class TierResult:
    """One tier's answer to one query, scored."""

    output: Optional[str]
    quality: float
    cost_usd: float
    latency_ms: Optional[float] = None
    uncertainty: Optional[float] = None
    error: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"output": self.output, "quality": self.quality, "cost_usd": self.cost_usd,
                               "latency_ms": self.latency_ms, "uncertainty": self.uncertainty}
        if self.error is not None:
            out["error"] = self.error
        return out


@dataclass(frozen=True)
class AllPairsRecord:
    """One query with every tier's scored answer."""

    id: str
    task: str
    prompt: str
    tiers: dict[str, TierResult]
    reference: Any = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "task": self.task, "prompt": self.prompt}
        if self.reference is not None:
            out["reference"] = self.reference
        out["tiers"] = {name: result.to_dict() for name, result in self.tiers.items()}
        return out


@dataclass(frozen=True)
class TierSpec:
    """A tier of the portfolio: its name (T1..), the model behind it, and how the co-optimisation loop
    may distil into it (``distill``: one of :data:`DISTILL_METHODS`, None: it is never a student)."""

    name: str
    model: str
    distill: Optional[str] = None


#: how a tier learns from the teacher's answers: ``label`` refits a classifier head on the teacher's
#: labels (tasks with a label set only), ``seqkd_lora`` trains a LoRA adapter on its answers (SeqKD)
DISTILL_METHODS = ("label", "seqkd_lora")


@dataclass(frozen=True)
class TaskSpec:
    """How a task is scored: the metric's name, its quality bar tau, structured or generation."""

    metric: str
    tau: float
    kind: str = "structured"


@dataclass(frozen=True)
class Portfolio:
    """The tiers (cheapest first) and the tasks they serve."""

    tiers: tuple[TierSpec, ...]
    tasks: dict[str, TaskSpec] = field(default_factory=dict)

    @property
    def tier_names(self) -> list[str]:
        return [tier.name for tier in self.tiers]

    def tier_index(self, name: str) -> int:
        """0-based position of tier ``name`` in cost order."""
        for index, tier in enumerate(self.tiers):
            if tier.name == name:
                return index
        raise KeyError(f"tier {name!r} is not in the portfolio ({', '.join(self.tier_names)})")

    def tau(self, task: str) -> float:
        try:
            return self.tasks[task].tau
        except KeyError:
            raise KeyError(f"task {task!r} is not in the portfolio ({', '.join(sorted(self.tasks))})") from None

    def to_dict(self) -> dict[str, Any]:
        return {"tiers": [{"name": t.name, "model": t.model, **({"distill": t.distill} if t.distill else {})}
                          for t in self.tiers],
                "tasks": {name: {"metric": s.metric, "tau": s.tau, "kind": s.kind}
                          for name, s in self.tasks.items()}}


# --------------------------------------------------------------------------------------------------
# Portfolio


def _portfolio_from_mapping(raw: Any, where: str) -> Portfolio:
    if not isinstance(raw, Mapping):
        raise AllPairsError(f"{where}: expected a mapping with `tiers` and `tasks`")
    tiers_raw = raw.get("tiers")
    if not isinstance(tiers_raw, list) or not tiers_raw:
        raise AllPairsError(f"{where}: field `tiers` must be a non-empty list (cheapest first)")
    tiers: list[TierSpec] = []
    for position, entry in enumerate(tiers_raw):
        at = f"{where}: tiers[{position}]"
        if not isinstance(entry, Mapping):
            raise AllPairsError(f"{at}: expected a mapping with `name` and `model`")
        name, model = entry.get("name"), entry.get("model")
        if not isinstance(name, str) or not name:
            raise AllPairsError(f"{at}.name: must be a non-empty string")
        if not isinstance(model, str) or not model:
            raise AllPairsError(f"{at}.model: must be a non-empty string")
        if name in {t.name for t in tiers}:
            raise AllPairsError(f"{at}.name: duplicate tier {name!r}")
        distill = entry.get("distill")
        if distill is not None and distill not in DISTILL_METHODS:
            raise AllPairsError(f"{at}.distill: must be one of {', '.join(DISTILL_METHODS)} (or absent), got {distill!r}")
        unknown = sorted(set(entry) - {"name", "model", "distill"})
        if unknown:
            raise AllPairsError(f"{at}: unknown field(s) {', '.join(map(str, unknown))} (known: name, model, distill)")
        tiers.append(TierSpec(name=name, model=model, distill=distill))
    tasks_raw = raw.get("tasks")
    if not isinstance(tasks_raw, Mapping) or not tasks_raw:
        raise AllPairsError(f"{where}: field `tasks` must be a non-empty mapping task -> spec")
    tasks: dict[str, TaskSpec] = {}
    for name, spec in tasks_raw.items():
        at = f"{where}: tasks.{name}"
        if not isinstance(name, str) or not name or name.startswith("__"):
            raise AllPairsError(f"{at}: task names must be non-empty and must not start with '__' (reserved)")
        if not isinstance(spec, Mapping):
            raise AllPairsError(f"{at}: expected a mapping with `metric`, `tau`, `kind`")
        metric, tau, kind = spec.get("metric"), spec.get("tau"), spec.get("kind", "structured")
        if not isinstance(metric, str) or not metric:
            raise AllPairsError(f"{at}.metric: must be a non-empty string")
        if not _is_number(tau) or not 0.0 < float(tau) <= 1.0:
            raise AllPairsError(f"{at}.tau: must be a number in (0, 1], got {tau!r}")
        if kind not in FORMAT_KINDS:
            raise AllPairsError(f"{at}.kind: must be one of {FORMAT_KINDS}, got {kind!r}")
        tasks[name] = TaskSpec(metric=metric, tau=float(tau), kind=kind)
    return Portfolio(tiers=tuple(tiers), tasks=tasks)


def load_portfolio(path: str | os.PathLike[str]) -> Portfolio:
    """Read and validate a portfolio YAML (tiers cheapest first, tasks with metric/tau/kind)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise AllPairsError(f"portfolio file not found: {path}") from None
    except yaml.YAMLError as error:
        raise AllPairsError(f"{path}: not valid YAML ({error})") from None
    return _portfolio_from_mapping(raw, str(path))


def portfolio_from_dict(raw: Mapping[str, Any], source: str = "<portfolio>") -> Portfolio:
    """Validate an in-memory portfolio mapping (same rules as :func:`load_portfolio`)."""
    return _portfolio_from_mapping(raw, source)


def write_portfolio(portfolio: Portfolio, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(portfolio.to_dict(), sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------------
# Records


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_tier(raw: Any, at: str) -> TierResult:
    if not isinstance(raw, Mapping):
        raise AllPairsError(f"{at}: expected an object")
    unknown = set(raw) - {"output", "quality", "cost_usd", "latency_ms", "uncertainty", "error"}
    if unknown:
        raise AllPairsError(f"{at}: unknown field(s) {sorted(unknown)}")
    for required in ("quality", "cost_usd"):
        if required not in raw:
            raise AllPairsError(f"{at}.{required}: missing")
    quality = raw["quality"]
    if not _is_number(quality) or not 0.0 <= quality <= 1.0:
        raise AllPairsError(f"{at}.quality: must be a number in [0, 1], got {quality!r}")
    cost = raw["cost_usd"]
    if not _is_number(cost) or cost < 0:
        raise AllPairsError(f"{at}.cost_usd: must be a non-negative number, got {cost!r}")
    latency = raw.get("latency_ms")
    if latency is not None and (not _is_number(latency) or latency < 0):
        raise AllPairsError(f"{at}.latency_ms: must be null or a non-negative number, got {latency!r}")
    uncertainty = raw.get("uncertainty")
    if uncertainty is not None and (not _is_number(uncertainty) or uncertainty < 0):
        raise AllPairsError(f"{at}.uncertainty: must be null or a non-negative number, got {uncertainty!r}")
    output = raw.get("output")
    if output is not None and not isinstance(output, str):
        raise AllPairsError(f"{at}.output: must be a string or null, got {type(output).__name__}")
    error = raw.get("error")
    if error is not None:
        if not isinstance(error, str) or not error:
            raise AllPairsError(f"{at}.error: must be a non-empty string")
        if quality != 0:
            raise AllPairsError(f"{at}.quality: a failed call (error set) must have quality 0, got {quality!r}")
        if output is not None:
            raise AllPairsError(f"{at}.output: a failed call (error set) must have output null")
    return TierResult(output=output, quality=float(quality), cost_usd=float(cost),
                      latency_ms=None if latency is None else float(latency),
                      uncertainty=None if uncertainty is None else float(uncertainty), error=error)


def parse_record(raw: Any, where: str, portfolio: Optional[Portfolio] = None) -> AllPairsRecord:
    """Validate one decoded JSON object; ``where`` ("file:line") prefixes every error."""
    if not isinstance(raw, Mapping):
        raise AllPairsError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    for key in ("id", "task", "prompt"):
        value = raw.get(key)
        if not isinstance(value, str) or (key != "prompt" and not value):
            raise AllPairsError(f"{where}: field `{key}` must be a non-empty string, got {value!r}")
    unknown = set(raw) - {"id", "task", "prompt", "reference", "tiers"}
    if unknown:
        raise AllPairsError(f"{where}: unknown field(s) {sorted(unknown)}")
    task = raw["task"]
    if task.startswith("__"):
        raise AllPairsError(f"{where}: field `task`: {task!r} is reserved")
    if portfolio is not None and task not in portfolio.tasks:
        raise AllPairsError(f"{where}: field `task`: {task!r} is not a task of the portfolio "
                            f"({', '.join(sorted(portfolio.tasks))})")
    tiers_raw = raw.get("tiers")
    if not isinstance(tiers_raw, Mapping) or not tiers_raw:
        raise AllPairsError(f"{where}: field `tiers` must be a non-empty object tier -> result")
    tiers = {str(name): _parse_tier(result, f"{where}: field `tiers.{name}`") for name, result in tiers_raw.items()}
    if portfolio is not None:
        expected = portfolio.tier_names
        missing = [name for name in expected if name not in tiers]
        if missing:
            raise AllPairsError(f"{where}: field `tiers`: missing tier(s) {missing} of the portfolio")
        extra = [name for name in tiers if name not in expected]
        if extra:
            raise AllPairsError(f"{where}: field `tiers`: tier(s) {extra} are not in the portfolio {expected}")
        tiers = {name: tiers[name] for name in expected}  # cost order, whatever the file's order
    return AllPairsRecord(id=raw["id"], task=task, prompt=raw["prompt"], tiers=tiers,
                          reference=raw.get("reference"))


def read_allpairs(path: str | os.PathLike[str], portfolio: Optional[Portfolio] = None) -> list[AllPairsRecord]:
    """Read and validate every line of an all-pairs JSONL file.

    With a ``portfolio``, every record must carry exactly its tiers and a task it knows.  Without
    one, every record must at least carry the same tier names as the first.  Blank lines are
    allowed; a duplicate ``id`` is an error (it would be double-counted in calibration).
    """
    path = Path(path)
    records: list[AllPairsRecord] = []
    seen: dict[str, int] = {}
    first_tiers: Optional[list[str]] = None
    try:
        handle = open(path, "r", encoding="utf-8")
    except FileNotFoundError:
        raise AllPairsError(f"all-pairs file not found: {path}") from None
    with handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                raw = json.loads(line, parse_constant=_reject_constant)
            except (json.JSONDecodeError, ValueError) as error:
                raise AllPairsError(f"{where}: not valid JSON ({error}); truncated line?") from None
            record = parse_record(raw, where, portfolio)
            if record.id in seen:
                raise AllPairsError(f"{where}: field `id`: duplicate id {record.id!r} (first on line {seen[record.id]})")
            seen[record.id] = line_number
            if portfolio is None:
                names = sorted(record.tiers)
                if first_tiers is None:
                    first_tiers = names
                elif names != first_tiers:
                    raise AllPairsError(f"{where}: field `tiers`: has {names}, earlier records have {first_tiers}")
            records.append(record)
    return records


def _line(record: AllPairsRecord) -> str:
    return json.dumps(record.to_dict(), ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n"


def write_allpairs(records: Iterable[AllPairsRecord], path: str | os.PathLike[str]) -> Path:
    """Write ``records`` to ``path`` atomically (temp file + rename), one JSON object per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(_line(record))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return path


def append_allpairs(records: Iterable[AllPairsRecord], path: str | os.PathLike[str]) -> int:
    """Append records and fsync, so a labelling run can stop at any time and resume.

    Refuses to append after a torn last line (a crash mid-write) because the next record would be
    glued to it and both would be lost; the error names the line to delete.
    Returns the number of records appended.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.seek(0)
                last = sum(1 for _ in handle)
                raise AllPairsError(f"{path}:{last}: last line is truncated (no newline); "
                                    "remove it before resuming")
    count = 0
    with open(path, "a", encoding="utf-8") as handle:
        for record in records:
            handle.write(_line(record))
            count += 1
        handle.flush()
        os.fsync(handle.fileno())
    return count


def data_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of the file's bytes: which data an artifact was trained or calibrated on."""
    from routenlp_core.hashing import sha256_file

    return sha256_file(path)


def records_sha256(records: Sequence[AllPairsRecord]) -> str:
    """sha256 of the records as :func:`write_allpairs` would write them (for in-memory data)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(_line(record).encode("utf-8"))
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Labels


def acceptable(record: AllPairsRecord, tier: str, tau: float) -> bool:
    """A tier's answer is acceptable when its quality reaches the task's bar."""
    return record.tiers[tier].quality >= tau


def cheapest_acceptable_tier(record: AllPairsRecord, portfolio: Portfolio) -> int:
    """0-based index of the cheapest acceptable tier; the top tier when none is acceptable.

    The top tier is the right label when nothing passes: it is the best the portfolio can do, and
    sending such a query cheap would only add an escalation on the way up.
    """
    tau = portfolio.tau(record.task)
    for index, name in enumerate(portfolio.tier_names):
        if acceptable(record, name, tau):
            return index
    return len(portfolio.tiers) - 1


def routing_target(record: AllPairsRecord, portfolio: Portfolio) -> int:
    """The router's training label: the cheapest acceptable tier; when no tier is acceptable, the
    cheapest tier among those with the best quality.

    A query nobody answers well gains nothing from an expensive tier, so labelling it with the top
    tier (as :func:`cheapest_acceptable_tier` does for the oracle bound) teaches the router to pay for
    no quality; the cascade still escalates such a query when its answer is uncertain.
    """
    tau = portfolio.tau(record.task)
    qualities = []
    for index, name in enumerate(portfolio.tier_names):
        if acceptable(record, name, tau):
            return index
        qualities.append(record.tiers[name].quality)
    best = max(qualities)
    return qualities.index(best)


def tier_values(records: Sequence[AllPairsRecord], tier_names: Sequence[str], field_name: str) -> "np.ndarray":
    """(n, K) float64 array of one tier field (quality, cost_usd, latency_ms, uncertainty); null -> NaN."""
    import numpy as np

    if field_name not in ("quality", "cost_usd", "latency_ms", "uncertainty"):
        raise ValueError(f"not a numeric tier field: {field_name!r}")
    out = np.full((len(records), len(tier_names)), np.nan, dtype=np.float64)
    for row, record in enumerate(records):
        for column, name in enumerate(tier_names):
            value = getattr(record.tiers[name], field_name)
            if value is not None:
                out[row, column] = value
    return out
