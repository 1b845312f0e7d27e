"""The RouteNLP task datasets and their per-query quality rule, read in place from the shared data.

Each task is a ``TaskSpec``: how to load its examples, how to score one model answer, and the
paper's quality threshold ``tau``.  ``TASKS`` is the registry; ``get_task(name)`` looks one up.

Per-query acceptability
-----------------------
The paper's tau values are corpus-level targets ("intent accuracy 0.92").  Routing, calibration
and distillation need a per-query yes/no, so a corpus target becomes a per-query rule:

- metrics that are 0/1 per query (``accuracy``: one label, right or wrong): a query is acceptable
  iff it is correct (score 1.0).  tau then is the fraction of acceptable queries the system must
  reach, not a per-query cut-off (any cut-off in (0, 1] would give the same rule).
- continuous per-query metrics (``rouge_l``, ``bertscore_f1``, per-sentence ``entity_f1``,
  per-clause ``clause_f1``): acceptable iff score >= tau.

Splits
------
``load(split)`` takes ``"train"`` or ``"test"``.  banking77 and fin_ner use their official
train/test files; clinc150 uses ``train`` + ``oos_train`` and ``test`` + ``oos_test`` (out-of-scope
queries carry the label ``oos``; the official ``val`` split is not used).  The other datasets ship
one set of rows (bitext has no official split; ectsum, cuad_clauses and unfair_tos are the source's
test sets; financial_phrasebank is one file), so they are split 80/20 by a hash of the row index:
row ``i`` is in ``test`` iff ``int(sha256(f"{task}:{i}")[:16], 16) % 100 < 20``.  The split does not
depend on the order rows are read in or on anything but the row index, so it is stable.
ectsum's "train" is therefore 80% of the ECTSum *test* set, never the official ECTSum train set.

Example ids are ``f"{task}-{split}-{row_index}"`` where ``row_index`` is the 0-based row in the
source (banking77: data row of train.csv/test.csv; clinc150: index in ``train + oos_train`` or
``test + oos_test``; bitext/cuad/unfair_tos/financial_phrasebank: data row of the one file;
ectsum: line across part0, part1, part2; fin_ner: sentence number in the CoNLL file).
``load(split, limit, seed)`` returns a seeded uniform sample of ``limit`` examples, in source order.

References per task
-------------------
- banking77, clinc150, unfair_tos, financial_phrasebank: the gold label string.
- cuad_clauses: list of gold clause types (CUAD category names, e.g. ``"Anti-Assignment"``).
- fin_ner: ``{"tokens": [...], "tags": [...]}`` (IOB1 tags, one per token; ``text`` is the tokens
  joined by single spaces).  Answers are parsed by ``routenlp_core.metrics.parse_entities``.
- bitext, ectsum: the reference text.
``TaskSpec.gold_answer(reference)`` renders a reference as the answer a perfect model would give.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

from routenlp_core import metrics
from routenlp_core.paths import data_dir

SPLITS = ("train", "test")
HASH_TEST_PERCENT = 20
BINARY_METRICS = frozenset({"accuracy"})
PHRASEBANK_FILE = "Sentences_75Agree.txt"


class TaskDataError(ValueError):
    """A dataset file is missing or malformed; the message names the file, line and field."""


class UnknownTaskError(KeyError):
    """``get_task`` was asked for a task that is not registered."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


@dataclass(frozen=True)
class TaskExample:
    """One query of a task: what the user sends (``text``) and what a good answer matches."""

    id: str
    task: str
    text: str
    reference: Any


