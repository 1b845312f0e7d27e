"""The benchmark's view of the data: records as arrays, cached embeddings, and seeded splits.

Every system sees the same :class:`BenchData` and, for one seed, the same :class:`Split`: the
training rows, the calibration rows and the test rows.  The split is made within each (file, task)
group so every file and every task contributes its share to each part.

Embeddings come from the frozen ONNX fp32 encoder that ``routenlp train`` uses (so RouteNLP's router
and the embedding baselines read the same vectors) through :class:`coopt.train_router.EmbeddingCache`,
in ``artifacts/cache/bench-embeddings-<encoder sha>.safetensors``: the first run on a data set encodes
its prompts, later runs only read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from routenlp_core.allpairs import AllPairsRecord, Portfolio, cheapest_acceptable_tier, tier_values
from routenlp_core.hashing import sha256_file
from routenlp_core.paths import project_root
from litellm_routenlp.encoder import OnnxSentenceEncoder
from calibration.calibrate import served_tiers
from coopt.train_router import EmbeddingCache, text_key

#: service time (ms) assumed for a tier when the data has no latency for it: the bottom and top
#: tiers' figures, the tiers in between geometrically spaced (documented in the README "Results").
DEFAULT_LATENCY_MS = (50.0, 800.0)


@dataclass
class Split:
    """Row indices (into :class:`BenchData`) of one seed's train, calibration and test parts."""

    seed: int
    train: np.ndarray
    calib: np.ndarray
    test: np.ndarray


class BenchData:
    """All-pairs records of one benchmark, as (n, K) arrays plus per-row task and embedding."""

    def __init__(self, records: Sequence[AllPairsRecord], portfolio: Portfolio,
                 embeddings: Optional[np.ndarray] = None, groups: Optional[Sequence[str]] = None) -> None:
        if not records:
            raise ValueError("no records to benchmark")
        self.records = list(records)
        self.portfolio = portfolio
        self.tier_names = portfolio.tier_names
        self.K = len(self.tier_names)
        self.quality = tier_values(self.records, self.tier_names, "quality")
        self.cost = tier_values(self.records, self.tier_names, "cost_usd")
        self.uncertainty = tier_values(self.records, self.tier_names, "uncertainty")
        latency = tier_values(self.records, self.tier_names, "latency_ms")
        self.latency_measured = ~np.isnan(latency).all(axis=0)
        self.latency = _fill_latency(latency)
        self.tasks = sorted(portfolio.tasks)
        self.task_names = np.array([record.task for record in self.records])
        self.task_ids = np.array([self.tasks.index(record.task) for record in self.records], dtype=np.int64)
        self.tau = np.array([portfolio.tau(record.task) for record in self.records])
        self.acceptable = self.quality >= self.tau[:, None]
        self.oracle_tier = np.array([cheapest_acceptable_tier(record, portfolio) for record in self.records],
                                    dtype=np.int64)
        self.kind = {task: spec.kind for task, spec in portfolio.tasks.items()}
        self.ids = [record.id for record in self.records]
        self.prompts = [record.prompt for record in self.records]
        self.groups = np.array(list(groups) if groups is not None else ["-"] * len(self.records))
        self.embeddings = embeddings
        self.has_uncertainty = ~np.isnan(self.uncertainty).all(axis=0)
        self.served = self._served()

    def _served(self) -> np.ndarray:
        """(tasks, K): whether a tier serves a task at all (the proxy's ``routenlp_tasks``).

        A tier whose every answer for a task is a ``not served`` error is not eligible for it, as in
        the proxy; the top tier always counts as serving (it is the last resort).
        """
        served = np.ones((len(self.tasks), self.K), dtype=bool)
        for index, task in enumerate(self.tasks):
            rows = np.nonzero(self.task_ids == index)[0]
            if rows.size:
                served[index] = served_tiers(self.records, rows, self.tier_names)
        served[:, -1] = True
        return served

    def eligible_tiers(self, row: int) -> list[int]:
        """1-based tiers that serve this row's task (what the proxy lets the router choose from)."""
        return [k + 1 for k in range(self.K) if self.served[self.task_ids[row], k]]

    @property
    def n(self) -> int:
        return len(self.records)

    def task_onehot(self, rows: np.ndarray) -> np.ndarray:
        out = np.zeros((len(rows), len(self.tasks)), dtype=np.float32)
        out[np.arange(len(rows)), self.task_ids[rows]] = 1.0
        return out

    def features(self, rows: np.ndarray) -> np.ndarray:
        """[embedding ; task one-hot]: the query features the learned baselines share."""
        if self.embeddings is None:
            raise RuntimeError("embeddings not loaded (call load_embeddings)")
        return np.concatenate([self.embeddings[rows], self.task_onehot(rows)], axis=1)

    def load_embeddings(self, encoder_dir: Path, cache_path: Optional[Path] = None, chunk: int = 1000,
                        progress: Optional[Callable[[int], None]] = None, threads: int = 1) -> None:
        self.embeddings = cached_embeddings(self.prompts, encoder_dir, cache_path, chunk, progress, threads)

    def split(self, seed: int, fractions: Sequence[float] = (0.6, 0.2, 0.2)) -> Split:
        """Seeded train / calibration / test split within each (file, task) group."""
        fractions = np.asarray(fractions, dtype=np.float64)
        if fractions.shape != (3,) or np.any(fractions <= 0) or abs(fractions.sum() - 1.0) > 1e-6:
            raise ValueError(f"split must be three positive fractions summing to 1, got {list(fractions)}")
        rng = np.random.default_rng([seed, 20260423])
        parts: list[list[int]] = [[], [], []]
        for group in sorted(set(zip(self.groups.tolist(), self.task_names.tolist()))):
            rows = np.nonzero((self.groups == group[0]) & (self.task_names == group[1]))[0]
            rows = rows[rng.permutation(len(rows))]
            n_train = int(round(len(rows) * fractions[0]))
            n_calib = int(round(len(rows) * fractions[1]))
            parts[0].extend(rows[:n_train])
            parts[1].extend(rows[n_train:n_train + n_calib])
            parts[2].extend(rows[n_train + n_calib:])
        train, calib, test = (np.array(sorted(part), dtype=np.int64) for part in parts)
        if min(len(train), len(calib), len(test)) == 0:
            raise ValueError(f"{self.n} records are too few for the split {list(fractions)}")
        return Split(seed=seed, train=train, calib=calib, test=test)


