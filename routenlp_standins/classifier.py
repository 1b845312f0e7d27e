"""T1 ``classifier``: OFFLINE STAND-IN for a cheap fine-tuned intent classifier (e.g. a DistilBERT head).

MiniLM sentence embeddings (the int8 ONNX encoder the router also uses) feed a per-task multinomial
logistic-regression head.  ``fit_head``/``build_classifier`` train it with scikit-learn on a seeded
subset of the task's train split and export ``coef``/``intercept`` to safetensors plus a JSON with the
label order and the measured train/test accuracy.  Serving (:class:`ClassifierTier`) is numpy only:
no scikit-learn model object is ever persisted or loaded.

The answer is the top label; it is reported as ONE token whose logprob is ``ln p(top class)``, so
the shared uncertainty function gives ``u = 1 - p_top``.  Only single-label classification tasks
(a ``labels()`` set and the 0/1 ``accuracy`` metric) can be served.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from routenlp_core.tasks import get_task
from routenlp_standins.answer import TierAnswer, TokenLogprob, UnsupportedTaskError
from routenlp_standins.artifacts import read_tensors_and_meta, tier_files, write_tensors_and_meta

if TYPE_CHECKING:
    from routenlp_standins.minilm import MiniLM

TIER = "classifier"
# C=10 on L2-normalised MiniLM embeddings: banking77 (4,000 train rows) reaches ~0.90 test accuracy
# with mean top-class probability ~0.78; C=1 underfits (0.87, p ~0.46), larger C barely helps accuracy
# and makes the probabilities overconfident, which would blunt the uncertainty signal.
DEFAULT_C = 10.0


def check_classifiable(task_name: str) -> list[str]:
    """The task's labels if the classifier can serve it, else :class:`UnsupportedTaskError`."""
    spec = get_task(task_name)
    labels = spec.labels()
    if labels is None or spec.metric != "accuracy":
        raise UnsupportedTaskError(
            f"task {task_name!r} ({spec.kind}, metric {spec.metric}) is not a single-label classification "
            "task; the classifier tier serves tasks like banking77 and clinc150")
    return labels


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Numerically stable row-wise softmax."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def fit_head(embeddings: np.ndarray, labels: Sequence[str], c: float = DEFAULT_C,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Multinomial logistic regression -> ``(coef (K,d) float32, intercept (K,) float32, classes)``."""
    from sklearn.linear_model import LogisticRegression  # build only: serving never imports scikit-learn

    model = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    model.fit(embeddings, list(labels))
    classes = [str(label) for label in model.classes_]
    coef = model.coef_.astype(np.float32)
    intercept = model.intercept_.astype(np.float32)
    if coef.shape[0] == 1:  # scikit-learn stores a binary problem as one row; serve it as two
        coef = np.vstack([-coef, coef]) / 2
        intercept = np.concatenate([-intercept, intercept]) / 2
    return coef, intercept, classes


def predict_proba(coef: np.ndarray, intercept: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """Class probabilities (n, K) from the exported head; the serving and the evaluation path."""
    return softmax_rows(embeddings.astype(np.float32) @ coef.T + intercept)


def build_classifier(root: Path, task_name: str, train_texts: Sequence[str], train_labels: Sequence[str],
                     train_embeddings: np.ndarray, test_labels: Sequence[str], test_embeddings: np.ndarray,
                     settings: dict[str, Any], c: float = DEFAULT_C, seed: int = 0) -> dict[str, Any]:
    """Fit the head for ``task_name`` on the given (already encoded) rows, measure it, export it.

    A pure function of its inputs: the caller chooses the rows, so the build can share one encoding
    pass between the classifier and the retrieval index.  Returns the JSON metadata written.
    """
    task_labels = check_classifiable(task_name)
    started = time.perf_counter()
    coef, intercept, classes = fit_head(train_embeddings, train_labels, c=c, seed=seed)
    unknown = sorted(set(classes) - set(task_labels))
    if unknown:
        raise ValueError(f"task {task_name!r}: training labels {unknown[:5]} are not in the task's label set")
    fit_seconds = time.perf_counter() - started
    classes_arr = np.array(classes)
    train_pred = classes_arr[predict_proba(coef, intercept, train_embeddings).argmax(axis=1)]
    test_proba = predict_proba(coef, intercept, test_embeddings)
    test_pred = classes_arr[test_proba.argmax(axis=1)]
    meta = {
        "tier": TIER,
        "task": task_name,
        "standin_for": "a fine-tuned small intent classifier (offline stand-in)",
        "labels": classes,
        "task_labels_missing_from_train": sorted(set(task_labels) - set(classes)),
        "encoder": "all-MiniLM-L6-v2 int8 ONNX (artifacts/encoder)",
        "C": c,
        "n_train": len(train_texts),
        "n_test": len(test_labels),
        "train_accuracy": float(np.mean(train_pred == np.array(train_labels))),
        "test_accuracy": float(np.mean(test_pred == np.array(test_labels))) if len(test_labels) else None,
        "test_mean_top_probability": float(test_proba.max(axis=1).mean()) if len(test_labels) else None,
        "fit_seconds": round(fit_seconds, 2),
        "build": settings,
    }
    weights_path, _ = tier_files(root, TIER, task_name)
    write_tensors_and_meta(weights_path, {"coef": coef, "intercept": intercept}, meta)
    return meta


class ClassifierTier:
    """Serves one task's exported head; loading does no training (scikit-learn is not imported)."""

    def __init__(self, root: Path, task_name: str) -> None:
        tensors, self.meta = read_tensors_and_meta(root, TIER, task_name)
        self.task = task_name
        self.coef = tensors["coef"].astype(np.float32)
        self.intercept = tensors["intercept"].astype(np.float32)
        self.labels: list[str] = list(self.meta["labels"])
        if self.coef.shape[0] != len(self.labels):
            raise ValueError(f"{tier_files(root, TIER, task_name)[0]}: {self.coef.shape[0]} rows of coef but "
                             f"{len(self.labels)} labels in the JSON; rebuild with --force")

    def classify(self, embeddings: np.ndarray) -> list[tuple[str, float]]:
        """``(top label, its probability)`` per embedded query."""
        proba = predict_proba(self.coef, self.intercept, embeddings)
        top = proba.argmax(axis=1)
        return [(self.labels[index], float(proba[row, index])) for row, index in enumerate(top)]

    def answer(self, query: str, minilm: "MiniLM") -> TierAnswer:
        """One query -> the label as a single token with logprob ``ln p_top``."""
        label, probability = self.classify(minilm.encode([query]))[0]
        logprob = float(np.log(max(probability, 1e-45)))
        return TierAnswer(text=label, tokens=[TokenLogprob.of_text(label, logprob)],
                          prompt_tokens=minilm.count_tokens(query),
                          details={"tier": TIER, "task": self.task, "p_top": probability})