@dataclass(frozen=True)
class TaskSpec:
    """A task: its data, answer format, per-query metric and the paper's threshold ``tau``."""

    name: str
    kind: str
    metric: str
    tau: float
    description: str
    answer_format: str
    _rows: Callable[[str], tuple[TaskExample, ...]] = field(repr=False, compare=False)
    _score: Callable[[str, Any], float] = field(repr=False, compare=False)
    _labels: Callable[[], tuple[str, ...]] | None = field(default=None, repr=False, compare=False)
    _gold_answer: Callable[[Any], str] = field(default=str, repr=False, compare=False)
    _score_batch: Callable[[Sequence[str], Sequence[Any]], list[float]] | None = field(
        default=None, repr=False, compare=False)

    @property
    def binary_metric(self) -> bool:
        """True when the per-query score is 0/1, so acceptable means correct."""
        return self.metric in BINARY_METRICS

    def labels(self) -> list[str] | None:
        """Sorted label set for classification tasks; None for generation and NER."""
        return list(self._labels()) if self._labels else None

    def system_prompt(self) -> str:
        """Instruction a model gets with each query: the answer format and, if any, the labels."""
        labels = self.labels()
        if labels is None:
            return self.answer_format
        return f"{self.answer_format}\nLabels: {', '.join(labels)}"

    def load(self, split: str, limit: int | None = None, seed: int = 0) -> list[TaskExample]:
        """Examples of ``split``; with ``limit``, a seeded sample of that many (source order kept)."""
        if split not in SPLITS:
            raise ValueError(f"task {self.name}: split must be one of {SPLITS}, got {split!r}")
        rows = self._rows(split)
        if limit is None or limit >= len(rows):
            return list(rows)
        if limit <= 0:
            raise ValueError(f"task {self.name}: limit must be a positive integer or None, got {limit!r}")
        chosen = sorted(random.Random(seed).sample(range(len(rows)), limit))
        return [rows[index] for index in chosen]

    def score(self, prediction: str, reference: Any) -> float:
        """Per-query quality of ``prediction`` in [0, 1] under this task's metric."""
        return float(self._score(prediction, reference))

    def score_batch(self, predictions: Sequence[str], references: Sequence[Any]) -> list[float]:
        """``score`` for many answers at once (batched for BERTScore, a loop otherwise)."""
        if len(predictions) != len(references):
            raise ValueError(f"task {self.name}: {len(predictions)} predictions but {len(references)} references")
        if self._score_batch is not None:
            return [float(value) for value in self._score_batch(predictions, references)]
        return [self.score(prediction, reference) for prediction, reference in zip(predictions, references)]

    def acceptable_score(self, score: float) -> bool:
        """The per-query rule (module docstring): correct for 0/1 metrics, else score >= tau."""
        return score >= 1.0 if self.binary_metric else score >= self.tau

    def acceptable(self, prediction: str, reference: Any) -> bool:
        """Whether ``prediction`` is good enough for this query (see ``acceptable_score``)."""
        return self.acceptable_score(self.score(prediction, reference))

    def gold_answer(self, reference: Any) -> str:
        """The answer a perfect model would give, in this task's answer format."""
        return self._gold_answer(reference)


# ------------------------------------------------------------------------------------------------
# Shared helpers
# ------------------------------------------------------------------------------------------------

def _in_hash_test(task: str, row_index: int) -> bool:
    """Deterministic 80/20 split by row index (see module docstring)."""
    digest = hashlib.sha256(f"{task}:{row_index}".encode("utf-8")).hexdigest()
    return int(digest[:16], 16) % 100 < HASH_TEST_PERCENT


def _hash_split(task: str, split: str, rows: Sequence[tuple[str, Any]]) -> tuple[TaskExample, ...]:
    """Examples of ``split`` from one unsplit list of ``(text, reference)`` rows."""
    want_test = split == "test"
    return tuple(TaskExample(id=f"{task}-{split}-{index}", task=task, text=text, reference=reference)
                 for index, (text, reference) in enumerate(rows)
                 if _in_hash_test(task, index) == want_test)


def _file(*parts: str) -> Path:
    path = data_dir().joinpath(*parts)
    if not path.is_file():
        raise TaskDataError(f"{path}: dataset file not found (set ROUTENLP_DATA_DIR to the shared data folder)")
    return path


