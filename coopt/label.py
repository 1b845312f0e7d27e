"""``routenlp label``: answer every query with every tier of a proxy config and score each answer.

The tiers are the deployments of the config's alias, called through LiteLLM exactly as the proxy calls
them (local stand-ins in-process, or any real vLLM/OpenAI deployment the config names).  Output is the
all-pairs JSONL format (``routenlp_core.allpairs``).  Bounded concurrency, a progress bar, resumable: queries
already in the output file are skipped, and a per-tier error is recorded in the record instead of
stopping the run.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from tqdm.auto import tqdm

from routenlp_core.allpairs import append_allpairs, parse_record
from routenlp_core.tasks import get_task
from litellm_routenlp.config import read_yaml
from litellm_routenlp.uncertainty import response_uncertainty

# litellm itself is imported inside the functions that call tiers: it takes ~4 s to import, and
# iter_examples / the record helpers here (used by demo_router and the loop) do not need it.


def register_custom_providers(document: dict[str, Any]) -> None:
    """Load ``litellm_settings.custom_provider_map`` handlers the way the proxy does."""
    import litellm
    from litellm.utils import custom_llm_setup

    entries = (document.get("litellm_settings") or {}).get("custom_provider_map") or []
    providers = []
    for entry in entries:
        handler = entry["custom_handler"]
        if isinstance(handler, str):
            module_name, _, attribute = handler.rpartition(".")
            handler = getattr(importlib.import_module(module_name), attribute)
        providers.append({"provider": entry["provider"], "custom_handler": handler})
    known = {item["provider"] for item in litellm.custom_provider_map}
    litellm.custom_provider_map.extend(p for p in providers if p["provider"] not in known)
    custom_llm_setup()


def tier_router(config_path: str | Path, alias: Optional[str] = None) -> tuple[Any, list[str], dict[str, Optional[set[str]]]]:
    """A litellm.Router with one model group per tier (``T1``..``TK``), built from the proxy config,
    and the tasks each tier serves (``model_info.routenlp_tasks``; None = every task)."""
    import litellm

    document = read_yaml(Path(config_path))
    register_custom_providers(document)
    alias = alias or (document.get("routenlp_settings") or {}).get("model_alias", "routenlp")
    model_list, names, served = [], set(), {}
    for deployment in document.get("model_list") or []:
        if deployment.get("model_name") != alias:
            continue
        tier = (deployment.get("model_info") or {}).get("routenlp_tier")
        if not isinstance(tier, int):
            raise ValueError(f"{config_path}: `{alias}` deployment without an integer model_info.routenlp_tier")
        name = f"T{tier}"
        names.add(name)
        tasks = (deployment.get("model_info") or {}).get("routenlp_tasks")
        served[name] = None if tasks is None else set(tasks)
        model_list.append({**deployment, "model_name": name})
    if not model_list:
        raise ValueError(f"{config_path}: no deployments named `{alias}`")
    return (litellm.Router(model_list=model_list, num_retries=0), sorted(names, key=lambda n: int(n[1:])),
            served)


async def _ask(router: Any, tier: str, example: Any, max_tokens: int) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        response = await router.acompletion(
            model=tier, messages=[{"role": "user", "content": example.text}],
            metadata={"task": example.task}, logprobs=True, max_tokens=max_tokens, temperature=0.0)
    except Exception as error:  # recorded per query, never fatal
        return {"output": None, "quality": 0.0, "cost_usd": 0.0,
                "latency_ms": (time.perf_counter() - started) * 1000.0, "uncertainty": None,
                "error": f"{type(error).__name__}: {str(error)[:300]}"}
    latency = (time.perf_counter() - started) * 1000.0
    output = response.choices[0].message.content or ""
    cost = (getattr(response, "_hidden_params", None) or {}).get("response_cost") or 0.0
    return {"output": output, "quality": None, "cost_usd": float(cost), "latency_ms": latency,
            "uncertainty": response_uncertainty(response)}


def _done_ids(out_path: Path) -> set[str]:
    if not out_path.exists():
        return set()
    done = set()
    with open(out_path) as handle:
        for line in handle:
            try:
                done.add(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a torn last line from an interrupted run is relabelled
    return done


async def label_examples(config_path: str | Path, examples: Sequence[Any], out_path: str | Path,
                         concurrency: int = 2, max_tokens: int = 64, progress: bool = True) -> int:
    """Label ``examples`` (routenlp_core.tasks.TaskExample) with every tier; append to ``out_path``. Returns count."""
    router, tiers, served = tier_router(config_path)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _done_ids(out)
    todo = [example for example in examples if example.id not in done]
    semaphore = asyncio.Semaphore(max(1, concurrency))
    bar = tqdm(total=len(todo), desc=f"labelling {len(tiers)} tiers", disable=not progress)
    written = 0

    async def one(example: Any) -> None:
        nonlocal written
        async with semaphore:
            spec = get_task(example.task)
            results = {}
            for tier in tiers:
                if served[tier] is not None and example.task not in served[tier]:
                    # the proxy never sends this task to this tier: recorded as unusable, not called
                    results[tier] = {"output": None, "quality": 0.0, "cost_usd": 0.0, "latency_ms": 0.0,
                                     "uncertainty": None,
                                     "error": f"not served: model_info.routenlp_tasks excludes {example.task}"}
                    continue
                result = await _ask(router, tier, example, max_tokens)
                if result.get("error") is None:
                    result["quality"] = float(spec.score(result["output"], example.reference))
                results[tier] = result
            record = {"id": example.id, "task": example.task, "prompt": example.text,
                      "reference": example.reference, "tiers": results}
            append_allpairs([parse_record(record, f"{out} (new record {example.id})")], out)
            written += 1
            bar.update(1)

    await asyncio.gather(*(one(example) for example in todo))
    bar.close()
    return written


def label_task(config_path: str | Path, task: str, split: str, limit: Optional[int], out_path: str | Path,
               seed: int = 0, concurrency: int = 2, max_tokens: int = 64) -> int:
    examples = get_task(task).load(split, limit=limit, seed=seed)
    return asyncio.run(label_examples(config_path, examples, out_path, concurrency=concurrency,
                                      max_tokens=max_tokens))


def iter_examples(tasks: Iterable[str], split: str, limit: Optional[int], seed: int = 0) -> list[Any]:
    out: list[Any] = []
    for task in tasks:
        out.extend(get_task(task).load(split, limit=limit, seed=seed))
    return out
