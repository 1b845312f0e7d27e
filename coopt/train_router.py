"""Train the task-conditioned difficulty router (DESIGN §3) and write its one artifact directory.

Model: sentence embedding (all-MiniLM-L6-v2, mean pooled, L2-normalised, 384-d) concatenated with a
learned task embedding (64-d) -> Linear 256 -> ReLU -> dropout -> Linear K: logits over the tiers,
read as p_k = P(tier k is the cheapest acceptable one).  Task index 0 is ``__unknown__``; training
replaces the task with it ~10% of the time (task dropout) so a request with a new or missing task
still gets a sensible, task-agnostic prediction.

Loss = L_route + 0.3 L_cost + 0.5 L_quality + 1.0 L_accept:
  L_route   cross-entropy to the cheapest acceptable tier (when none is acceptable: the cheapest tier
            with the best quality, see ``routenlp_core.allpairs.routing_target``);
  L_cost    expected normalised tier cost under the softmax (tier mean cost / top tier's, per task);
  L_quality sum_k p_k * max(0, tau - q_k): probability mass on tiers that fail this very query;
  L_accept  binary cross-entropy of a second output, K sigmoids a_k = P(tier k's answer is
            acceptable | query, task), against the all-pairs labels q_k >= tau (issue 14 item 1).
            The route softmax only says which tier is the *cheapest* acceptable one; a cascade-routing
            policy needs each tier's own chance of being acceptable, which the softmax gives only
            under the assumption that acceptability is monotone in the tier (its cumulative).

Two modes.  ``frozen`` (default): the encoder is fixed and embeddings are computed once with the
*exported ONNX fp32 encoder* (so training sees what serving sees) and cached in a safetensors file
keyed by sha256(text) and the encoder graph's sha256.  ``finetune``: the torch MiniLM is trained
end to end with the head (mean pooling + L2 norm, as served) and exported to ``encoder/`` inside the
artifact.  Training is seeded and deterministic (fixed seed, deterministic algorithms, one thread).

Artifact directory: ``weights.safetensors`` (head), ``head.onnx`` (fp32; inputs ``embedding``
float32 (n,384), ``task_id`` int64 (n,); outputs ``logits`` (n,K), ``penultimate`` (n,256), the
features co-optimisation clusters, and ``acceptance`` (n,K) sigmoid probabilities; format_version 2),
``head.int8.onnx`` (dynamic int8), ``router.json`` (metadata,
written last: its presence means the artifact is complete; it records every file's sha256).
No pickle anywhere.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from tokenizers import Tokenizer

from routenlp_core.allpairs import (UNKNOWN_TASK, AllPairsRecord, Portfolio, cheapest_acceptable_tier, data_sha256,
                            load_portfolio, read_allpairs, records_sha256, routing_target, tier_values)
from routenlp_core.hashing import sha256_file  # benchmarks/router_training_report.py imports it from here too
from routenlp_core.paths import minilm_model_path, project_root
from litellm_routenlp.encoder import OnnxSentenceEncoder, graph_fingerprints
from coopt.export_encoder import export_encoder

# torch (and transformers, and onnxruntime.quantization) are imported inside the functions that train
# or export: the embedding cache and frozen_embeddings here are used by the bench, the static
# encoder and the classifier distillation, which must not pay ~2 s of imports for them.

FORMAT_VERSION = 2  # 2: the head has the ``acceptance`` output (version 1 routers still load)
EMBEDDING_DIM = 384
TASK_DIM = 64
HIDDEN = 256
COST_WEIGHT = 0.3
QUALITY_WEIGHT = 0.5
ACCEPT_WEIGHT = 1.0
DEFAULT_LR = {"frozen": 1e-3, "finetune": 2e-5}
# label rule for queries no tier answers acceptably (see train_router's ``target``)
TARGET_RULES: dict[str, Callable[[AllPairsRecord, Portfolio], int]] = {
    "best_quality": routing_target, "top_tier": cheapest_acceptable_tier}
ARTIFACT_FILES = ("weights.safetensors", "head.onnx", "head.int8.onnx")
WEIGHT_NAMES = ("task_embedding.weight", "hidden.weight", "hidden.bias", "out.weight", "out.bias",
                "accept.weight", "accept.bias")
HEAD_OUTPUTS = ("logits", "penultimate", "acceptance")


@dataclass
class TrainReport:
    """What a training run did and how good the result is (also stored in router.json)."""

    out_dir: Path
    mode: str
    n_train: int
    n_val: int
    epochs_run: int
    best_epoch: int
    initial_val_loss: float
    best_val_loss: float
    train_losses: list[float]
    val_losses: list[float]
    val_accuracy: float
    majority_baseline_accuracy: float
    val_route_ce: float
    prior_baseline_ce: float
    train_seconds: float
    per_task: dict[str, dict[str, float]] = field(default_factory=dict)
    #: validation Brier / log-loss of the acceptance output against the per-task prior and the
    #: cumulative of the route probabilities (see :func:`acceptance_report`)
    acceptance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["out_dir"] = str(self.out_dir)
        return out




# --------------------------------------------------------------------------------------------------
# Embedding cache (frozen mode)


def text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class EmbeddingCache:
    """Embeddings by sha256(text) for one encoder graph, in one safetensors file (no pickle).

    The file holds ``keys`` uint8 (n, 32) and ``embeddings`` float32 (n, 384); its metadata names
    the graph's sha256, and a cache made with another graph is refused rather than mixed in.
    """

    def __init__(self, path: Union[str, os.PathLike[str]], encoder_sha256: str) -> None:
        self.path = Path(path)
        self.encoder_sha256 = encoder_sha256
        self._rows: dict[bytes, np.ndarray] = {}
        if self.path.exists():
            with safe_open(str(self.path), framework="numpy") as handle:
                stored = (handle.metadata() or {}).get("encoder_sha256")
                if stored != encoder_sha256:
                    raise ValueError(f"{self.path}: embedding cache was made with encoder graph {stored}, "
                                     f"not {encoder_sha256}; delete it or use another cache path")
                keys, embeddings = handle.get_tensor("keys"), handle.get_tensor("embeddings")
            for key, row in zip(keys, embeddings):
                self._rows[key.tobytes()] = row

    def __len__(self) -> int:
        return len(self._rows)

    def embed(self, texts: Sequence[str], encoder: Any, batch_size: int = 32) -> np.ndarray:
        """Embeddings of ``texts`` (cached ones reused, missing ones encoded and saved)."""
        keys = [text_key(text) for text in texts]
        missing = list(dict.fromkeys(key for key in keys if key not in self._rows))
        if missing:
            by_key = {key: text for key, text in zip(keys, texts)}
            vectors = encoder.encode([by_key[key] for key in missing], batch_size=batch_size)
            for key, vector in zip(missing, vectors):
                self._rows[key] = vector.astype(np.float32)
            self.save()
        return np.stack([self._rows[key] for key in keys]).astype(np.float32) if keys else \
            np.zeros((0, EMBEDDING_DIM), np.float32)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = np.stack([np.frombuffer(key, dtype=np.uint8) for key in self._rows])
        embeddings = np.stack(list(self._rows.values())).astype(np.float32)
        temporary = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        save_file({"keys": keys, "embeddings": embeddings}, str(temporary),
                  metadata={"encoder_sha256": self.encoder_sha256})
        os.replace(temporary, self.path)


def frozen_embeddings(texts: Sequence[str], encoder_dir: Union[str, os.PathLike[str]],
                      cache_path: Optional[Union[str, os.PathLike[str]]] = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Embed ``texts`` with the exported fp32 ONNX encoder, through the cache.

    Returns the (n, 384) embeddings and the encoder description router.json stores.
    """
    encoder_dir = Path(encoder_dir)
    encoder = OnnxSentenceEncoder(encoder_dir, quantized=False, threads=1)
    graph_sha = sha256_file(encoder.graph_path)
    recorded = (encoder.meta.get("sha256") or {}).get("model.onnx")
    if recorded and recorded != graph_sha:
        raise ValueError(f"{encoder.graph_path}: sha256 {graph_sha} differs from encoder.json ({recorded})")
    if cache_path is None:
        cache_path = encoder_dir.resolve().parent / "cache" / f"embeddings-{graph_sha[:16]}.safetensors"
    embeddings = EmbeddingCache(cache_path, graph_sha).embed(texts, encoder)
    return embeddings, _encoder_description(encoder.meta, graph_sha, _dir_hint(encoder_dir), encoder.max_length,
                                            encoder_dir)