def _fill_latency(latency: np.ndarray) -> np.ndarray:
    """Missing latencies: the tier's mean where it has some, else the documented default."""
    out = latency.copy()
    K = latency.shape[1]
    low, high = DEFAULT_LATENCY_MS
    defaults = [low] if K == 1 else [low * (high / low) ** (k / (K - 1)) for k in range(K)]
    for k in range(K):
        column = out[:, k]
        known = ~np.isnan(column)
        column[~known] = column[known].mean() if known.any() else defaults[k]
    return out


def default_cache_path(encoder_dir: Path) -> Path:
    sha = sha256_file(Path(encoder_dir) / "model.onnx")
    return project_root() / "artifacts" / "cache" / f"bench-embeddings-{sha[:16]}.safetensors"


def cached_embeddings(texts: Sequence[str], encoder_dir: Path, cache_path: Optional[Path] = None,
                      chunk: int = 1000, progress: Optional[Callable[[int], None]] = None,
                      threads: int = 1) -> np.ndarray:
    """(n, 384) embeddings of ``texts`` with the frozen fp32 ONNX encoder (``threads`` ONNX threads),
    through the cache.

    Missing texts are encoded ``chunk`` at a time and the cache saved after each chunk, so an
    interrupted first run keeps its work.  ``progress(k)`` is called with the number just encoded.
    """
    encoder_dir = Path(encoder_dir)
    cache_path = Path(cache_path) if cache_path is not None else default_cache_path(encoder_dir)
    graph_sha = sha256_file(encoder_dir / "model.onnx")
    cache = EmbeddingCache(cache_path, graph_sha)
    unique = list(dict.fromkeys(texts))
    missing = [text for text in unique if text_key(text) not in cache._rows]  # noqa: SLF001 (same package family)
    if missing:
        encoder = OnnxSentenceEncoder(encoder_dir, quantized=False, threads=threads)
        for start in range(0, len(missing), chunk):
            part = missing[start:start + chunk]
            cache.embed(part, encoder)
            if progress is not None:
                progress(len(part))
    return cache.embed(list(texts), encoder=None)
