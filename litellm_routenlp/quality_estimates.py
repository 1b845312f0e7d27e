"""Per-tier quality estimates after answers (issue 14 item 2), served with numpy only.

After the tiers in S have answered, :class:`PosteriorEstimator` gives P(tier j acceptable | query,
task, answers of S) for every tier j, from the router's ex-ante estimate (``RouterModel.
predict_acceptance``) and the answers' signals: ``u`` (the one uncertainty function,
:func:`litellm_routenlp.uncertainty.token_uncertainty`), the top-token margin where logprobs exist,
and :func:`agreement` between the answers.  WHY: the published gains on routing + cascading come
from reading the answers already produced (Dekoninck et al., ICML 2025); the prompt alone carries
little difficulty signal on the shared sets.

One small logistic model per (task, S, j) "cell", fitted offline by
:func:`calibration.quality_estimators.fit_posterior` (sklearn) and stored here as plain weights:
prediction is one dot product and a sigmoid per tier.  Standardisation is folded into the weights
at fit time, so serving does no scaling.  Lookup order for a tier j: the task's own cell, else the
pooled cell (fitted on every task's rows, task name ``*``), else the ex-ante estimate unchanged
(a cell with too few rows is never stored; see ``fit_posterior``).

Features of cell (S, j), in this order (:func:`feature_names` names them):
  ``logit_ex_ante_j``; for each answered tier i in S (ascending): ``u_i``, ``u_missing_i`` (1 when
  the tier gave no logprobs: ``no_logprobs_policy`` tiers land here), ``margin_i``,
  ``margin_missing_i``; when |S| >= 2: ``agreement_S`` (mean pairwise agreement of the answers),
  ``agreement_missing``, and ``agreement_j_others`` (j's answer against the others'; 0 when j is
  not in S).  A missing value is replaced by the cell's ``fill`` (its mean on the calibration rows
  where it was present, 0 when it never was), so a tier that gives no logprobs at serving time but
  did in calibration is read as "average u", never as "u = 0, certain"; the indicator carries the
  rest.
Stored as JSON (no pickle).
"""

from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

FORMAT_VERSION = 1
POOLED = "*"  # the task name of the cells fitted on every task's rows
LOGIT_CLIP = 1e-4  # ex-ante probabilities are clipped to [1e-4, 1 - 1e-4] before the logit
PathLike = Union[str, os.PathLike[str]]


class PosteriorArtifactError(ValueError):
    """The estimator file is malformed; the message names the file or field."""


@dataclass(frozen=True)
class AnswerSignals:
    """What one tier's answer tells the estimator.

    ``tier`` is 1-based; ``uncertainty`` is u from :mod:`litellm_routenlp.uncertainty` (None: no
    logprobs); ``margin`` the mean top-token margin (None where unavailable); ``text`` the answer,
    for :func:`agreement` between tiers.
    """

    tier: int
    uncertainty: Optional[float]
    margin: Optional[float] = None
    text: Optional[str] = None


_SPACE = re.compile(r"\s+")
_TOKEN = re.compile(r"\w+", re.UNICODE)