def _dir_hint(encoder_dir: Path) -> str:
    """The encoder directory relative to the project root when it lies inside it (portable)."""
    try:
        return str(encoder_dir.resolve().relative_to(project_root().resolve()))
    except ValueError:
        return str(encoder_dir)


def _encoder_description(meta: dict[str, Any], graph_sha: str, dir_hint: str, max_length: int,
                         encoder_dir: Path) -> dict[str, Any]:
    """What router.json records of its encoder: sha256 of each graph and its probe embeddings."""
    by_file = dict(meta.get("sha256") or {})
    by_file["model.onnx"] = graph_sha
    return {"name": meta.get("name"), "kind": meta.get("kind", "transformer"), "dim": int(meta["dim"]),
            "sha256": graph_sha, "sha256_by_file": by_file, "trained_on": "model.onnx", "dir_hint": dir_hint,
            "max_length": max_length, "probe_embeddings_by_file": graph_fingerprints(encoder_dir)}


# --------------------------------------------------------------------------------------------------
# Model, loss, numpy reference forward


def _build_head(n_tasks: int, n_tiers: int, dropout: float,
                embedding_dim: int = EMBEDDING_DIM, acceptance: bool = False):  # -> torch.nn.Module
    """The head; ``acceptance=True`` adds the K acceptance logits (what ``train_router`` builds).

    ``forward`` returns ``(logits, penultimate)``, plus the acceptance *logits* with
    ``acceptance=True`` (the ONNX export applies the sigmoid).  The default stays False so code that
    rebuilds a format-1 head from its safetensors (benchmarks/router_latency.py) keeps working.
    """
    import torch
    from torch import nn

    class RouterHead(nn.Module):
        """[embedding ; task embedding] -> 256 ReLU -> dropout -> K logits (and the 256 features).

        ``matmul`` rather than ``nn.Linear``'s Gemm so the ONNX graph has MatMul nodes, which
        onnxruntime's dynamic int8 quantisation covers (it skips Gemm).
        """

        def __init__(self) -> None:
            super().__init__()
            self.task_embedding = nn.Embedding(n_tasks, TASK_DIM)
            self.hidden = nn.Linear(embedding_dim + TASK_DIM, HIDDEN)
            self.out = nn.Linear(HIDDEN, n_tiers)
            self.accept = nn.Linear(HIDDEN, n_tiers) if acceptance else None
            self.dropout = nn.Dropout(dropout)

        def forward(self, embedding: "torch.Tensor", task_id: "torch.Tensor"):
            features = torch.cat([embedding, self.task_embedding(task_id)], dim=1)
            penultimate = torch.relu(torch.matmul(features, self.hidden.weight.t()) + self.hidden.bias)
            dropped = self.dropout(penultimate)
            logits = torch.matmul(dropped, self.out.weight.t()) + self.out.bias
            if self.accept is None:
                return logits, penultimate
            return logits, penultimate, torch.matmul(dropped, self.accept.weight.t()) + self.accept.bias

    return RouterHead()


