"""The shared all-pairs sets the benchmark knows by name, and how they are written to files.

Each name maps to a loader of :mod:`coopt.multimodel` (the real multi-model result sets under the
shared data directory).  ``routenlp bench --dataset NAME`` writes the set as an ordinary all-pairs
file plus its portfolio YAML (:func:`materialise`) and then benchmarks that file exactly as it would
benchmark a file a user brings: nothing downstream knows where the data came from.

Sets are kept multi-task where the source allows it (the router is task-conditioned, and the
"without task conditioning" ablation and the shift test only mean something with several tasks):

* ``cascades_9llm``: MedMCQA (1,000) + TruthfulQA (517), llama3.2-1b / llama3.1-8b / llama3.1-70b /
  gpt-4o, with the authors' measured cost, latency and answer log-probability (uncertainty).
* ``routerbench``: RouterBench 0-shot ARC-Challenge + MBPP + Winogrande, its train and test rows
  together (3,150; the benchmark makes its own splits), mistral-7b / mixtral-8x7b / gpt-3.5 / gpt-4.
  No latency, no uncertainty.
* ``routellm``: RouteLLM's MMLU (14,037) + GSM8K (1,307) correctness of Mixtral-8x7B and GPT-4,
  priced from published per-token rates.  Two tiers, no latency, no uncertainty.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from routenlp_core.allpairs import AllPairsRecord, Portfolio, write_allpairs, write_portfolio
from coopt.multimodel import combine, load_cascades_9llm, load_routellm_evals, load_routerbench

Loader = Callable[[Optional[Path]], tuple[list[AllPairsRecord], Portfolio]]


def _cascades(data_dir: Optional[Path]) -> tuple[list[AllPairsRecord], Portfolio]:
    return combine(load_cascades_9llm("medmcqa", data_dir=data_dir), load_cascades_9llm("truthfulqa", data_dir=data_dir))


def _routerbench(data_dir: Optional[Path]) -> tuple[list[AllPairsRecord], Portfolio]:
    return combine(load_routerbench(split="train", data_dir=data_dir), load_routerbench(split="test", data_dir=data_dir))


def _routellm(data_dir: Optional[Path]) -> tuple[list[AllPairsRecord], Portfolio]:
    return combine(load_routellm_evals("mmlu", data_dir=data_dir), load_routellm_evals("gsm8k", data_dir=data_dir))


SHARED_DATASETS: dict[str, Loader] = {
    "cascades_9llm": _cascades,
    "routerbench": _routerbench,
    "routellm": _routellm,
}


def load_shared(name: str, data_dir: Optional[Path] = None) -> tuple[list[AllPairsRecord], Portfolio]:
    """Records and portfolio of the shared set ``name`` (see :data:`SHARED_DATASETS`)."""
    try:
        loader = SHARED_DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(SHARED_DATASETS)}") from None
    return loader(data_dir)


def materialise(name: str, out_dir: Path, data_dir: Optional[Path] = None) -> tuple[Path, Path]:
    """Write shared set ``name`` to ``out_dir/<name>.jsonl`` and ``out_dir/<name>.portfolio.yaml``."""
    records, portfolio = load_shared(name, data_dir)
    out_dir = Path(out_dir)
    data_path = write_allpairs(records, out_dir / f"{name}.jsonl")
    portfolio_path = write_portfolio(portfolio, out_dir / f"{name}.portfolio.yaml")
    return data_path, portfolio_path
