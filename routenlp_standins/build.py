"""Build the stand-in tiers' artifacts: ``python -m routenlp_standins build [--artifacts DIR] [--force]``.

Per task: the T1 classifier head (single-label tasks) and the T3 k-NN index; once: the T2 SmolLM2
transformers-format copy.  T4 (replay) needs no artifact: it reads the task data through
``routenlp_core.tasks`` when first used.  What already exists is skipped unless ``force``; every artifact's
JSON records the settings it was built with, so a subset build (the tests use one when nothing is
built yet) is visible as such -- rebuild it with ``--force`` for serving.

Each task's train rows are encoded once and shared by the classifier (a seeded subset) and the
index.  This is a pure function of the task data and the settings: nothing is trained on load.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from tqdm import tqdm

from routenlp_core.tasks import get_task
from routenlp_standins.answer import UnsupportedTaskError
from routenlp_standins.artifacts import smollm2_dir, smollm2_exists, tier_artifact_exists
from routenlp_standins.classifier import build_classifier, check_classifiable
from routenlp_standins.minilm import MiniLM
from routenlp_standins.retrieval import build_retrieval, vote_groups
from routenlp_standins.smollm import export_smollm2

DEFAULT_TASKS = ("banking77", "clinc150", "bitext")
ENCODE_BATCH = 256


@dataclass(frozen=True)
class BuildSettings:
    """Sizes and seed of a build.  The defaults are the serving build (about 2.5 min on 2 CPU cores)."""

    classifier_train_limit: Optional[int] = 4000  # seeded subset: the LR head gains little beyond it
    index_train_limit: Optional[int] = None  # None: the whole train split goes into the k-NN index
    eval_limit: Optional[int] = 1000  # seeded test subset for the accuracies recorded in the JSON
    seed: int = 0
    encoder_threads: int = 2


def _encode(minilm: Any, texts: Sequence[str], desc: str, progress: bool) -> np.ndarray:
    parts = []
    for start in tqdm(range(0, len(texts), ENCODE_BATCH), desc=desc, leave=False, disable=not progress,
                      unit="batch"):
        parts.append(minilm.encode(list(texts[start:start + ENCODE_BATCH])))
    return np.concatenate(parts) if parts else np.zeros((0, 384), dtype=np.float32)


def _applicable(tier: str, task: str) -> bool:
    try:
        if tier == "classifier":
            check_classifiable(task)
        else:
            vote_groups(task, [])
    except UnsupportedTaskError:
        return False
    return True


def _build_task(root: Path, task: str, tiers: Sequence[str], settings: BuildSettings, minilm: Any,
                progress: bool) -> dict[str, Any]:
    """Encode the rows ``task`` needs once, then build the requested tiers from the embeddings."""
    spec = get_task(task)
    started = time.perf_counter()
    wanted: dict[str, list[Any]] = {}
    if "classifier" in tiers:
        wanted["classifier"] = spec.load("train", limit=settings.classifier_train_limit, seed=settings.seed)
    if "retrieval" in tiers:
        wanted["retrieval"] = spec.load("train", limit=settings.index_train_limit, seed=settings.seed)
    test = spec.load("test", limit=settings.eval_limit, seed=settings.seed)
    unique = {example.id: example for rows in wanted.values() for example in rows}
    ids = list(unique)
    vectors = _encode(minilm, [unique[i].text for i in ids], f"{task}: encode train", progress)
    row_of = {example_id: row for row, example_id in enumerate(ids)}
    test_vectors = _encode(minilm, [example.text for example in test], f"{task}: encode test", progress)
    encode_seconds = time.perf_counter() - started
    recorded = {**asdict(settings), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    report: dict[str, Any] = {"encode_seconds": round(encode_seconds, 1), "encoded_rows": len(ids) + len(test)}
    for tier, rows in wanted.items():
        embeddings = vectors[[row_of[example.id] for example in rows]]
        if tier == "classifier":
            meta = build_classifier(root, task, [e.text for e in rows], [str(e.reference) for e in rows], embeddings,
                                    [str(e.reference) for e in test], test_vectors, recorded, seed=settings.seed)
            report[tier] = {key: meta[key] for key in ("n_train", "n_test", "train_accuracy", "test_accuracy",
                                                       "test_mean_top_probability", "fit_seconds")}
        else:
            meta = build_retrieval(root, task, rows, embeddings, test, test_vectors, recorded)
            report[tier] = {key: meta[key] for key in ("n_index", "n_test", "test_accuracy", "build_seconds")}
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def build_all(artifacts_dir: str | Path, tasks: Sequence[str] = DEFAULT_TASKS, force: bool = False,
              settings: BuildSettings = BuildSettings(), tiers: Sequence[str] = ("classifier", "retrieval", "smollm2"),
              progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build what is missing (everything with ``force``) under ``artifacts_dir``; returns a report.

    Tasks a tier cannot serve are skipped (bitext has no classifier).  The MiniLM encoder must
    already be exported to ``<artifacts_dir>/encoder``.
    """
    root = Path(artifacts_dir)
    started = time.perf_counter()
    report: dict[str, Any] = {"artifacts_dir": str(root), "built": {}, "skipped": []}
    per_task: dict[str, list[str]] = {}
    for task in tasks:
        for tier in ("classifier", "retrieval"):
            if tier not in tiers or not _applicable(tier, task):
                continue
            if tier_artifact_exists(root, tier, task) and not force:
                report["skipped"].append(f"{tier}/{task}")
                continue
            per_task.setdefault(task, []).append(tier)
    build_smollm = "smollm2" in tiers and (force or not smollm2_exists(root))
    if "smollm2" in tiers and not build_smollm:
        report["skipped"].append("smollm2")
    steps = [("task", task) for task in per_task] + ([("smollm2", "")] if build_smollm else [])
    if report["skipped"]:
        log(f"already built, skipping (use --force to rebuild): {', '.join(report['skipped'])}")
    minilm = None
    if per_task:
        minilm = MiniLM(root, threads=settings.encoder_threads)
    with tqdm(steps, desc="routenlp stand-ins", unit="step", disable=not progress) as bar:
        for kind, task in bar:
            if kind == "task":
                bar.set_postfix_str(f"{task}: {'+'.join(per_task[task])}")
                report["built"][task] = _build_task(root, task, per_task[task], settings, minilm, progress)
            else:
                bar.set_postfix_str("smollm2: GGUF -> safetensors")
                report["built"]["smollm2"] = export_smollm2(smollm2_dir(root))
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report