def _read_table(path: Path, columns: Sequence[str], delimiter: str = ",") -> list[tuple[int, dict[str, str]]]:
    """Rows of a CSV/TSV as ``(line_number, row)``; every listed column must be present and non-empty."""
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter, quoting=quoting)
        missing = [column for column in columns if column not in (reader.fieldnames or [])]
        if missing:
            raise TaskDataError(f"{path}: header lacks column(s) {missing}; found {reader.fieldnames}")
        out = []
        for row in reader:
            for column in columns:
                if not (row.get(column) or "").strip():
                    raise TaskDataError(f"{path}:{reader.line_num}: empty field {column!r}")
            out.append((reader.line_num, row))
    return out


def _check_label(path: Path, line: int, label: str, known: Sequence[str]) -> str:
    if label not in known:
        raise TaskDataError(f"{path}:{line}: label {label!r} is not in the task's label set")
    return label


# ------------------------------------------------------------------------------------------------
# banking77
# ------------------------------------------------------------------------------------------------

@lru_cache(maxsize=4)
def _banking77_labels_at(root: str) -> tuple[str, ...]:
    path = _file("banking77", "categories.json")
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise TaskDataError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from error
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise TaskDataError(f"{path}: expected a JSON list of label strings")
    return tuple(sorted(labels))


@lru_cache(maxsize=8)
def _banking77_rows_at(root: str, split: str) -> tuple[TaskExample, ...]:
    labels = _banking77_labels_at(root)
    path = _file("banking77", f"{split}.csv")
    return tuple(
        TaskExample(id=f"banking77-{split}-{index}", task="banking77", text=row["text"].strip(),
                    reference=_check_label(path, line, row["category"].strip(), labels))
        for index, (line, row) in enumerate(_read_table(path, ("text", "category"))))


# ------------------------------------------------------------------------------------------------
# clinc150
# ------------------------------------------------------------------------------------------------

@lru_cache(maxsize=2)
def _clinc150_json_at(root: str) -> dict[str, list]:
    path = _file("clinc150", "data_full.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise TaskDataError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from error
    for key in ("train", "test", "oos_train", "oos_test"):
        rows = data.get(key)
        if not isinstance(rows, list):
            raise TaskDataError(f"{path}: missing list {key!r}")
        for position, pair in enumerate(rows):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, str) and v.strip() for v in pair)):
                raise TaskDataError(f"{path}: {key}[{position}] is not a [text, intent] pair of non-empty strings")
    return data


def _clinc150_labels_for(root: str) -> tuple[str, ...]:
    data = _clinc150_json_at(root)
    return tuple(sorted({intent for _, intent in data["train"]} | {"oos"}))


@lru_cache(maxsize=8)
def _clinc150_rows_at(root: str, split: str) -> tuple[TaskExample, ...]:
    data = _clinc150_json_at(root)
    labels = set(_clinc150_labels_for(root))
    pairs = data[split] + data[f"oos_{split}"]
    for position, (_, intent) in enumerate(pairs):
        if intent not in labels:
            raise TaskDataError(f"{data_dir() / 'clinc150' / 'data_full.json'}: {split} row {position}: "
                                f"intent {intent!r} never occurs in train")
    return tuple(TaskExample(id=f"clinc150-{split}-{index}", task="clinc150", text=text.strip(), reference=intent)
                 for index, (text, intent) in enumerate(pairs))


# ------------------------------------------------------------------------------------------------
# bitext (customer-support response generation)
# ------------------------------------------------------------------------------------------------

@lru_cache(maxsize=2)
def _bitext_all_at(root: str) -> tuple[tuple[str, str], ...]:
    path = _file("bitext_customer_support", "bitext_customer_support_4514.csv")
    return tuple((row["instruction"].strip(), row["response"].strip())
                 for _, row in _read_table(path, ("instruction", "response")))


@lru_cache(maxsize=8)
def _bitext_rows_at(root: str, split: str) -> tuple[TaskExample, ...]:
    return _hash_split("bitext", split, _bitext_all_at(root))


# ------------------------------------------------------------------------------------------------
# fin_ner (SEC filings, CoNLL IOB1)
# ------------------------------------------------------------------------------------------------