def _export_wrapper(head):  # -> torch.nn.Module
    """The head as served: (logits, penultimate, sigmoid(acceptance logits))."""
    import torch

    class Served(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = head

        def forward(self, embedding: "torch.Tensor", task_id: "torch.Tensor"):
            logits, penultimate, accept_logits = self.head(embedding, task_id)
            return logits, penultimate, torch.sigmoid(accept_logits)

    return Served()


def forward_numpy(weights: dict[str, np.ndarray], embedding: np.ndarray, task_ids: np.ndarray,
                  return_penultimate: bool = False, return_acceptance: bool = False):
    """The head in plain numpy from safetensors weights: the reference the ONNX graphs must match.

    Returns the logits, then the penultimate features and/or the acceptance probabilities when asked.
    """
    features = np.concatenate([embedding.astype(np.float32),
                               weights["task_embedding.weight"][np.asarray(task_ids, dtype=np.int64)]], axis=1)
    penultimate = np.maximum(features @ weights["hidden.weight"].T + weights["hidden.bias"], 0.0)
    logits = penultimate @ weights["out.weight"].T + weights["out.bias"]
    out = [logits]
    if return_penultimate:
        out.append(penultimate)
    if return_acceptance:
        accept_logits = penultimate @ weights["accept.weight"].T + weights["accept.bias"]
        out.append(1.0 / (1.0 + np.exp(-accept_logits.astype(np.float64))))
    return tuple(out) if len(out) > 1 else logits


def routing_loss(logits, target, quality, tau, tier_cost, cost_weight: float = COST_WEIGHT,
                 quality_weight: float = QUALITY_WEIGHT, accept_logits=None, accept_weight: float = ACCEPT_WEIGHT):
    """L_route + w_c L_cost + w_q L_quality (+ w_a L_accept), averaged over the batch; returns (total, parts).

    L_accept (when ``accept_logits`` is given) is the BCE of each tier's acceptance logit against
    ``quality >= tau``, averaged over tiers and rows.
    """
    import torch
    import torch.nn.functional as F

    probabilities = torch.softmax(logits, dim=1)
    route = F.cross_entropy(logits, target)
    cost = (probabilities * tier_cost).sum(dim=1).mean()
    shortfall = torch.clamp(tau[:, None] - quality, min=0.0)
    quality_term = (probabilities * shortfall).sum(dim=1).mean()
    total = route + cost_weight * cost + quality_weight * quality_term
    parts = {"route": route.item(), "cost": cost.item(), "quality": quality_term.item()}
    if accept_logits is not None:
        acceptable = (quality >= tau[:, None]).to(accept_logits.dtype)
        accept = F.binary_cross_entropy_with_logits(accept_logits, acceptable)
        total = total + accept_weight * accept
        parts["accept"] = accept.item()
    return total, parts


# --------------------------------------------------------------------------------------------------
# Fine-tune mode encoder


def _build_finetune_encoder(model_path: Path, max_length: int):
    import torch
    from torch import nn
    from transformers import AutoModel

    class MeanPooledEncoder(nn.Module):
        """MiniLM -> masked mean pooling -> L2 normalisation: the same vector the ONNX path serves."""

        def __init__(self) -> None:
            super().__init__()
            self.model = AutoModel.from_pretrained(str(model_path))
            self.tokenizer = Tokenizer.from_file(str(model_path / "tokenizer.json"))
            self.tokenizer.enable_truncation(max_length=max_length)
            self.tokenizer.no_padding()

        def forward(self, texts: Sequence[str]) -> "torch.Tensor":
            encodings = self.tokenizer.encode_batch(list(texts))
            length = max(len(e.ids) for e in encodings)
            ids = torch.zeros((len(texts), length), dtype=torch.long)
            mask = torch.zeros((len(texts), length), dtype=torch.long)
            for row, enc in enumerate(encodings):
                ids[row, :len(enc.ids)] = torch.tensor(enc.ids)
                mask[row, :len(enc.ids)] = 1
            hidden = self.model(input_ids=ids, attention_mask=mask,
                                token_type_ids=torch.zeros_like(ids)).last_hidden_state
            weights = mask.unsqueeze(-1).float()
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=1)

    return MeanPooledEncoder()


