"""T4 ``replay``: OFFLINE STAND-IN for the frontier API tier (what coopt calls a "replay deployment").

No frontier model is reachable offline, so T4 returns the *recorded reference answer* of the task's
dataset for a query it knows: the query text is matched (whitespace normalised, case kept) against
the examples of both splits, and the gold answer (``TaskSpec.gold_answer``) is returned with logprob
0.0 per token (u = 0).  Its answers are therefore reference quality by construction: benchmarks that
use it measure the cascade machinery, not a frontier model, and must say so.  In real use the T4
deployment points at a remote model instead (``litellm_params.model: openai/<model>`` or similar).

A query that matches no example falls back to the T3 retrieval answer (with T3's vote-share
logprobs) and is marked ``system_fingerprint = "replay-miss"``; hits are marked ``"replay-hit"``.
If the same text occurs several times with different references, the first (train before test,
source order) wins; the number of such conflicts is kept in ``conflicts``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from routenlp_core.tasks import get_task
from routenlp_standins.answer import TierAnswer, TokenLogprob, uniform_pieces

if TYPE_CHECKING:
    from routenlp_standins.minilm import MiniLM
    from routenlp_standins.retrieval import RetrievalTier

TIER = "replay"
HIT = "replay-hit"
MISS = "replay-miss"


def normalise(text: str) -> str:
    """Whitespace-insensitive key: clients re-wrap or strip queries, they rarely change the words."""
    return " ".join(text.split())


class ReplayTier:
    """Recorded answers of one task; ``retrieval()`` supplies the fallback tier only when first needed."""

    def __init__(self, task_name: str, retrieval: Callable[[], "RetrievalTier"]) -> None:
        spec = get_task(task_name)
        self.task = task_name
        self.answer_is_label = spec.labels() is not None
        self._retrieval = retrieval
        self.table: dict[str, tuple[str, str]] = {}
        self.conflicts = 0
        for split in ("train", "test"):
            for example in spec.load(split):
                key = normalise(example.text)
                gold = spec.gold_answer(example.reference)
                if key in self.table:
                    self.conflicts += int(self.table[key][1] != gold)
                    continue
                self.table[key] = (example.id, gold)

    def lookup(self, query: str) -> tuple[str, str] | None:
        """``(example id, recorded answer)`` or None."""
        return self.table.get(normalise(query))

    def answer(self, query: str, minilm: "MiniLM") -> TierAnswer:
        """The recorded answer with certainty (logprob 0.0), or the retrieval fallback marked as a miss."""
        found = self.lookup(query)
        if found is None:
            fallback = self._retrieval().answer(query, minilm)
            fallback.system_fingerprint = MISS
            fallback.details = {**fallback.details, "tier": TIER, "replay": "miss", "fallback": "retrieval"}
            return fallback
        example_id, text = found
        if self.answer_is_label:
            tokens = [TokenLogprob.of_text(text, 0.0)]
        else:
            tokens = uniform_pieces(minilm.pieces(text), 0.0)
        return TierAnswer(text=text, tokens=tokens, prompt_tokens=minilm.count_tokens(query), system_fingerprint=HIT,
                          details={"tier": TIER, "task": self.task, "replay": "hit", "example_id": example_id})