_FIN_NER_FILES = {"train": "FIN5_train.conll", "test": "FIN3_test.conll"}
FIN_NER_TAGS = ("I-LOC", "I-MISC", "I-ORG", "I-PER", "B-LOC", "B-MISC", "B-ORG", "B-PER", "O")


def _read_conll(path: Path) -> list[tuple[list[str], list[str]]]:
    """Sentences of a 4-column CoNLL file (token POS chunk NER) as ``(tokens, tags)``."""
    sentences: list[tuple[list[str], list[str]]] = []
    tokens: list[str] = []
    tags: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                if tokens:
                    sentences.append((tokens, tags))
                tokens, tags = [], []
                continue
            if fields[0] == "-DOCSTART-":
                continue
            if len(fields) != 4:
                raise TaskDataError(f"{path}:{line_number}: expected 4 columns (token POS chunk NER), got {len(fields)}")
            if fields[3] not in FIN_NER_TAGS:
                raise TaskDataError(f"{path}:{line_number}: unknown NER tag {fields[3]!r}")
            tokens.append(fields[0])
            tags.append(fields[3])
    if tokens:
        sentences.append((tokens, tags))
    return sentences


@lru_cache(maxsize=8)
def _fin_ner_rows_at(root: str, split: str) -> tuple[TaskExample, ...]:
    path = _file("fin_ner", _FIN_NER_FILES[split])
    return tuple(TaskExample(id=f"fin_ner-{split}-{index}", task="fin_ner", text=" ".join(tokens),
                             reference={"tokens": tokens, "tags": tags})
                 for index, (tokens, tags) in enumerate(_read_conll(path)))


def _ner_score(prediction: str, reference: Any) -> float:
    tokens, tags = _ner_reference(reference)
    return metrics.ner_entity_f1(prediction, tokens, tags)


def _ner_gold(reference: Any) -> str:
    tokens, tags = _ner_reference(reference)
    return metrics.format_entities(tokens, tags)


def _ner_reference(reference: Any) -> tuple[list[str], list[str]]:
    if not (isinstance(reference, dict) and isinstance(reference.get("tokens"), list)
            and isinstance(reference.get("tags"), list) and len(reference["tokens"]) == len(reference["tags"])):
        raise ValueError("fin_ner reference must be {'tokens': [...], 'tags': [...]} of equal length")
    return reference["tokens"], reference["tags"]


# ------------------------------------------------------------------------------------------------
# ectsum (earnings-call summarisation)
# ------------------------------------------------------------------------------------------------

_ECTSUM_PARTS = ("ectsum_test_part0.jsonl", "ectsum_test_part1.jsonl", "ectsum_test_part2.jsonl")


@lru_cache(maxsize=2)
def _ectsum_all_at(root: str) -> tuple[tuple[str, str], ...]:
    rows: list[tuple[str, str]] = []
    for part in _ECTSUM_PARTS:
        path = _file("ectsum", part)
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise TaskDataError(f"{path}:{line_number}: not valid JSON ({error.msg})") from error
                for key in ("transcript", "summary"):
                    if not isinstance(record.get(key), str) or not record[key].strip():
                        raise TaskDataError(f"{path}:{line_number}: missing or empty field {key!r}")
                rows.append((record["transcript"].strip(), record["summary"].strip()))
    return tuple(rows)


@lru_cache(maxsize=8)
def _ectsum_rows_at(root: str, split: str) -> tuple[TaskExample, ...]:
    return _hash_split("ectsum", split, _ectsum_all_at(root))


# ------------------------------------------------------------------------------------------------
# cuad_clauses (multi-label clause typing)
# ------------------------------------------------------------------------------------------------

@lru_cache(maxsize=2)
def _cuad_labels_at(root: str) -> tuple[str, ...]:
    folder = data_dir() / "cuad_clauses" / "binary_tasks"
    if not folder.is_dir():
        raise TaskDataError(f"{folder}: folder of CUAD binary tasks not found")
    labels = sorted({path.name.split("__")[0] for path in folder.glob("*__test.tsv")})
    if not labels:
        raise TaskDataError(f"{folder}: no <Category>__test.tsv files")
    return tuple(labels)


