"""From escalated requests to scored failures: how far the failing tier's answer is from the top tier's.

A request the cascade escalated failed at its first tier (``RequestRecord.failed_tier``).  The
*quality gap* of that failure is quality(top tier) - quality(failed tier), both scored with the task's
own metric against the **top tier's answer** (the teacher), because production traffic has no gold
reference: the top tier scores 1 against itself, so the gap is ``1 - score(failed answer, teacher
answer)`` -- 1 for a wrong intent label, 1 - BERTScore for a support answer.

Both answers come through LiteLLM, from the tiers the proxy config names (``coopt.label.tier_router``):
a spend-log row that stored the answer is used as is; otherwise the tier is asked again (deterministic
tiers, temperature 0).  The teacher's answers are kept: they are the distillation targets.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from tqdm.auto import tqdm

from routenlp_core.tasks import TaskExample, get_task
from coopt.label import _ask, tier_router  # the labeller's own call: same parameters, same pricing
from coopt.logs import RequestRecord, escalations
from coopt.relabel import prepare_local_generators

# Enough tokens for a label; support answers are cut where the labelling of the demo cuts them.
DEFAULT_MAX_TOKENS = 48


@dataclass(frozen=True)
class Failure:
    """One escalated request, scored."""

    request_id: str
    task: str
    prompt: str
    failed_tier: str
    uncertainty: Optional[float]        # the failed tier's u, as logged
    failed_output: Optional[str]
    teacher_tier: str
    teacher_output: Optional[str]
    gap: float                          # quality(teacher) - quality(failed answer), vs the teacher's answer

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def top_tier(config_path: str | os.PathLike[str], task: Optional[str] = None) -> str:
    """The most capable tier of the config that serves ``task``: the teacher."""
    _, names, served = tier_router(config_path)
    for name in reversed(names):
        if task is None or served[name] is None or task in served[name]:
            return name
    raise ValueError(f"{config_path}: no tier serves task {task!r}")


async def _ask_all(config_path: str | os.PathLike[str], jobs: Sequence[tuple[str, str, str]], max_tokens: int,
                   concurrency: int, desc: str, progress: bool) -> list[dict[str, Any]]:
    router, _, _ = tier_router(config_path)
    semaphore = asyncio.Semaphore(max(1, concurrency))
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress or not jobs)

    async def one(index: int, tier: str, task: str, prompt: str) -> dict[str, Any]:
        async with semaphore:
            example = TaskExample(id=f"coopt-{index}", task=task, text=prompt, reference=None)
            result = await _ask(router, tier, example, max_tokens)
            bar.update(1)
            return result

    try:
        return list(await asyncio.gather(*(one(i, *job) for i, job in enumerate(jobs))))
    finally:
        bar.close()


def ask_tiers(config_path: str | os.PathLike[str], jobs: Sequence[tuple[str, str, str]],
              max_tokens: int = DEFAULT_MAX_TOKENS, concurrency: int = 2, desc: str = "asking tiers",
              progress: bool = True) -> list[dict[str, Any]]:
    """Answer ``(tier, task, prompt)`` jobs through LiteLLM; one dict (output, cost_usd, uncertainty,
    error) per job, in order.  A failed call is reported in its dict, never raised."""
    if not jobs:
        return []

    prepare_local_generators(config_path, sorted({tier for tier, _, _ in jobs}))  # one torch thread (coopt.relabel)
    return asyncio.run(_ask_all(config_path, jobs, max_tokens, concurrency, desc, progress))


def score_failures(records: Iterable[RequestRecord], config_path: str | os.PathLike[str],
                   tasks: Optional[Iterable[str]] = None, max_tokens: int = DEFAULT_MAX_TOKENS, concurrency: int = 2,
                   progress: bool = True, max_per_task: Optional[int] = None, seed: int = 0) -> list[Failure]:
    """Score every escalated request (with a task and its text) of ``records``.

    The teacher is the config's top tier for the request's task.  Requests whose answers cannot be
    obtained (a tier error) are dropped, never scored as perfect or as failed.  ``max_per_task`` scores
    a seeded uniform sample of each task's escalations instead of all of them (re-asking a generative
    tier costs seconds per answer on CPU).
    """
    chosen = escalations(records, tasks)
    if max_per_task is not None:
        sampled = []
        for task in sorted({r.task for r in chosen}):
            rows = [r for r in chosen if r.task == task]
            keep = set(random.Random(f"{seed}:{task}:failures").sample(range(len(rows)), min(max_per_task, len(rows))))
            sampled += [r for i, r in enumerate(rows) if i in keep]
        chosen = sampled
    teachers = {task: top_tier(config_path, task) for task in {r.task for r in chosen}}
    jobs: list[tuple[str, str, str]] = []
    where: list[tuple[int, str]] = []  # (record index, "failed" | "teacher")
    known: dict[tuple[int, str], Optional[str]] = {}
    for index, record in enumerate(chosen):
        failed = record.failed_tier
        stored_failed = next((c.output for c in record.calls if c.tier == failed and c.output is not None), None)
        stored_teacher = next((c.output for c in record.calls
                               if c.tier == teachers[record.task] and c.output is not None), None)
        for role, tier, stored in (("failed", failed, stored_failed), ("teacher", teachers[record.task],
                                                                       stored_teacher)):
            if stored is not None:
                known[(index, role)] = stored
            else:
                jobs.append((str(tier), str(record.task), str(record.prompt)))
                where.append((index, role))
    answers = ask_tiers(config_path, jobs, max_tokens=max_tokens, concurrency=concurrency,
                        desc="failures: failed tier + teacher answers", progress=progress)
    for (index, role), answer in zip(where, answers):
        known[(index, role)] = None if answer.get("error") else (answer.get("output") or "")

    usable = [i for i in range(len(chosen))
              if known.get((i, "failed")) is not None and known.get((i, "teacher")) is not None]
    scores: dict[int, float] = {}
    for task in sorted({chosen[i].task for i in usable}):
        rows = [i for i in usable if chosen[i].task == task]
        spec = get_task(task)
        values = spec.score_batch([known[(i, "failed")] for i in rows],
                                  [_reference(spec, known[(i, "teacher")]) for i in rows])
        scores.update(zip(rows, values))
    out = []
    for i in usable:
        record = chosen[i]
        failed_call = next((c for c in record.calls if c.tier == record.failed_tier), record.calls[0])
        out.append(Failure(request_id=record.request_id, task=str(record.task), prompt=str(record.prompt),
                           failed_tier=str(record.failed_tier), uncertainty=failed_call.uncertainty,
                           failed_output=known[(i, "failed")], teacher_tier=teachers[record.task],
                           teacher_output=known[(i, "teacher")], gap=round(max(0.0, 1.0 - scores[i]), 6)))
    return out


def _reference(spec: Any, teacher_output: str) -> Any:
    """The teacher's answer as the task's reference type (a label string, or a text)."""
    return teacher_output.strip() if spec.labels() is not None else teacher_output


def write_failures(failures: Iterable[Failure], path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for failure in failures:
            handle.write(json.dumps(failure.to_dict(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def read_failures(path: str | os.PathLike[str]) -> list[Failure]:
    with open(path, encoding="utf-8") as handle:
        return [Failure(**json.loads(line)) for line in handle if line.strip()]
