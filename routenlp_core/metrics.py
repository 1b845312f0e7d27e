"""Per-query quality metrics for the RouteNLP tasks.

Every function scores ONE model answer against ONE reference and returns a float in [0, 1]; the
all-pairs table, calibration and co-optimisation all need a per-query quality, not a corpus score.
Model answers are free text, so each metric first parses the answer in a documented, forgiving
way (a wrong or unparseable answer scores low; it never raises).

- ``label_accuracy``: 1.0 iff the normalised answer equals the normalised gold label
  (case, surrounding quotes/backticks/asterisks, a trailing full stop, ``_``/``-`` versus spaces
  and repeated whitespace are ignored).
- ``clause_set_f1``: F1 between the predicted and the gold label SETS (multi-label typing).
- ``ner_entity_f1``: seqeval-style exact-span entity F1 of one sentence (see ``parse_entities``).
- ``rouge_l``: ROUGE-L F-measure from ``rouge-score`` (Porter stemmer on).
- ``bertscore_f1``: BERTScore F1 with all-MiniLM-L6-v2, layer 6, no idf, no baseline rescale.
  This re-implements bert-score 0.3.13's greedy cosine matching (same tokenisation and
  truncation; [CLS]/[SEP] weigh 0 in the averages but, as in bert-score, stay matchable; an empty
  candidate scores 0), so no extra package is needed.  Checked against bert-score 0.3.13's
  ``BERTScorer(model_type=<MiniLM path>, num_layers=6)``: identical (to 1e-8) for a pair scored
  alone; on 43 bitext pairs scored together the largest gap was 4e-4, which is bert-score's own
  dependence on how short texts are padded within its batches (ours does not depend on batching).

torch/transformers are imported lazily, only by ``bertscore_f1``: this module is offline-side
(``coopt``), never imported by the proxy package.
"""

from __future__ import annotations

import json
import re
import threading
from functools import lru_cache
from typing import Any, Callable, Iterable, Sequence

# --------------------------------------------------------------------------------------------
# Labels (intent, sentiment, unfair-clause class)
# --------------------------------------------------------------------------------------------

_WRAPPERS = "\"'`*"


def normalise_label(text: str) -> str:
    """Canonical form of a class label, so "Card Arrival." matches the gold ``card_arrival``."""
    value = text.strip().strip(_WRAPPERS).strip()
    value = value.rstrip(".").strip().strip(_WRAPPERS)
    value = value.lower().replace("_", " ").replace("-", " ")
    return " ".join(value.split())


def label_accuracy(prediction: str, reference: str) -> float:
    """1.0 if the answer names the gold label (after ``normalise_label``), else 0.0."""
    return 1.0 if normalise_label(prediction) == normalise_label(reference) else 0.0


# --------------------------------------------------------------------------------------------
# Multi-label clause typing
# --------------------------------------------------------------------------------------------

_LIST_SEPARATORS = re.compile(r"[,\n;|]+")
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s*")


def label_key(text: str) -> str:
    """Matching key for a clause type: lower case, letters and digits only.

    "Anti-Assignment", "anti assignment" and "Anti_Assignment" all map to "antiassignment".
    """
    return re.sub(r"[^0-9a-z]", "", text.lower())


def parse_label_list(prediction: str) -> set[str]:
    """The set of label keys named in an answer separated by commas, semicolons, "|" or newlines.

    Leading list bullets ("- ", "1. ") are dropped; "none" / empty answers give the empty set.
    """
    keys: set[str] = set()
    for part in _LIST_SEPARATORS.split(prediction):
        key = label_key(_BULLET.sub("", part))
        if key and key != "none":
            keys.add(key)
    return keys


def set_f1(predicted: set[str], gold: set[str]) -> float:
    """F1 of two sets; two empty sets agree perfectly (1.0)."""
    if not predicted and not gold:
        return 1.0
    true_pos = len(predicted & gold)
    return 2.0 * true_pos / (len(predicted) + len(gold))