@lru_cache(maxsize=2)
def _cuad_all_at(root: str) -> tuple[tuple[str, list[str]], ...]:
    labels = _cuad_labels_at(root)
    path = _file("cuad_clauses", "cuad_clause_types_multilabel.tsv")
    rows = []
    for line, row in _read_table(path, ("text", "clause_types"), delimiter="\t"):
        types = [_check_label(path, line, label.strip(), labels) for label in row["clause_types"].split("|")]
        rows.append((row["text"].strip(), sorted(set(types))))
    return tuple(rows)


@lru_cache(maxsize=8)
def _cuad_rows_at(root: str, split: str) -> tuple[TaskExample, ...]:
    return _hash_split("cuad_clauses", split, _cuad_all_at(root))


def _cuad_score(prediction: str, reference: Any) -> float:
    if not isinstance(reference, (list, tuple)):
        raise ValueError("cuad_clauses reference must be a list of clause types")
    return metrics.clause_set_f1(prediction, reference)


# ------------------------------------------------------------------------------------------------
# unfair_tos and financial_phrasebank (single-label, one file each)
# ------------------------------------------------------------------------------------------------

@lru_cache(maxsize=2)
def _unfair_all_at(root: str) -> tuple[tuple[str, str], ...]:
    path = _file("unfair_tos", "unfair_tos.tsv")
    return tuple((row["text"].strip(), row["label"].strip())
                 for _, row in _read_table(path, ("text", "label"), delimiter="\t"))


@lru_cache(maxsize=8)
def _unfair_rows_at(root: str, split: str) -> tuple[TaskExample, ...]:
    return _hash_split("unfair_tos", split, _unfair_all_at(root))


PHRASEBANK_LABELS = ("negative", "neutral", "positive")


@lru_cache(maxsize=2)
def _phrasebank_all_at(root: str) -> tuple[tuple[str, str], ...]:
    path = _file("financial_phrasebank", PHRASEBANK_FILE)
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            sentence, separator, label = line.rstrip("\r\n").rpartition("@")
            if not separator or not sentence.strip():
                raise TaskDataError(f"{path}:{line_number}: expected '<sentence>@<label>'")
            rows.append((sentence.strip(), _check_label(path, line_number, label.strip(), PHRASEBANK_LABELS)))
    return tuple(rows)


@lru_cache(maxsize=8)
def _phrasebank_rows_at(root: str, split: str) -> tuple[TaskExample, ...]:
    return _hash_split("financial_phrasebank", split, _phrasebank_all_at(root))


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------

def _at_data_dir(loader: Callable[..., Any]) -> Callable[..., Any]:
    """Bind a cached loader to the data folder current at call time (ROUTENLP_DATA_DIR may change)."""
    return lambda *args: loader(str(data_dir()), *args)


def _labels_from_rows(all_rows: Callable[[str], tuple[tuple[str, Any], ...]]) -> Callable[[], tuple[str, ...]]:
    return lambda: tuple(sorted({label for _, label in all_rows(str(data_dir()))}))