# --------------------------------------------------------------------------------------------------
# Data preparation


@dataclass
class _Prepared:
    texts: list[str]
    task_ids: np.ndarray          # int64 (n,)
    targets: np.ndarray           # int64 (n,)
    quality: np.ndarray           # float32 (n, K)
    tau: np.ndarray               # float32 (n,)
    tier_cost: np.ndarray         # float32 (n, K), normalised per task
    tasks: list[str]              # index 0 = __unknown__
    cost_table: dict[str, list[float]]


def _prepare(records: Sequence[AllPairsRecord], portfolio: Portfolio,
             label: Callable[[AllPairsRecord, Portfolio], int] = routing_target) -> _Prepared:
    if not records:
        raise ValueError("no training records")
    tier_names = portfolio.tier_names
    tasks = [UNKNOWN_TASK] + sorted({record.task for record in records})
    task_index = {task: position for position, task in enumerate(tasks)}
    quality = tier_values(records, tier_names, "quality").astype(np.float32)
    costs = tier_values(records, tier_names, "cost_usd")
    task_of = np.array([task_index[record.task] for record in records], dtype=np.int64)
    cost_table: dict[str, list[float]] = {}
    tier_cost = np.zeros_like(quality)
    for task, position in task_index.items():
        rows = task_of == position
        if not rows.any():
            continue
        means = costs[rows].mean(axis=0)
        top = means.max()
        normalised = means / top if top > 0 else np.zeros_like(means)
        cost_table[task] = [float(value) for value in normalised]
        tier_cost[rows] = normalised
    return _Prepared(
        texts=[record.prompt for record in records], task_ids=task_of,
        targets=np.array([label(record, portfolio) for record in records], dtype=np.int64),
        quality=quality, tau=np.array([portfolio.tau(record.task) for record in records], dtype=np.float32),
        tier_cost=tier_cost, tasks=tasks, cost_table=cost_table)