def clause_set_f1(prediction: str, reference: Sequence[str]) -> float:
    """F1 between the clause types named in ``prediction`` and the gold list ``reference``."""
    return set_f1(parse_label_list(prediction), {label_key(label) for label in reference})


# --------------------------------------------------------------------------------------------
# Named entities (IOB1, types PER/ORG/LOC/MISC)
# --------------------------------------------------------------------------------------------

NER_TYPE_ALIASES = {
    "PERSON": "PER", "PEOPLE": "PER",
    "ORGANIZATION": "ORG", "ORGANISATION": "ORG", "COMPANY": "ORG",
    "LOCATION": "LOC", "PLACE": "LOC", "GPE": "LOC",
    "MISCELLANEOUS": "MISC", "OTHER": "MISC",
}
_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")
_ENTITY_LINE = re.compile(r"^\s*(?:[-*\u2022]\s*)?([A-Za-z_]+)\s*[:=\t]\s*(.+?)\s*$")


def _canonical_type(raw: str) -> str:
    upper = raw.strip().upper()
    return NER_TYPE_ALIASES.get(upper, upper)


def parse_entities(prediction: str) -> list[tuple[str, str]]:
    """Entities claimed by a model answer, as unique ``(TYPE, surface)`` pairs in answer order.

    Accepted answer formats (the instruction asks for the first):
    - a JSON list of objects ``[{"type": "ORG", "text": "Evergreen Solar Inc"}, ...]``
      (also ``[["ORG", "Evergreen Solar Inc"], ...]``), optionally inside a ``` code fence;
    - one entity per line, ``TYPE: surface`` (a leading "- " bullet is allowed).
    Types are upper-cased and common aliases (PERSON, ORGANIZATION, LOCATION, ...) mapped to
    PER/ORG/LOC/MISC.  "[]", "none" or an empty answer claim no entity.  Lines in any other
    shape are ignored (chatter is not an entity claim).
    """
    text = _FENCE.sub("", prediction.strip()).strip()
    pairs: list[tuple[str, str]] = []
    parsed_json = False
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            items = None
        if isinstance(items, list):
            parsed_json = True
            for item in items:
                if isinstance(item, dict):
                    kind = item.get("type", item.get("label", item.get("entity_type")))
                    surface = item.get("text", item.get("surface", item.get("entity")))
                elif isinstance(item, (list, tuple)) and len(item) == 2:
                    kind, surface = item
                else:
                    continue
                if isinstance(kind, str) and isinstance(surface, str) and surface.strip():
                    pairs.append((_canonical_type(kind), " ".join(surface.split())))
    if not parsed_json:
        for line in text.splitlines():
            match = _ENTITY_LINE.match(line)
            if match:
                pairs.append((_canonical_type(match.group(1)), " ".join(match.group(2).split())))
    return list(dict.fromkeys(pairs))


def _token_runs(tokens: Sequence[str], surface: str, fold: Callable[[str], str]) -> list[tuple[int, int]]:
    """``(first, last)`` token runs that spell ``surface`` with whitespace removed, after ``fold``."""
    needle = "".join(fold(surface).split())
    starts: dict[int, int] = {}
    ends: dict[int, int] = {}
    pieces: list[str] = []
    offset = 0
    for index, token in enumerate(tokens):
        piece = "".join(fold(token).split())  # folded per token, so offsets stay token-aligned
        starts[offset] = index
        offset += len(piece)
        ends[offset] = index
        pieces.append(piece)
    haystack = "".join(pieces)
    runs = []
    position = haystack.find(needle) if needle else -1
    while position >= 0:
        first, last = starts.get(position), ends.get(position + len(needle))
        if first is not None and last is not None and last >= first:
            runs.append((first, last))
        position = haystack.find(needle, position + 1)
    return runs