_ONE_LABEL = "Answer with exactly one label from the list below and nothing else."

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec(
        name="banking77", kind="structured", metric="accuracy", tau=0.92,
        description="Online-banking customer intent, 77 classes (BANKING77, Casanueva et al. 2020).",
        answer_format=f"Classify the banking customer's intent. {_ONE_LABEL}",
        _rows=_at_data_dir(_banking77_rows_at), _score=metrics.label_accuracy,
        _labels=_at_data_dir(_banking77_labels_at)),
    TaskSpec(
        name="clinc150", kind="structured", metric="accuracy", tau=0.92,
        description="Assistant intent, 150 in-scope classes plus 'oos' for out-of-scope queries (CLINC150).",
        answer_format=f"Classify the user's intent; answer oos if none applies. {_ONE_LABEL}",
        _rows=_at_data_dir(_clinc150_rows_at), _score=metrics.label_accuracy,
        _labels=_at_data_dir(_clinc150_labels_for)),
    TaskSpec(
        name="bitext", kind="generation", metric="bertscore_f1", tau=0.65,
        description="Customer-support response generation scored against the reference response "
                    "(Bitext sample, 4,514 pairs; hash 80/20 split).",
        answer_format="You are a customer-support assistant. Reply helpfully to the customer's message. "
                      "Use {{Placeholder}} slots for order numbers, URLs and similar account details.",
        _rows=_at_data_dir(_bitext_rows_at),
        _score=lambda prediction, reference: metrics.bertscore_f1([prediction], [reference])[0],
        _score_batch=metrics.bertscore_f1),
    TaskSpec(
        name="fin_ner", kind="structured", metric="entity_f1", tau=0.90,
        description="Named entities (PER, ORG, LOC, MISC) in SEC loan filings (Alvarado et al. 2015); "
                    "per-sentence exact-span entity F1.",
        answer_format='List the named entities in the sentence as a JSON list of objects '
                      '[{"type": "PER|ORG|LOC|MISC", "text": "<exact words from the sentence>"}]; '
                      'answer [] if there are none.',
        _rows=_at_data_dir(_fin_ner_rows_at), _score=_ner_score, _gold_answer=_ner_gold),
    TaskSpec(
        name="ectsum", kind="generation", metric="rouge_l", tau=0.42,
        description="Earnings-call transcript to bullet-point summary (ECTSum test set, hash 80/20 split); "
                    "ROUGE-L F.",
        answer_format="Summarise the key financial results of this earnings call in a few short bullet "
                      "points, one per line, keeping the figures verbatim.",
        _rows=_at_data_dir(_ectsum_rows_at), _score=metrics.rouge_l),
    TaskSpec(
        name="cuad_clauses", kind="structured", metric="clause_f1", tau=0.88,
        description="Contract clause typing into 38 CUAD categories, multi-label (CUAD via LegalBench; "
                    "hash 80/20 split); per-clause F1 of the label sets.",
        answer_format="Name every category the contract clause belongs to, separated by commas, using the "
                      "label names below exactly.",
        _rows=_at_data_dir(_cuad_rows_at), _score=_cuad_score, _labels=_at_data_dir(_cuad_labels_at),
        _gold_answer=lambda reference: ", ".join(reference)),
    TaskSpec(
        name="unfair_tos", kind="structured", metric="accuracy", tau=0.82,
        description="Terms-of-service clause risk: 8 potentially unfair clause types or 'Other' "
                    "(CLAUDETTE via LegalBench; hash 80/20 split).",
        answer_format=f"Classify the terms-of-service clause; answer Other if it is not potentially unfair. "
                      f"{_ONE_LABEL}",
        _rows=_at_data_dir(_unfair_rows_at), _score=metrics.label_accuracy,
        _labels=_labels_from_rows(_unfair_all_at)),
    # tau 0.90: the paper gives no threshold for this extra task; 0.90 sits in the band it uses for
    # its structured tasks (0.82-0.92).  The 75%-agreement subset is used so that the gold label is
    # itself reliable at about that level (at least 3 of 4 annotators agree on every sentence).
    TaskSpec(
        name="financial_phrasebank", kind="structured", metric="accuracy", tau=0.90,
        description="Financial-news sentence sentiment, positive/negative/neutral (Financial PhraseBank "
                    "v1.0, 75%-agreement subset, 3,453 sentences; hash 80/20 split). Non-commercial licence.",
        answer_format=f"Classify the sentiment of the financial news sentence for an investor. {_ONE_LABEL}",
        _rows=_at_data_dir(_phrasebank_rows_at), _score=metrics.label_accuracy,
        _labels=lambda: PHRASEBANK_LABELS),
)}


def get_task(name: str) -> TaskSpec:
    """The registered task ``name``; an unknown name raises ``UnknownTaskError`` listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None