def _split(task_ids: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split within each task, so every task is validated."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for task in np.unique(task_ids):
        rows = rng.permutation(np.nonzero(task_ids == task)[0])
        n_val = max(1, int(round(len(rows) * val_fraction))) if len(rows) > 1 else 0
        val.extend(rows[:n_val])
        train.extend(rows[n_val:])
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(val), dtype=np.int64)


@contextlib.contextmanager
def _deterministic_torch(seed: int, threads: int) -> Iterator[None]:
    import torch

    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        torch.set_num_threads(previous_threads)


# --------------------------------------------------------------------------------------------------
# Export


def export_head_onnx(head, out_dir: Path) -> tuple[Path, Path]:
    """head.onnx (fp32, opset 17, TorchScript exporter) and head.int8.onnx (dynamic int8).

    Outputs ``logits``, ``penultimate`` and (heads built with ``acceptance=True``) ``acceptance``:
    one ONNX run gives the route and the acceptance probabilities together.
    """
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    head.eval()
    fp32, int8 = out_dir / "head.onnx", out_dir / "head.int8.onnx"
    example = (torch.zeros((2, head.hidden.in_features - TASK_DIM), dtype=torch.float32),
               torch.zeros((2,), dtype=torch.long))
    outputs = list(HEAD_OUTPUTS) if head.accept is not None else ["logits", "penultimate"]
    module = _export_wrapper(head).eval() if head.accept is not None else head
    with torch.no_grad(), warnings.catch_warnings():
        # dynamo=False is deliberate (DESIGN §4): silence the "legacy exporter" deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, args=example, f=str(fp32), input_names=["embedding", "task_id"],
                          output_names=outputs,
                          dynamic_axes={"embedding": {0: "batch"}, "task_id": {0: "batch"},
                                        **{name: {0: "batch"} for name in outputs}},
                          opset_version=17, dynamo=False)
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    return fp32, int8


def _export_finetuned_encoder(encoder, source: Path, out_dir: Path, max_length: int) -> dict[str, Any]:
    """Save the trained MiniLM and export it with the project's encoder exporter to ``out_dir``."""
    with tempfile.TemporaryDirectory(prefix="routenlp-finetuned-") as scratch:
        scratch_path = Path(scratch)
        encoder.model.save_pretrained(str(scratch_path))  # safetensors
        shutil.copy(source / "tokenizer.json", scratch_path / "tokenizer.json")
        export_encoder(out_dir, model_path=scratch_path, max_length=max_length)
    meta_path = out_dir / "encoder.json"
    meta = json.loads(meta_path.read_text())
    meta["source"] = f"fine-tuned by coopt.train_router from {source}"
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# --------------------------------------------------------------------------------------------------
# Training


def _as_records(allpairs: Union[str, os.PathLike[str], Sequence[AllPairsRecord]],
                portfolio: Portfolio) -> tuple[list[AllPairsRecord], str]:
    if isinstance(allpairs, (str, os.PathLike)):
        return read_allpairs(allpairs, portfolio), data_sha256(allpairs)
    records = list(allpairs)
    for record in records:
        if record.task not in portfolio.tasks:
            raise ValueError(f"record {record.id}: task {record.task!r} is not in the portfolio")
        missing = [name for name in portfolio.tier_names if name not in record.tiers]
        if missing:
            raise ValueError(f"record {record.id}: missing tier(s) {missing}")
    return records, records_sha256(records)