def entities_to_iob1(tokens: Sequence[str], entities: Iterable[tuple[str, str]]) -> tuple[list[str], int]:
    """Project claimed ``(TYPE, surface)`` entities onto the sentence tokens as IOB1 tags.

    A surface matches a run of whole tokens that spells it with whitespace ignored (so "Inc."
    matches the tokens "Inc" "."), case-sensitively; only a surface with no case-sensitive match
    falls back to a case-insensitive one (headings repeat names in capitals, and the model must
    list those mentions itself).  Every still-untagged occurrence is tagged, longest surfaces
    first.  IOB1 uses ``I-`` everywhere except ``B-`` for an entity that directly follows another
    of the same type.  Returns ``(tags, unmatched)``: ``unmatched`` counts claimed entities that
    occur nowhere in the sentence; they are false positives the tags cannot show.  A claim whose
    occurrences were all taken by other claims is redundant, not hallucinated, and is not counted.
    """
    tags = ["O"] * len(tokens)
    entity_ids = [-1] * len(tokens)
    unmatched = 0
    ordered = sorted(dict.fromkeys(entities), key=lambda pair: -len("".join(pair[1].split())))
    for entity_number, (kind, surface) in enumerate(ordered):
        runs = _token_runs(tokens, surface, str) or _token_runs(tokens, surface, str.lower)
        if not runs:
            unmatched += 1
        for first, last in runs:
            if all(tag == "O" for tag in tags[first:last + 1]):
                for index in range(first, last + 1):
                    tags[index] = f"I-{kind}"
                    entity_ids[index] = entity_number
    for index in range(1, len(tokens)):
        if (tags[index] != "O" and tags[index] == tags[index - 1]
                and entity_ids[index] != entity_ids[index - 1]):
            tags[index] = "B-" + tags[index][2:]
    return tags, unmatched


