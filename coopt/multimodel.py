"""Loaders that turn the real multi-model result sets into all-pairs records plus a portfolio.

Three public sets answer every query with several real LLMs (see each folder's PROVENANCE.md under
the shared data directory).  Each loader picks a few of those models as tiers T1..Tn, cheapest
first, and returns ``(records, portfolio)`` in the one all-pairs format of :mod:`routenlp_core.allpairs`,
so training, calibration and the benchmarks read them exactly like data a user labels themselves.

* :func:`load_cascades_9llm` - MedMCQA / TruthfulQA answered by 9 LLMs with real cost, latency and a
  log-probability confidence (Zellinger & Thomson 2025).  The only set with an uncertainty signal.
* :func:`load_routerbench` - RouterBench 0-shot ARC / MBPP / Winogrande: 0/1 scores and USD cost of
  11 LLMs.  No logprobs, no latency.
* :func:`load_routellm_evals` - RouteLLM's MMLU / GSM8K correctness of Mixtral-8x7B and GPT-4.  No
  costs in the files: priced here from published per-token rates and estimated token counts.

Every loader checks that the chosen models really are in cost order (mean cost over the loaded
queries), because "cheapest first" is the contract every later step relies on.
"""

from __future__ import annotations

import ast
import csv
import json
import math
from pathlib import Path
from typing import Iterable, Optional, Sequence

from routenlp_core.allpairs import AllPairsRecord, Portfolio, TaskSpec, TierResult, TierSpec
from routenlp_core.paths import data_dir as default_data_dir
from litellm_routenlp.uncertainty import token_uncertainty

csv.field_size_limit(1 << 30)  # RouterBench cells hold whole generations

Loaded = tuple[list[AllPairsRecord], Portfolio]


class MultiModelDataError(ValueError):
    """A source file does not have the expected shape; the message names file, line and field."""


def _tier_specs(models: Sequence[str]) -> tuple[TierSpec, ...]:
    return tuple(TierSpec(name=f"T{position + 1}", model=model) for position, model in enumerate(models))


def _check_cost_order(records: Sequence[AllPairsRecord], portfolio: Portfolio, source: str) -> None:
    """Raise unless the mean cost per tier is non-decreasing from T1 to the top tier."""
    if not records:
        raise MultiModelDataError(f"{source}: no records loaded")
    means = []
    for tier in portfolio.tiers:
        means.append(sum(record.tiers[tier.name].cost_usd for record in records) / len(records))
    for lower, upper in zip(range(len(means) - 1), range(1, len(means))):
        if means[upper] < means[lower]:
            pretty = ", ".join(f"{t.model}=${m:.3g}" for t, m in zip(portfolio.tiers, means))
            raise MultiModelDataError(f"{source}: models must be given cheapest first; mean cost per query: {pretty}")


def _parse_float(text: str, where: str, field: str) -> Optional[float]:
    if text is None or text.strip() == "":
        return None
    try:
        return float(text)
    except ValueError:
        raise MultiModelDataError(f"{where}: field `{field}`: not a number: {text!r}") from None


def combine(*loaded: Loaded) -> Loaded:
    """Merge several ``(records, portfolio)`` with the same tiers into one multi-task set."""
    if not loaded:
        raise ValueError("combine() needs at least one (records, portfolio)")
    tiers = loaded[0][1].tiers
    records: list[AllPairsRecord] = []
    tasks: dict[str, TaskSpec] = {}
    for part_records, part_portfolio in loaded:
        if part_portfolio.tiers != tiers:
            raise ValueError(f"cannot combine portfolios with different tiers: {tiers} vs {part_portfolio.tiers}")
        for name, spec in part_portfolio.tasks.items():
            if name in tasks and tasks[name] != spec:
                raise ValueError(f"task {name!r} is defined differently in two parts: {tasks[name]} vs {spec}")
            tasks[name] = spec
        records.extend(part_records)
    ids = [record.id for record in records]
    if len(set(ids)) != len(ids):
        raise ValueError("combined records have duplicate ids")
    return records, Portfolio(tiers=tiers, tasks=tasks)


# --------------------------------------------------------------------------------------------------
# Zellinger & Thomson 2025 (rational-llm-cascades): MedMCQA and TruthfulQA, 9 LLMs

CASCADES_MODELS = ("llama3.2-1b", "llama3.1-8b", "llama3.1-70b", "gpt-4o")
_CASCADES_TASKS = {
    "medmcqa": TaskSpec(metric="accuracy", tau=1.0, kind="structured"),
    # judged by claude-3.5-sonnet against TruthfulQA's reference answer lists (1 = truthful)
    "truthfulqa": TaskSpec(metric="llm_judge_truthful", tau=1.0, kind="generation"),
}