def train_router(allpairs: Union[str, os.PathLike[str], Sequence[AllPairsRecord]],
                 portfolio: Union[Portfolio, str, os.PathLike[str]],
                 out_dir: Union[str, os.PathLike[str]], mode: str = "frozen",
                 encoder_dir: Union[str, os.PathLike[str]] = "artifacts/encoder", seed: int = 0,
                 epochs: int = 10, lr: Optional[float] = None, batch_size: int = 64, patience: int = 3,
                 val_fraction: float = 0.15, dropout: float = 0.1, task_dropout: float = 0.1,
                 weight_decay: float = 0.01, cost_weight: float = COST_WEIGHT,
                 quality_weight: float = QUALITY_WEIGHT, accept_weight: float = ACCEPT_WEIGHT,
                 cache_path: Optional[Union[str, os.PathLike[str]]] = None,
                 finetune_max_length: int = 128, threads: int = 1,
                 target: str = "best_quality") -> TrainReport:
    """Train the router on an all-pairs file (or records) and write the artifact to ``out_dir``.

    ``target`` is the label rule for queries no tier answers acceptably: ``"best_quality"`` (default,
    :func:`routenlp_core.allpairs.routing_target`: the cheapest tier with the best quality) or
    ``"top_tier"`` (:func:`routenlp_core.allpairs.cheapest_acceptable_tier`, the oracle's definition).

    ``lr`` defaults to 1e-3 for the frozen-encoder head and to the paper's 2e-5 for ``finetune``.
    Early stopping keeps the epoch with the lowest validation loss (patience ``patience``).
    ``encoder_dir`` is recorded in router.json as ``dir_hint``, relative to the project root when
    it lies inside it (so the artifact moves with its checkout).
    """
    import torch

    if mode not in ("frozen", "finetune"):
        raise ValueError(f"mode must be 'frozen' or 'finetune', got {mode!r}")
    if epochs < 1 or batch_size < 1 or patience < 1:
        raise ValueError(f"epochs, batch_size and patience must be >= 1, got {epochs}, {batch_size}, {patience}")
    if not 0.0 < val_fraction < 1.0 or not 0.0 <= task_dropout < 1.0 or not 0.0 <= dropout < 1.0:
        raise ValueError("val_fraction must lie in (0, 1); dropout and task_dropout in [0, 1)")
    if not isinstance(portfolio, Portfolio):
        portfolio = load_portfolio(portfolio)
    if target not in TARGET_RULES:
        raise ValueError(f"target must be one of {sorted(TARGET_RULES)}, got {target!r}")
    records, data_hash = _as_records(allpairs, portfolio)
    prepared = _prepare(records, portfolio, TARGET_RULES[target])
    lr = DEFAULT_LR[mode] if lr is None else float(lr)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "router.json").unlink(missing_ok=True)  # an artifact without router.json is incomplete
    started = time.perf_counter()

    with _deterministic_torch(seed, threads):
        encoder = None
        if mode == "frozen":
            embeddings, encoder_info = frozen_embeddings(prepared.texts, encoder_dir, cache_path)
            embedding_table = torch.from_numpy(embeddings)
        else:
            source = minilm_model_path()
            encoder = _build_finetune_encoder(source, finetune_max_length)
            embedding_table = None
        embedding_dim = int(embeddings.shape[1]) if mode == "frozen" else EMBEDDING_DIM
        head = _build_head(len(prepared.tasks), len(portfolio.tiers), dropout, embedding_dim, acceptance=True)
        parameters = list(head.parameters()) + (list(encoder.parameters()) if encoder is not None else [])
        optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)

        task_ids = torch.from_numpy(prepared.task_ids)
        targets = torch.from_numpy(prepared.targets)
        quality = torch.from_numpy(prepared.quality)
        tau = torch.from_numpy(prepared.tau)
        tier_cost = torch.from_numpy(prepared.tier_cost)
        train_rows, val_rows = _split(prepared.task_ids, val_fraction, seed)
        if len(train_rows) == 0 or len(val_rows) == 0:
            raise ValueError(f"need records for both training and validation, got {len(records)}")
        generator = torch.Generator().manual_seed(seed)

        def embed(rows: np.ndarray) -> "torch.Tensor":
            if embedding_table is not None:
                return embedding_table[torch.from_numpy(rows)]
            return encoder([prepared.texts[i] for i in rows])

        def evaluate(rows: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
            head.eval()
            if encoder is not None:
                encoder.eval()
            total, logits_all, accept_all = 0.0, [], []
            with torch.no_grad():
                for start in range(0, len(rows), 256):
                    chunk = rows[start:start + 256]
                    index = torch.from_numpy(chunk)
                    logits, _, accept_logits = head(embed(chunk), task_ids[index])
                    loss, _ = routing_loss(logits, targets[index], quality[index], tau[index], tier_cost[index],
                                           cost_weight, quality_weight, accept_logits, accept_weight)
                    total += float(loss) * len(chunk)
                    logits_all.append(logits.numpy())
                    accept_all.append(torch.sigmoid(accept_logits).numpy())
            return total / len(rows), np.concatenate(logits_all), np.concatenate(accept_all)

        initial_val_loss, _, _ = evaluate(val_rows)
        best_val, best_epoch, best_state, since_best = math.inf, 0, None, 0
        train_losses, val_losses = [], []
        epochs_run = 0
        for epoch in range(1, epochs + 1):
            epochs_run = epoch
            head.train()
            if encoder is not None:
                encoder.train()
            order = train_rows[torch.randperm(len(train_rows), generator=generator).numpy()]
            running = 0.0
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                index = torch.from_numpy(chunk)
                batch_tasks = task_ids[index].clone()
                drop = torch.rand(len(chunk), generator=generator) < task_dropout
                batch_tasks[drop] = 0
                logits, _, accept_logits = head(embed(chunk), batch_tasks)
                loss, _ = routing_loss(logits, targets[index], quality[index], tau[index], tier_cost[index],
                                       cost_weight, quality_weight, accept_logits, accept_weight)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                running += loss.item() * len(chunk)
            train_losses.append(running / len(order))
            val_loss, _, _ = evaluate(val_rows)
            val_losses.append(val_loss)
            if val_loss < best_val - 1e-6:
                best_val, best_epoch, since_best = val_loss, epoch, 0
                best_state = {"head": {k: v.detach().clone() for k, v in head.state_dict().items()}}
                if encoder is not None:
                    best_state["encoder"] = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
            else:
                since_best += 1
                if since_best >= patience:
                    break
        head.load_state_dict(best_state["head"])
        if encoder is not None:
            encoder.load_state_dict(best_state["encoder"])
        _, val_logits, val_accept = evaluate(val_rows)
        train_seconds = time.perf_counter() - started

        quality_report = _quality_report(prepared, train_rows, val_rows, val_logits)
        quality_report["acceptance"] = acceptance_report(
            prepared.quality >= prepared.tau[:, None], prepared.task_ids, train_rows, val_rows, val_accept,
            _softmax(val_logits))
        weights = {name: tensor.detach().numpy().astype(np.float32)
                   for name, tensor in head.state_dict().items()}

        save_file({name: np.ascontiguousarray(weights[name]) for name in WEIGHT_NAMES},
                  str(out / "weights.safetensors"), metadata={"format_version": str(FORMAT_VERSION)})
        export_head_onnx(head, out)
        if encoder is not None:
            meta = _export_finetuned_encoder(encoder, source, out / "encoder", finetune_max_length)
            encoder_info = _encoder_description(meta, sha256_file(out / "encoder" / "model.onnx"),
                                                "encoder", finetune_max_length, out / "encoder")

    report = TrainReport(out_dir=out, mode=mode, n_train=len(train_rows), n_val=len(val_rows),
                         epochs_run=epochs_run, best_epoch=best_epoch, initial_val_loss=initial_val_loss,
                         best_val_loss=best_val, train_losses=train_losses, val_losses=val_losses,
                         train_seconds=train_seconds, **quality_report)
    metadata = {
        "format_version": FORMAT_VERSION,
        "tiers": portfolio.tier_names,
        "tier_models": [tier.model for tier in portfolio.tiers],
        "tasks": prepared.tasks,
        "task_specs": {name: {"metric": spec.metric, "tau": spec.tau, "kind": spec.kind}
                       for name, spec in portfolio.tasks.items() if name in prepared.tasks},
        "encoder": encoder_info,
        "mode": mode,
        "data_sha256": data_hash,
        "head": {"embedding_dim": embedding_dim, "task_dim": TASK_DIM, "hidden": HIDDEN, "dropout": dropout,
                 "inputs": ["embedding", "task_id"], "outputs": list(HEAD_OUTPUTS)},
        "files": {name: sha256_file(out / name) for name in ARTIFACT_FILES},
        "training": {
            **{key: value for key, value in report.to_dict().items() if key != "out_dir"},
            "seed": seed, "lr": lr, "batch_size": batch_size, "max_epochs": epochs, "patience": patience,
            "val_fraction": val_fraction, "target": target, "task_dropout": task_dropout, "weight_decay": weight_decay,
            "loss_weights": {"route": 1.0, "cost": cost_weight, "quality": quality_weight, "accept": accept_weight},
            "acceptance_labels": "quality >= task tau, per tier (all-pairs labels)",
            "tier_cost_normalised": prepared.cost_table,
        },
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    temporary = out / "router.json.tmp"
    temporary.write_text(json.dumps(metadata, indent=2, allow_nan=False) + "\n")
    os.replace(temporary, out / "router.json")
    return report


def _quality_report(prepared: _Prepared, train_rows: np.ndarray, val_rows: np.ndarray,
                    val_logits: np.ndarray) -> dict[str, Any]:
    """Validation accuracy vs the majority class, and cross-entropy vs the label prior (per task)."""
    n_tiers = prepared.quality.shape[1]
    val_targets = prepared.targets[val_rows]
    predicted = val_logits.argmax(axis=1)
    majority = int(np.bincount(prepared.targets[train_rows], minlength=n_tiers).argmax())
    shifted = val_logits - val_logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    route_ce = float(-log_probs[np.arange(len(val_rows)), val_targets].mean())
    prior_ce_terms = np.zeros(len(val_rows))
    per_task: dict[str, dict[str, float]] = {}
    for position, task in enumerate(prepared.tasks):
        train_mask = prepared.task_ids[train_rows] == position
        val_mask = prepared.task_ids[val_rows] == position
        if not val_mask.any():
            continue
        counts = np.bincount(prepared.targets[train_rows][train_mask], minlength=n_tiers) + 1.0  # Laplace
        prior = counts / counts.sum()
        prior_ce_terms[val_mask] = -np.log(prior[val_targets[val_mask]])
        per_task[task] = {
            "n_val": int(val_mask.sum()),
            "val_accuracy": float((predicted[val_mask] == val_targets[val_mask]).mean()),
            "majority_baseline_accuracy": float((val_targets[val_mask] == prior.argmax()).mean()),
            "val_route_ce": float(-log_probs[val_mask, val_targets[val_mask]].mean()),
            "prior_baseline_ce": float(prior_ce_terms[val_mask].mean()),
        }
    return {"val_accuracy": float((predicted == val_targets).mean()),
            "majority_baseline_accuracy": float((val_targets == majority).mean()),
            "val_route_ce": route_ce, "prior_baseline_ce": float(prior_ce_terms.mean()), "per_task": per_task}


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _brier_logloss(probabilities: np.ndarray, labels: np.ndarray, eps: float = 1e-6) -> tuple[float, float]:
    p = np.clip(probabilities.astype(np.float64), eps, 1.0 - eps)
    y = labels.astype(np.float64)
    return float(np.mean((p - y) ** 2)), float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))


