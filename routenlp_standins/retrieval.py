"""T3 ``retrieval``: OFFLINE STAND-IN for a mid-size model (in real use, a 7B model served by vLLM).

Nothing of that size ships offline here, so T3 answers by k-nearest-neighbour voting (k=10, cosine)
over MiniLM embeddings of the task's train split:

- intent tasks: the answer is the majority label among the neighbours, its probability the vote share;
- bitext: the neighbours vote on the customer intent (the dataset's ``intent`` column); the answer is
  the reference response of the nearest neighbour with the majority intent, probability the vote share.

Every reported token carries ``ln(vote share)``, so ``u = 1 - share`` through the shared function.
The index is ``embeddings`` (float16) in safetensors plus a JSON with example ids, answers and vote
groups.  Ties between groups are broken by the summed similarity of their voters.
"""

from __future__ import annotations

import csv
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from routenlp_core.paths import data_dir
from routenlp_core.tasks import get_task
from routenlp_standins.answer import TierAnswer, TokenLogprob, UnsupportedTaskError, uniform_pieces
from routenlp_standins.artifacts import read_tensors_and_meta, tier_files, write_tensors_and_meta

if TYPE_CHECKING:
    from routenlp_standins.minilm import MiniLM

TIER = "retrieval"
DEFAULT_K = 10
BITEXT_FILE = ("bitext_customer_support", "bitext_customer_support_4514.csv")


def vote_groups(task_name: str, examples: Sequence[Any]) -> list[str]:
    """What the neighbours vote on for each example: the gold label, or bitext's customer intent.

    ``routenlp_core.tasks`` exposes bitext's instruction and response only, so the intent is joined from the
    same CSV by the row index in the example id (``bitext-<split>-<row>``); the instruction text is
    checked so a change in the loader's row numbering fails loudly instead of mislabelling.
    """
    spec = get_task(task_name)
    if spec.labels() is not None and spec.metric == "accuracy":
        return [str(example.reference) for example in examples]
    if task_name != "bitext":
        raise UnsupportedTaskError(
            f"task {task_name!r}: the retrieval stand-in needs labels or intent groups to vote on "
            "(supported: single-label classification tasks and bitext)")
    path = data_dir().joinpath(*BITEXT_FILE)
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    groups = []
    for example in examples:
        row_index = int(example.id.rsplit("-", 1)[1])
        row = rows[row_index]
        if row["instruction"].strip() != example.text:
            raise ValueError(f"{path}: row {row_index} does not match example {example.id}; "
                             "the intent join by row index is out of date")
        groups.append(row["intent"].strip())
    return groups


def knn_vote(index_embeddings: np.ndarray, groups: Sequence[str], queries: np.ndarray,
             k: int = DEFAULT_K) -> list[tuple[str, float, int]]:
    """Per query: ``(majority group, vote share, row of the nearest neighbour in that group)``."""
    k = min(k, index_embeddings.shape[0])
    sims = queries.astype(np.float32) @ index_embeddings.T
    out = []
    for row in sims:
        top = np.argpartition(-row, k - 1)[:k]
        top = top[np.argsort(-row[top], kind="stable")]
        counts: dict[str, int] = defaultdict(int)
        weight: dict[str, float] = defaultdict(float)
        for neighbour in top:
            counts[groups[neighbour]] += 1
            weight[groups[neighbour]] += float(row[neighbour])
        winner = max(counts, key=lambda group: (counts[group], weight[group]))
        nearest = next(int(n) for n in top if groups[n] == winner)
        out.append((winner, counts[winner] / k, nearest))
    return out


def build_retrieval(root: Path, task_name: str, examples: Sequence[Any], embeddings: np.ndarray,
                    test_examples: Sequence[Any], test_embeddings: np.ndarray, settings: dict[str, Any],
                    k: int = DEFAULT_K) -> dict[str, Any]:
    """Write the index for ``task_name`` from already encoded train rows; report test vote accuracy.

    Test accuracy is measured for label tasks only (bitext is scored by BERTScore, which the
    all-pairs runner computes, not the build).
    """
    started = time.perf_counter()
    spec = get_task(task_name)
    groups = vote_groups(task_name, examples)
    answers = [spec.gold_answer(example.reference) for example in examples]
    test_accuracy = None
    if spec.labels() is not None and len(test_examples):
        votes = knn_vote(embeddings, groups, test_embeddings, k)
        test_accuracy = float(np.mean([vote[0] == str(ex.reference) for vote, ex in zip(votes, test_examples)]))
    meta = {
        "tier": TIER,
        "task": task_name,
        "standin_for": "a mid-size (7B) model on vLLM (offline stand-in: k-NN over train-split embeddings)",
        "k": k,
        "answer_is_label": spec.labels() is not None,
        "encoder": "all-MiniLM-L6-v2 int8 ONNX (artifacts/encoder)",
        "n_index": len(examples),
        "n_test": len(test_examples),
        "test_accuracy": test_accuracy,
        "ids": [example.id for example in examples],
        "answers": answers,
        "groups": groups,
        "build_seconds": round(time.perf_counter() - started, 2),
        "build": settings,
    }
    weights_path, _ = tier_files(root, TIER, task_name)
    write_tensors_and_meta(weights_path, {"embeddings": embeddings.astype(np.float16)}, meta)
    return {key: value for key, value in meta.items() if key not in ("ids", "answers", "groups")}


class RetrievalTier:
    """Serves one task's k-NN index (float16 on disk, float32 in memory for the dot products)."""

    def __init__(self, root: Path, task_name: str) -> None:
        tensors, self.meta = read_tensors_and_meta(root, TIER, task_name)
        self.task = task_name
        self.embeddings = tensors["embeddings"].astype(np.float32)
        self.answers: list[str] = list(self.meta["answers"])
        self.groups: list[str] = list(self.meta["groups"])
        self.ids: list[str] = list(self.meta["ids"])
        self.k = int(self.meta.get("k", DEFAULT_K))
        # A label is one answer "token", as for the classifier; a response is cut into pieces.
        self.single_token = bool(self.meta.get("answer_is_label"))
        if not (len(self.answers) == len(self.groups) == len(self.ids) == self.embeddings.shape[0]):
            raise ValueError(f"{tier_files(root, TIER, task_name)[1]}: index sizes disagree; rebuild with --force")

    def answer(self, query: str, minilm: "MiniLM") -> TierAnswer:
        """One query -> the voted answer, every reported token carrying ``ln(vote share)``."""
        group, share, nearest = knn_vote(self.embeddings, self.groups, minilm.encode([query]), self.k)[0]
        text = self.answers[nearest]
        logprob = float(np.log(share))
        if self.single_token:
            tokens = [TokenLogprob.of_text(text, logprob)]
        else:
            tokens = uniform_pieces(minilm.pieces(text), logprob)
        return TierAnswer(text=text, tokens=tokens, prompt_tokens=minilm.count_tokens(query),
                          details={"tier": TIER, "task": self.task, "vote_share": share, "group": group,
                                   "neighbour_id": self.ids[nearest]})
