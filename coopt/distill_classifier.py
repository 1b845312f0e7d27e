"""Step 4a: label distillation into a classifier tier (T1: MiniLM embeddings + logistic-regression head).

The student is refitted on what it was built from -- the same seeded training rows the stand-in build
used (``routenlp_standins.build``: the classifier JSON records the limit, seed and C) -- plus the
distillation queries labelled by the teacher, each repeated ``weight`` times (an integer sample
weight: the logistic loss is a sum over rows, so a repeat weighs exactly like weight 2).  The encoder
stays frozen and shared: only the head changes, and it is written in the stand-in's own format
(safetensors + JSON, ``tiers/classifier/<task>.*``) under the iteration directory, where the local T1
tier picks it up (a deployment whose ``model_info.routenlp_coopt_dir`` names the iteration).

Teacher answers that are not a label of the task (a free-text reply from a real LLM teacher) are
dropped and counted, never turned into a new class.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from routenlp_core.hashing import sha256_file
from routenlp_core.tasks import get_task
from routenlp_standins.artifacts import read_tensors_and_meta
from routenlp_standins.classifier import ClassifierTier, build_classifier, predict_proba
from routenlp_standins.minilm import MiniLM
from coopt.train_router import EmbeddingCache

DISTILL_WEIGHT = 3


def _encoder_cache(root: Path) -> tuple[Any, Any]:
    """The serving MiniLM (int8 ONNX, as T1 embeds at run time) and an embedding cache for its graph."""
    minilm = MiniLM(root, threads=2)
    graph_sha = sha256_file(minilm.encoder.graph_path)
    cache = EmbeddingCache(root / "cache" / f"classifier-embeddings-{graph_sha[:16]}.safetensors", graph_sha)
    return minilm, cache


def embed(texts: Sequence[str], base_root: Path, progress: bool = True, desc: str = "embedding") -> np.ndarray:
    """int8-ONNX MiniLM embeddings of ``texts``, through the cache (rows L2-normalised)."""
    minilm, cache = _encoder_cache(Path(base_root))
    texts = list(texts)
    out = []
    step = 512
    for start in tqdm(range(0, len(texts), step), desc=desc, disable=not progress or len(texts) <= step, unit="batch"):
        out.append(cache.embed(texts[start:start + step], minilm.encoder, batch_size=64))
    return np.concatenate(out) if out else np.zeros((0, 384), np.float32)


def base_training_rows(task: str, base_root: Path, limit: Optional[int] = None) -> tuple[list[Any], dict[str, Any]]:
    """The rows the base classifier of ``task`` was fitted on (from its JSON), and that JSON."""
    _, meta = read_tensors_and_meta(Path(base_root), "classifier", task)
    build = meta.get("build") or {}
    rows = get_task(task).load("train", limit=limit if limit is not None else build.get("classifier_train_limit"),
                               seed=int(build.get("seed", 0)))
    return rows, meta


def distill_classifier(task: str, items: Sequence[Any], base_root: str | Path, out_root: str | Path,
                       weight: int = DISTILL_WEIGHT, base_limit: Optional[int] = None,
                       progress: bool = True) -> dict[str, Any]:
    """Refit ``task``'s T1 head on its base rows plus the teacher-labelled ``items``; write it under ``out_root``.

    ``items`` are :class:`coopt.selection.DistillItem` (all of them: pass the items of earlier
    iterations too when distillation accumulates).  ``base_limit`` shrinks the base rows (tests).
    Returns a report: counts, how often the old and the new head agree with the teacher on the items.
    """
    if weight < 1:
        raise ValueError(f"weight must be a positive integer, got {weight}")
    base_root, out_root = Path(base_root), Path(out_root)
    labels = set(get_task(task).labels() or [])
    if not labels:
        raise ValueError(f"task {task!r} has no label set: label distillation needs a classification task")
    started = time.perf_counter()
    usable = [item for item in items if item.task == task and item.teacher_output is not None
              and item.teacher_output.strip() in labels]
    dropped = len([item for item in items if item.task == task]) - len(usable)
    rows, base_meta = base_training_rows(task, base_root, base_limit)
    texts = [row.text for row in rows] + [item.prompt for item in usable]
    vectors = embed(texts, base_root, progress=progress, desc=f"{task}: embedding")
    base_vectors, item_vectors = vectors[:len(rows)], vectors[len(rows):]
    teacher = [item.teacher_output.strip() for item in usable]
    train_texts = [row.text for row in rows] + [item.prompt for item in usable for _ in range(weight)]
    train_labels = [str(row.reference) for row in rows] + [label for label in teacher for _ in range(weight)]
    train_vectors = np.concatenate([base_vectors, np.repeat(item_vectors, weight, axis=0)]) if usable else base_vectors
    before = ClassifierTier(base_root, task)
    agree_before = _agreement(before.coef, before.intercept, before.labels, item_vectors, teacher)
    settings = {**(base_meta.get("build") or {}),
                "distillation": {"kind": "label", "n_items": len(usable), "n_dropped_not_a_label": dropped,
                                 "n_hard": sum(item.kind == "hard" for item in usable),
                                 "n_random": sum(item.kind == "random" for item in usable), "weight": weight,
                                 "n_base_rows": len(rows), "base": str(base_root)}}
    meta = build_classifier(out_root, task, train_texts, train_labels, train_vectors, [],
                            np.zeros((0, vectors.shape[1]), np.float32), settings,
                            c=float(base_meta.get("C", 10.0)), seed=int((base_meta.get("build") or {}).get("seed", 0)))
    after = ClassifierTier(out_root, task)
    agree_after = _agreement(after.coef, after.intercept, after.labels, item_vectors, teacher)
    return {"task": task, "tier": "T1", "method": "label distillation (logistic head on frozen MiniLM)",
            "n_items": len(usable), "n_dropped": dropped, "n_base_rows": len(rows), "weight": weight,
            "teacher_agreement_before": agree_before, "teacher_agreement_after": agree_after,
            "train_accuracy": meta["train_accuracy"], "seconds": round(time.perf_counter() - started, 1),
            "out": str(out_root / "tiers" / "classifier" / f"{task}.json")}


def _agreement(coef: np.ndarray, intercept: np.ndarray, classes: Sequence[str], vectors: np.ndarray,
               teacher: Sequence[str]) -> Optional[float]:
    """Fraction of items on which the head's top label is the teacher's."""
    if not len(teacher):
        return None
    predicted = np.array(classes)[predict_proba(coef, intercept, vectors).argmax(axis=1)]
    return round(float(np.mean(predicted == np.array(teacher))), 4)