def acceptance_report(acceptable: np.ndarray, task_ids: np.ndarray, train_rows: np.ndarray, val_rows: np.ndarray,
                      val_acceptance: np.ndarray, val_route_probabilities: np.ndarray) -> dict[str, Any]:
    """Validation Brier and log-loss of the acceptance output against two baselines.

    * ``prior``: each task's acceptance rate per tier on the training rows (Laplace-smoothed): what
      is known without reading the prompt;
    * ``cumulative``: sum_{j<=k} of the route softmax, the acceptance a format-1 router implies
      (exact only if acceptability is monotone in the tier; the top tier's is 1, clipped at 1e-6).

    Figures are over all (row, tier) pairs and per tier; log-loss clips probabilities to [1e-6, 1-1e-6].
    """
    y = acceptable[val_rows]
    prior = np.zeros_like(val_acceptance, dtype=np.float64)
    for task in np.unique(task_ids[val_rows]):
        train_mask = task_ids[train_rows] == task
        counts = acceptable[train_rows][train_mask].sum(axis=0)
        prior[task_ids[val_rows] == task] = (counts + 1.0) / (train_mask.sum() + 2.0)
    cumulative = np.clip(np.cumsum(val_route_probabilities, axis=1), 0.0, 1.0)
    out: dict[str, Any] = {"n_val": int(len(val_rows))}
    for name, estimate in (("head", val_acceptance), ("prior", prior), ("cumulative", cumulative)):
        brier, logloss = _brier_logloss(estimate, y)
        out[f"{name}_brier"], out[f"{name}_logloss"] = brier, logloss
        per_tier = [_brier_logloss(estimate[:, k], y[:, k]) for k in range(y.shape[1])]
        out[f"{name}_brier_by_tier"] = [b for b, _ in per_tier]
        out[f"{name}_logloss_by_tier"] = [l for _, l in per_tier]
    return out