def normalise_answer(text: str) -> str:
    """Case-, width- and whitespace-insensitive form, surrounding punctuation removed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _SPACE.sub(" ", text).strip().strip(".,;:!?\"'`()[]{}").strip()


def agreement(a: Optional[str], b: Optional[str]) -> Optional[float]:
    """How far two answers agree: 1.0 when equal after :func:`normalise_answer`, else the token F1.

    Token F1 (bag-of-words overlap, as SQuAD scores answers) is in [0, 1] and symmetric; ``None`` when
    either answer is unknown.  The one agreement function: fitting and serving both call it.
    """
    if a is None or b is None:
        return None
    left, right = normalise_answer(a), normalise_answer(b)
    if left == right:
        return 1.0
    left_tokens, right_tokens = _TOKEN.findall(left), _TOKEN.findall(right)
    if not left_tokens or not right_tokens:
        return 0.0
    counts: dict[str, int] = {}
    for token in left_tokens:
        counts[token] = counts.get(token, 0) + 1
    common = 0
    for token in right_tokens:
        if counts.get(token, 0) > 0:
            counts[token] -= 1
            common += 1
    if common == 0:
        return 0.0
    precision, recall = common / len(right_tokens), common / len(left_tokens)
    return 2 * precision * recall / (precision + recall)


def feature_names(answered: Sequence[int]) -> list[str]:
    """Names of the features of a cell whose answered set is ``answered`` (1-based tiers)."""
    names = ["logit_ex_ante_j"]
    for tier in sorted(answered):
        names += [f"u_{tier}", f"u_missing_{tier}", f"margin_{tier}", f"margin_missing_{tier}"]
    if len(answered) >= 2:
        names += ["agreement_S", "agreement_missing", "agreement_j_others"]
    return names


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), LOGIT_CLIP, 1.0 - LOGIT_CLIP)
    return np.log(p / (1.0 - p))


def answered_set(answers: Sequence[AnswerSignals], n_tiers: int) -> tuple[int, ...]:
    """The sorted 1-based tiers that answered; refuses duplicates and tiers outside 1..K."""
    tiers = [int(answer.tier) for answer in answers]
    if len(set(tiers)) != len(tiers):
        raise ValueError(f"a tier answered twice: {tiers}")
    for tier in tiers:
        if not 1 <= tier <= n_tiers:
            raise ValueError(f"answer tier {tier} outside 1..{n_tiers}")
    return tuple(sorted(tiers))


def features(ex_ante: np.ndarray, answers: Sequence[AnswerSignals]) -> np.ndarray:
    """(K, d) raw feature matrix, one row per target tier j (NaN = missing; see the module docstring)."""
    ex_ante = np.asarray(ex_ante, dtype=np.float64).reshape(-1)
    K = ex_ante.shape[0]
    ordered = sorted(answers, key=lambda answer: answer.tier)
    answered_set(ordered, K)
    shared: list[float] = []
    for answer in ordered:
        u, margin = answer.uncertainty, answer.margin
        u_ok = u is not None and not math.isnan(u)
        margin_ok = margin is not None and not math.isnan(margin)
        shared += [float(u) if u_ok else math.nan, 0.0 if u_ok else 1.0,
                   float(margin) if margin_ok else math.nan, 0.0 if margin_ok else 1.0]
    j_agreement = np.zeros(K)
    if len(ordered) >= 2:
        pairs: dict[tuple[int, int], Optional[float]] = {}
        for first, second in combinations(ordered, 2):
            pairs[(first.tier, second.tier)] = agreement(first.text, second.text)
        known = [value for value in pairs.values() if value is not None]
        shared += [float(np.mean(known)) if known else math.nan, 0.0 if len(known) == len(pairs) else 1.0]
        for answer in ordered:
            mine = [value for (a, b), value in pairs.items() if answer.tier in (a, b) and value is not None]
            j_agreement[answer.tier - 1] = float(np.mean(mine)) if mine else math.nan
    out = np.empty((K, 1 + len(shared) + (1 if len(ordered) >= 2 else 0)))
    out[:, 0] = _logit(ex_ante)
    out[:, 1:1 + len(shared)] = shared
    if len(ordered) >= 2:
        out[:, -1] = j_agreement
    return out


def cell_key(task: str, answered: Sequence[int], tier: int) -> str:
    """JSON key of one cell: ``task|1,2|3`` (answered tiers, then the target tier; 1-based)."""
    return f"{task}|{','.join(str(t) for t in sorted(answered))}|{tier}"


def _parse_key(key: str) -> tuple[str, tuple[int, ...], int]:
    task, answered, tier = key.rsplit("|", 2)
    return task, tuple(int(t) for t in answered.split(",")), int(tier)


class PosteriorEstimator:
    """P(tier j acceptable | query, task, answers of S) for every j, from the ex-ante estimate plus the answers' signals."""

    def __init__(self, n_tiers: int, cells: Mapping[str, Mapping[str, Any]],
                 info: Optional[Mapping[str, Any]] = None) -> None:
        if n_tiers < 1:
            raise PosteriorArtifactError(f"n_tiers must be >= 1, got {n_tiers}")
        self.n_tiers = int(n_tiers)
        self.info = dict(info or {})
        self.cells: dict[tuple[str, tuple[int, ...], int], tuple[np.ndarray, float, np.ndarray]] = {}
        for key, cell in cells.items():
            try:
                task, answered, tier = _parse_key(key)
                weights = np.asarray(cell["weights"], dtype=np.float64)
                bias = float(cell["bias"])
                fill = np.asarray(cell.get("fill", np.zeros(len(weights))), dtype=np.float64)
            except (KeyError, TypeError, ValueError) as error:
                raise PosteriorArtifactError(f"cell {key!r}: malformed ({error})") from None
            if not 1 <= tier <= self.n_tiers or any(not 1 <= t <= self.n_tiers for t in answered) \
                    or len(set(answered)) != len(answered):
                raise PosteriorArtifactError(f"cell {key!r}: tiers outside 1..{self.n_tiers}")
            expected = len(feature_names(answered))
            if weights.shape != (expected,) or not np.all(np.isfinite(weights)) or not math.isfinite(bias):
                raise PosteriorArtifactError(f"cell {key!r}: needs {expected} finite weights, got {weights.shape}")
            if fill.shape != (expected,) or not np.all(np.isfinite(fill)):
                raise PosteriorArtifactError(f"cell {key!r}: needs {expected} finite fill values, got {fill.shape}")
            self.cells[(task, tuple(sorted(answered)), tier)] = (weights, bias, fill)
        self.tasks = sorted({task for task, _, _ in self.cells if task != POOLED})
        self._stacks: dict[tuple[str, tuple[int, ...]], tuple[np.ndarray, ...]] = {}

    def _stack(self, task: str, answered: tuple[int, ...]) -> tuple[np.ndarray, ...]:
        """(K, d) weights, (K,) biases, (K, d) fill values and (K,) has-a-model mask of (task, S), cached."""
        key = (task, answered)
        stack = self._stacks.get(key)
        if stack is None:
            d = len(feature_names(answered))
            weights, biases, fitted = np.zeros((self.n_tiers, d)), np.zeros(self.n_tiers), np.zeros(self.n_tiers, bool)
            fills = np.zeros((self.n_tiers, d))
            for j in range(1, self.n_tiers + 1):
                cell = self.cells.get((task, answered, j)) or self.cells.get((POOLED, answered, j))
                if cell is not None:
                    weights[j - 1], biases[j - 1], fills[j - 1], fitted[j - 1] = cell[0], cell[1], cell[2], True
            stack = self._stacks[key] = (weights, biases, fills, fitted)
        return stack

    def design(self, task: Optional[str], ex_ante: np.ndarray, answers: Sequence[AnswerSignals]) -> np.ndarray:
        """(K, d) features as the cells read them: :func:`features` with missing values filled."""
        ex_ante = np.asarray(ex_ante, dtype=np.float64).reshape(-1)
        raw = features(ex_ante, answers)
        fills = self._stack(task if task is not None else POOLED, answered_set(answers, self.n_tiers))[2]
        return np.where(np.isnan(raw), fills, raw)

    def source(self, task: Optional[str], answered: Sequence[int], tier: int) -> str:
        """Which model answers for ``tier`` (1-based): ``task``, ``pooled`` or ``ex_ante``."""
        answered = tuple(sorted(answered))
        if task is not None and (task, answered, tier) in self.cells:
            return "task"
        return "pooled" if (POOLED, answered, tier) in self.cells else "ex_ante"

    def predict(self, task: Optional[str], ex_ante: np.ndarray, answers: Sequence[AnswerSignals]) -> np.ndarray:
        """(K,) posterior acceptance of every tier; the ex-ante estimate itself when nobody has answered."""
        ex_ante = np.asarray(ex_ante, dtype=np.float64).reshape(-1)
        if ex_ante.shape[0] != self.n_tiers:
            raise ValueError(f"ex_ante has {ex_ante.shape[0]} tiers, the estimator {self.n_tiers}")
        if not answers:
            return ex_ante.copy()
        answered = answered_set(answers, self.n_tiers)
        weights, biases, fills, fitted = self._stack(task if task is not None else POOLED, answered)
        raw = features(ex_ante, answers)
        z = np.einsum("kd,kd->k", np.where(np.isnan(raw), fills, raw), weights) + biases
        posterior = 1.0 / (1.0 + np.exp(-z))
        return np.where(fitted, posterior, ex_ante)

    # ------------------------------------------------------------------------------------------
    # JSON

    def to_dict(self) -> dict[str, Any]:
        cells = {cell_key(task, answered, tier): {"weights": [float(w) for w in weights], "bias": float(bias),
                                                  "fill": [float(f) for f in fill], "features": feature_names(answered)}
                 for (task, answered, tier), (weights, bias, fill) in sorted(self.cells.items())}
        return {"format_version": FORMAT_VERSION, "kind": "routenlp-posterior-estimator", "n_tiers": self.n_tiers,
                "info": self.info, "cells": cells}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "PosteriorEstimator":
        if not isinstance(raw, Mapping):
            raise PosteriorArtifactError("posterior estimator: expected a JSON object")
        if raw.get("format_version") != FORMAT_VERSION:
            raise PosteriorArtifactError(f"posterior estimator: format_version {raw.get('format_version')!r} "
                                         f"is not supported (expected {FORMAT_VERSION})")
        n_tiers, cells = raw.get("n_tiers"), raw.get("cells")
        if not isinstance(n_tiers, int) or isinstance(n_tiers, bool):
            raise PosteriorArtifactError("posterior estimator: field `n_tiers` must be an integer")
        if not isinstance(cells, Mapping):
            raise PosteriorArtifactError("posterior estimator: field `cells` must be an object")
        for key, cell in cells.items():
            names = cell.get("features") if isinstance(cell, Mapping) else None
            if names is not None:
                try:
                    expected = feature_names(_parse_key(key)[1])
                except ValueError:
                    raise PosteriorArtifactError(f"cell {key!r}: malformed key") from None
                if list(names) != expected:
                    raise PosteriorArtifactError(f"cell {key!r}: features {names} are not {expected}")
        return cls(n_tiers, cells, raw.get("info"))

    def save(self, path: PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")
        os.replace(temporary, path)
        return path

    @classmethod
    def load(cls, path: PathLike) -> "PosteriorEstimator":
        from .json_files import read_json_object

        path = Path(path)
        raw = read_json_object(path, PosteriorArtifactError, "posterior estimator")
        try:
            return cls.from_dict(raw)
        except PosteriorArtifactError as error:
            raise PosteriorArtifactError(f"{path}: {error}") from None


def signals_of_row(uncertainty: Sequence[float], outputs: Optional[Sequence[Optional[str]]],
                   tiers: Iterable[int], margins: Optional[Sequence[float]] = None) -> list[AnswerSignals]:
    """AnswerSignals of the 1-based ``tiers`` of one all-pairs row (NaN u / margin = missing)."""
    out = []
    for tier in tiers:
        u = float(uncertainty[tier - 1])
        margin = None if margins is None else float(margins[tier - 1])
        out.append(AnswerSignals(tier=tier, uncertainty=None if math.isnan(u) else u,
                                 margin=None if margin is None or math.isnan(margin) else margin,
                                 text=None if outputs is None else outputs[tier - 1]))
    return out
