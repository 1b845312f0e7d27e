"""Calibrated cascade thresholds delta[tier][task] (the paper rule's part of the policy file).

A request answered by tier k for task t escalates when its uncertainty exceeds delta[k][t].  A missing
entry means "never escalate from here" (the router's choice is trusted); that is also what the top tier
always does.  The file is validated when loaded so a truncated or hand-edited file stops the proxy
at start-up instead of silently disabling the cascade.

The file is the policy file of :mod:`litellm_routenlp.policy`: format 1 holds thresholds only
(``conformal_thresholds``); format 2 adds the policy name, per-task lambda and certificate, costs,
the posterior estimator and ``fitted_under``.  Both load here; an unknown format version is refused.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional


class ThresholdsError(ValueError):
    """The thresholds file is missing, not JSON, or has a malformed entry (message names it)."""


@dataclass(frozen=True)
class Thresholds:
    """delta per (tier name, task); ``source`` and ``meta`` say where they came from."""

    deltas: dict[str, dict[str, float]] = field(default_factory=dict)
    alpha: Optional[float] = None
    source: Optional[str] = None
    meta: dict[str, Any] = field(default_factory=dict)

    def delta(self, tier: str, task: str) -> Optional[float]:
        """The threshold for ``task`` at ``tier``, or None when that pair never escalates."""
        return self.deltas.get(tier, {}).get(task)

    @property
    def policy(self) -> str:
        """The decision policy the file was written for (format 1: the paper's rule)."""
        return str(self.meta.get("policy", "conformal_thresholds"))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Thresholds":
        from .json_files import read_json_object

        path = Path(path)
        document = read_json_object(path, ThresholdsError, "thresholds file", " (run `routenlp calibrate`)")
        return cls.from_document(document, str(path))

    @classmethod
    def from_document(cls, document: Any, where: str) -> "Thresholds":
        """Validate a policy document's thresholds part (format 1 or 2) and build the lookup."""
        if not isinstance(document, dict):
            raise ThresholdsError(f"{where}: expected a JSON object")
        version = document.get("format_version", 1)
        if version not in (1, 2):
            raise ThresholdsError(f"{where}: format_version {version!r} is not 1 or 2; re-run `routenlp calibrate`")
        raw = document.get("thresholds")
        if raw is None and version >= 2:
            raw = {}
        if not isinstance(raw, dict):
            raise ThresholdsError(f"{where}: expected an object with a `thresholds` mapping")
        deltas: dict[str, dict[str, float]] = {}
        for tier, per_task in raw.items():
            if not isinstance(per_task, dict):
                raise ThresholdsError(f"{where}: thresholds.{tier} must map task -> entry")
            for task, entry in per_task.items():
                at = f"{where}: thresholds.{tier}.{task}"
                if not isinstance(entry, dict) or "delta" not in entry:
                    raise ThresholdsError(f"{at}: expected an object with `delta`")
                value = entry["delta"]
                if value is None:
                    continue
                if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) or value < 0:
                    raise ThresholdsError(f"{at}.delta: must be a non-negative number or null, got {value!r}")
                deltas.setdefault(tier, {})[task] = float(value)
        alpha = document.get("alpha")
        meta = {key: value for key, value in document.items() if key != "thresholds"}
        return cls(deltas=deltas, alpha=alpha, source=where, meta=meta)

    @classmethod
    def from_cells(cls, cells: Mapping[str, Mapping[str, Mapping[str, Any]]], alpha: Optional[float] = None,
                   source: Optional[str] = None) -> "Thresholds":
        """From a ``thresholds`` mapping as :func:`calibration.calibrate.fit_thresholds` returns it."""
        deltas = {tier: {task: float(cell["delta"]) for task, cell in per_task.items()
                         if cell.get("delta") is not None} for tier, per_task in cells.items()}
        return cls(deltas={tier: d for tier, d in deltas.items() if d}, alpha=alpha, source=source)
