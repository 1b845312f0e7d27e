"""Calibrated cascade thresholds delta[tier][task], as written by ``routenlp calibrate``.

A request answered by tier k for task t escalates when its uncertainty exceeds delta[k][t].  A missing
entry means "never escalate from here" (the router's choice is trusted); that is also what the top tier
always does.  The file is validated when loaded so a truncated or hand-edited file stops the proxy
at start-up instead of silently disabling the cascade.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


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

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Thresholds":
        path = Path(path)
        try:
            document = json.loads(path.read_text())
        except FileNotFoundError:
            raise ThresholdsError(f"thresholds file not found: {path} (run `routenlp calibrate`)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ThresholdsError(f"{path}: not valid JSON, possibly truncated ({error})") from None
        if not isinstance(document, dict) or not isinstance(document.get("thresholds"), dict):
            raise ThresholdsError(f"{path}: expected an object with a `thresholds` mapping")
        deltas: dict[str, dict[str, float]] = {}
        for tier, per_task in document["thresholds"].items():
            if not isinstance(per_task, dict):
                raise ThresholdsError(f"{path}: thresholds.{tier} must map task -> entry")
            for task, entry in per_task.items():
                where = f"{path}: thresholds.{tier}.{task}"
                if not isinstance(entry, dict) or "delta" not in entry:
                    raise ThresholdsError(f"{where}: expected an object with `delta`")
                value = entry["delta"]
                if value is None:
                    continue
                if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) or value < 0:
                    raise ThresholdsError(f"{where}.delta: must be a non-negative number or null, got {value!r}")
                deltas.setdefault(tier, {})[task] = float(value)
        alpha = document.get("alpha")
        meta = {key: value for key, value in document.items() if key != "thresholds"}
        return cls(deltas=deltas, alpha=alpha, source=str(path), meta=meta)