def tag_entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Entity spans ``(type, first, last)`` of an IOB1/IOB2 tag sequence, as seqeval reads them."""
    from seqeval.metrics.sequence_labeling import get_entities

    return set(get_entities(list(tags)))


def entity_f1_from_tags(pred_tags: Sequence[str], gold_tags: Sequence[str],
                        extra_false_positives: int = 0) -> float:
    """Exact-span entity F1 of one sentence (seqeval's definition, per sentence).

    No gold and no predicted entity is a perfect answer (1.0), not an undefined 0/0.
    """
    if len(pred_tags) != len(gold_tags):
        raise ValueError(f"tag sequences differ in length: {len(pred_tags)} predicted vs {len(gold_tags)} gold")
    gold = tag_entities(gold_tags)
    pred = tag_entities(pred_tags)
    true_pos = len(gold & pred)
    false_pos = len(pred - gold) + extra_false_positives
    false_neg = len(gold - pred)
    if true_pos + false_pos + false_neg == 0:
        return 1.0
    return 2.0 * true_pos / (2.0 * true_pos + false_pos + false_neg)


def ner_entity_f1(prediction: str, tokens: Sequence[str], gold_tags: Sequence[str]) -> float:
    """Entity F1 of a model answer (see ``parse_entities``) for one tokenised sentence."""
    pred_tags, unmatched = entities_to_iob1(tokens, parse_entities(prediction))
    return entity_f1_from_tags(pred_tags, gold_tags, extra_false_positives=unmatched)


def format_entities(tokens: Sequence[str], tags: Sequence[str]) -> str:
    """The canonical answer for a sentence: JSON list of ``{"type", "text"}`` in sentence order."""
    spans = sorted(tag_entities(tags), key=lambda span: span[1])
    items = [{"type": kind, "text": " ".join(tokens[first:last + 1])} for kind, first, last in spans]
    return json.dumps(list({json.dumps(item): item for item in items}.values()))


# --------------------------------------------------------------------------------------------
# ROUGE-L
# --------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _rouge_scorer():  # noqa: ANN202 - rouge_score has no type hints
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence over the whole text, stemmed)."""
    return float(_rouge_scorer().score(reference, candidate)["rougeL"].fmeasure)


# --------------------------------------------------------------------------------------------
# BERTScore (all-MiniLM-L6-v2, layer 6, idf off, no rescale)
# --------------------------------------------------------------------------------------------

BERTSCORE_LAYER = 6
BERTSCORE_BATCH_SIZE = 32
_bertscore_lock = threading.Lock()
_bertscore_model: dict[str, Any] = {}


def _bertscore_backbone() -> tuple[Any, Any, int]:
    """Tokenizer, model and max input length, loaded once per process (a load takes seconds)."""
    with _bertscore_lock:
        if not _bertscore_model:
            import torch  # noqa: F401 - fail early and clearly if torch is missing
            from transformers import AutoModel, AutoTokenizer

            from routenlp_core.paths import minilm_model_path

            path = str(minilm_model_path())
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModel.from_pretrained(path)
            model.eval()
            if model.config.num_hidden_layers < BERTSCORE_LAYER:
                raise RuntimeError(f"{path}: {model.config.num_hidden_layers} layers, BERTScore needs layer "
                                   f"{BERTSCORE_LAYER}")
            max_length = min(int(tokenizer.model_max_length), int(model.config.max_position_embeddings))
            _bertscore_model.update(tokenizer=tokenizer, model=model, max_length=max_length)
        return _bertscore_model["tokenizer"], _bertscore_model["model"], _bertscore_model["max_length"]


def _token_embeddings(texts: Sequence[str]) -> dict[str, tuple[Any, Any]]:
    """Per distinct text: L2-normalised layer-6 embeddings of its tokens (padding removed) and a
    boolean mask of the tokens that count in the averages (all but [CLS]/[SEP])."""
    import torch

    tokenizer, model, max_length = _bertscore_backbone()
    special = {tokenizer.cls_token_id, tokenizer.sep_token_id}
    unique = sorted(set(texts), key=len, reverse=True)  # similar lengths per batch: less padding
    out: dict[str, tuple[Any, Any]] = {}
    with torch.inference_mode():
        for begin in range(0, len(unique), BERTSCORE_BATCH_SIZE):
            batch = unique[begin:begin + BERTSCORE_BATCH_SIZE]
            encoded = tokenizer([text.strip() for text in batch], padding=True, truncation=True,
                                max_length=max_length, return_tensors="pt")
            hidden = model(**encoded, output_hidden_states=True).hidden_states[BERTSCORE_LAYER]
            hidden = torch.nn.functional.normalize(hidden, dim=-1)
            for row, text in enumerate(batch):
                present = encoded["attention_mask"][row].bool()
                ids = encoded["input_ids"][row][present]
                weighted = torch.ones_like(ids, dtype=torch.bool)
                for token_id in special:
                    weighted &= ids != token_id
                out[text] = (hidden[row][present].numpy(), weighted.numpy())
    return out


def bertscore_f1(candidates: Sequence[str], references: Sequence[str]) -> list[float]:
    """BERTScore F1 per (candidate, reference) pair, in [0, 1].

    Greedy matching: precision = mean over the candidate's word pieces of the best cosine with any
    reference token, recall the converse, F1 their harmonic mean.  An empty candidate or reference
    scores 0.0 (bert-score does the same for empty candidates).  Values are clipped to [0, 1] to absorb
    float rounding.
    """
    if len(candidates) != len(references):
        raise ValueError(f"bertscore_f1: {len(candidates)} candidates but {len(references)} references")
    if not candidates:
        return []
    embeddings = _token_embeddings(list(candidates) + list(references))
    scores: list[float] = []
    for candidate, reference in zip(candidates, references):
        (cand, cand_weighted), (ref, ref_weighted) = embeddings[candidate], embeddings[reference]
        if not cand_weighted.any() or not ref_weighted.any():
            scores.append(0.0)
            continue
        similarity = cand @ ref.T
        precision = float(similarity.max(axis=1)[cand_weighted].mean())
        recall = float(similarity.max(axis=0)[ref_weighted].mean())
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        scores.append(min(1.0, max(0.0, f1)))
    return scores