def load_cascades_9llm(dataset: str = "medmcqa", models: Sequence[str] = CASCADES_MODELS,
                       data_dir: Optional[Path] = None, limit: Optional[int] = None) -> Loaded:
    """MedMCQA (1,000 queries) or TruthfulQA (517) answered by ``models``, cheapest first.

    Per tier: quality = the source's 0/1 ``correct``; cost_usd and latency_ms as measured by the
    authors; uncertainty = ``token_uncertainty([raw_confidence])`` = 1 - exp(raw_confidence), i.e.
    1 - p(answer token) for MedMCQA.  For TruthfulQA ``raw_confidence`` is a log-scale
    self-verification signal (the model asked Y/N whether its answer is truthful), used the same way
    because it is what the cascade would see there.  A confidence of -inf gives u = 1.
    The router sees ``user_prompt`` (the exact prompt every model received).  ``limit`` keeps the
    first queries by index.  Default models: 4 of the 9 spanning the cost range.
    """
    if dataset not in _CASCADES_TASKS:
        raise ValueError(f"dataset must be one of {sorted(_CASCADES_TASKS)}, got {dataset!r}")
    folder = Path(data_dir or default_data_dir()) / "cascades_9llm"
    items_path = folder / f"{dataset}_test_items.jsonl"
    results_path = folder / f"{dataset}_test_model_results.csv"
    items: dict[int, dict] = {}
    with open(items_path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            try:
                raw = json.loads(line)
                items[int(raw["idx"])] = raw
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise MultiModelDataError(f"{items_path}:{line_number}: bad item ({error!r})") from None
    wanted = set(models)
    results: dict[tuple[int, str], TierResult] = {}
    with open(results_path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            if row["model"] not in wanted:
                continue
            where = f"{results_path}:{reader.line_num}"
            correct = _parse_float(row["correct"], where, "correct")
            if correct not in (0.0, 1.0):
                raise MultiModelDataError(f"{where}: field `correct`: expected 0 or 1, got {row['correct']!r}")
            confidence = _parse_float(row["raw_confidence"], where, "raw_confidence")
            cost = _parse_float(row["cost_usd"], where, "cost_usd")
            if cost is None:
                raise MultiModelDataError(f"{where}: field `cost_usd`: missing")
            results[(int(row["idx"]), row["model"])] = TierResult(
                output=row["answer"], quality=correct, cost_usd=cost,
                latency_ms=_parse_float(row["latency_ms"], where, "latency_ms"),
                uncertainty=None if confidence is None else token_uncertainty([confidence]))
    known_models = {model for _, model in results}
    missing_models = [model for model in models if model not in known_models]
    if missing_models:
        raise ValueError(f"{results_path}: unknown model(s) {missing_models}")
    portfolio = Portfolio(tiers=_tier_specs(models), tasks={dataset: _CASCADES_TASKS[dataset]})
    records = []
    for idx in sorted(items)[:limit]:
        item = items[idx]
        tiers = {}
        for tier in portfolio.tiers:
            if (idx, tier.model) not in results:
                raise MultiModelDataError(f"{results_path}: no row for idx={idx} model={tier.model}")
            tiers[tier.name] = results[(idx, tier.model)]
        records.append(AllPairsRecord(id=f"{dataset}-{idx}", task=dataset, prompt=item["user_prompt"],
                                      tiers=tiers, reference=_cascades_reference(dataset, item["item"])))
    _check_cost_order(records, portfolio, str(results_path))
    return records, portfolio


def _cascades_reference(dataset: str, item: dict) -> object:
    if dataset == "medmcqa":
        return "ABCD"[int(item["cop"])]
    return {"best_answer": item.get("best_answer"), "correct_answers": item.get("correct_answers")}


# --------------------------------------------------------------------------------------------------
# RouterBench 0-shot (via RouterDC): ARC-challenge, MBPP, Winogrande, 11 LLMs

ROUTERBENCH_MODELS = ("mistralai/mistral-7b-chat", "mistralai/mixtral-8x7b-chat",
                      "gpt-3.5-turbo-1106", "gpt-4-1106-preview")
ROUTERBENCH_BENCHMARKS = ("arc_challenge", "mbpp", "winograde")  # file stems (RouterBench's spelling)
_ROUTERBENCH_TASKS = {
    "arc_challenge": TaskSpec(metric="accuracy", tau=1.0, kind="structured"),
    "mbpp": TaskSpec(metric="pass@1", tau=1.0, kind="generation"),
    "winograde": TaskSpec(metric="accuracy", tau=1.0, kind="structured"),
}


def _literal_list_text(cell: str, where: str, field: str) -> str:
    """RouterBench stores prompts/responses as Python list literals; join their strings."""
    try:
        value = ast.literal_eval(cell)
    except (ValueError, SyntaxError):
        raise MultiModelDataError(f"{where}: field `{field}`: not a Python list literal") from None
    if not isinstance(value, list) or not all(isinstance(part, str) for part in value):
        raise MultiModelDataError(f"{where}: field `{field}`: expected a list of strings")
    return "\n".join(value)


def _last_block(prompt: str) -> str:
    """The final block of a few-shot prompt: the actual question (examples come first)."""
    blocks = [block for block in prompt.strip().split("\n\n") if block.strip()]
    return blocks[-1] if blocks else prompt


def load_routerbench(benchmarks: Sequence[str] = ROUTERBENCH_BENCHMARKS, split: str = "test",
                     models: Sequence[str] = ROUTERBENCH_MODELS, data_dir: Optional[Path] = None,
                     prompt_view: str = "question", limit: Optional[int] = None) -> Loaded:
    """RouterBench rows as all-pairs records: quality = the 0/1 score, cost_usd = RouterBench's cost.

    Rows where any chosen model has no score (6 ARC test rows) are skipped: a missing score is not
    a failed call, so it must not be recorded as quality 0.  No latency or uncertainty in the source.
    ``prompt_view="question"`` keeps only the last block of the few-shot prompt (ARC and Winogrande
    prompts start with the same in-context examples, which would fill the encoder's 256-token window
    and make every query look alike); ``"full"`` keeps the whole prompt.  ``limit`` is per benchmark.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if prompt_view not in ("question", "full"):
        raise ValueError(f"prompt_view must be 'question' or 'full', got {prompt_view!r}")
    folder = Path(data_dir or default_data_dir()) / "routerbench_subset" / "routerbench_0shot"
    portfolio_tasks = {}
    records: list[AllPairsRecord] = []
    tiers = _tier_specs(models)
    for benchmark in benchmarks:
        if benchmark not in _ROUTERBENCH_TASKS:
            raise ValueError(f"benchmark must be one of {sorted(_ROUTERBENCH_TASKS)}, got {benchmark!r}")
        portfolio_tasks[benchmark] = _ROUTERBENCH_TASKS[benchmark]
        path = folder / f"{benchmark}_{split}.csv"
        kept = 0
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            absent = [model for model in models if model not in (reader.fieldnames or [])]
            if absent:
                raise ValueError(f"{path}: unknown model column(s) {absent}")
            for row in reader:
                if limit is not None and kept >= limit:
                    break
                where = f"{path}:{reader.line_num}"
                if any(row[model].strip() == "" for model in models):
                    continue
                results = {}
                for tier in tiers:
                    score = _parse_float(row[tier.model], where, tier.model)
                    if score not in (0.0, 1.0):
                        raise MultiModelDataError(f"{where}: field `{tier.model}`: expected 0 or 1, got {score!r}")
                    cost = _parse_float(row[f"{tier.model}|total_cost"], where, f"{tier.model}|total_cost")
                    if cost is None or cost < 0:
                        raise MultiModelDataError(f"{where}: field `{tier.model}|total_cost`: missing or negative")
                    response_cell = row.get(f"{tier.model}|model_response") or ""
                    try:
                        response = _literal_list_text(response_cell, where, f"{tier.model}|model_response")
                    except MultiModelDataError:
                        response = response_cell  # a few generations are not valid literals; keep raw text
                    results[tier.name] = TierResult(output=response, quality=score, cost_usd=cost)
                prompt = _literal_list_text(row["prompt"], where, "prompt")
                if prompt_view == "question":
                    prompt = _last_block(prompt)
                records.append(AllPairsRecord(id=row["sample_id"], task=benchmark, prompt=prompt, tiers=results))
                kept += 1
    portfolio = Portfolio(tiers=tiers, tasks=portfolio_tasks)
    _check_cost_order(records, portfolio, str(folder))
    return records, portfolio


# --------------------------------------------------------------------------------------------------
# RouteLLM evals: MMLU and GSM8K correctness of Mixtral-8x7B and GPT-4-1106

ROUTELLM_WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
ROUTELLM_STRONG = "gpt-4-1106-preview"
#: USD per token (input, output).  Published list prices, identical to LiteLLM's cost map 1.106.2:
#: gpt-4-1106-preview (OpenAI) $10 / $30 per million tokens; Mixtral-8x7B-Instruct-v0.1 (Together
#: AI) $0.60 / $0.60 per million.  RouteLLM's paper used blended $24.7/M and $0.24/M instead; pass
#: ``prices=`` to reproduce that.
ROUTELLM_PRICES = {ROUTELLM_WEAK: (0.60e-6, 0.60e-6), ROUTELLM_STRONG: (10.0e-6, 30.0e-6)}
CHARS_PER_TOKEN = 4.0  # OpenAI's rule of thumb for English text; no tokenizer of either model ships here
_ROUTELLM_TASKS = {
    "mmlu": TaskSpec(metric="accuracy", tau=1.0, kind="structured"),
    "gsm8k": TaskSpec(metric="accuracy", tau=1.0, kind="generation"),
}


def estimate_tokens(text: str) -> int:
    """ceil(characters / 4), at least 1: a tokenizer-free estimate, documented as such."""
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def _bool_cell(text: str, where: str, field: str) -> float:
    if text == "True":
        return 1.0
    if text == "False":
        return 0.0
    raise MultiModelDataError(f"{where}: field `{field}`: expected True or False, got {text!r}")


def _contaminated(path: Path) -> set[str]:
    prompts = set()
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    prompts.add(json.loads(line)["eval_prompt"])
                except (json.JSONDecodeError, KeyError) as error:
                    raise MultiModelDataError(f"{path}:{line_number}: field `eval_prompt`: {error!r}") from None
    return prompts


def load_routellm_evals(benchmark: str = "mmlu", data_dir: Optional[Path] = None,
                        exclude_contaminated: bool = True, subjects: Optional[Iterable[str]] = None,
                        prices: Optional[dict[str, tuple[float, float]]] = None,
                        limit: Optional[int] = None) -> Loaded:
    """RouteLLM's 2-model correctness as a 2-tier portfolio: T1 = Mixtral-8x7B, T2 = GPT-4-1106.

    cost_usd = input_tokens x input price + output_tokens x output price (see ``ROUTELLM_PRICES``),
    with tokens estimated as ceil(chars / 4): input = the prompt; output = the model's own response
    for GSM8K, 1 token for MMLU (the answer letter; responses are not in the files).  Prompts that
    RouteLLM flags as contaminated (overlapping its router training data) are dropped by default.
    MMLU ids are ``mmlu-<subject>-<row>``; ``subjects`` restricts to some subjects (e.g. "anatomy").
    ``limit`` keeps the first rows (per subject for MMLU).
    """
    if benchmark not in _ROUTELLM_TASKS:
        raise ValueError(f"benchmark must be one of {sorted(_ROUTELLM_TASKS)}, got {benchmark!r}")
    prices = prices or ROUTELLM_PRICES
    models = (ROUTELLM_WEAK, ROUTELLM_STRONG)
    tiers = _tier_specs(models)
    root = Path(data_dir or default_data_dir()) / "routellm_evals"
    if benchmark == "mmlu":
        folder = root / "mmlu_responses"
        wanted = set(subjects) if subjects is not None else None
        files = sorted(folder.glob("mmlu_*.csv"))
        if wanted is not None:
            files = [path for path in files if path.stem[len("mmlu_"):] in wanted]
            found = {path.stem[len("mmlu_"):] for path in files}
            if found != wanted:
                raise ValueError(f"unknown MMLU subject(s): {sorted(wanted - found)}")
    else:
        folder = root / "gsm8k"
        files = [folder / "gsm8k_responses.csv"]
    skip = _contaminated(folder / "contaminated_prompts.jsonl") if exclude_contaminated else set()
    records: list[AllPairsRecord] = []
    for path in files:
        subject = path.stem[len("mmlu_"):] if benchmark == "mmlu" else None
        kept = 0
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            for row_number, row in enumerate(reader):
                if limit is not None and kept >= limit:
                    break
                if row["prompt"] in skip:
                    continue
                where = f"{path}:{reader.line_num}"
                prompt = row["prompt"]
                results = {}
                for tier in tiers:
                    quality = _bool_cell(row[tier.model], where, tier.model)
                    response = row.get(f"{tier.model}_response")
                    tokens_out = estimate_tokens(response) if response else 1
                    price_in, price_out = prices[tier.model]
                    results[tier.name] = TierResult(
                        output=response, quality=quality,
                        cost_usd=estimate_tokens(prompt) * price_in + tokens_out * price_out)
                record_id = f"mmlu-{subject}-{row_number}" if subject else f"gsm8k-{row_number}"
                records.append(AllPairsRecord(id=record_id, task=benchmark, prompt=prompt, tiers=results))
                kept += 1
    portfolio = Portfolio(tiers=tiers, tasks={benchmark: _ROUTELLM_TASKS[benchmark]})
    _check_cost_order(records, portfolio, str(folder))
    return records, portfolio
