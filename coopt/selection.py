"""Step 3: the distillation data -- hardest failures of the chosen clusters plus random in-distribution queries.

Per task, from each of the top clusters the hardest ``hard_fraction`` (30%, rounded up) of its
failures, hardest = largest quality gap, then largest logged uncertainty.  Then random queries of the
same task from the logged traffic (in-distribution: what the proxy actually receives, escalated or
not), so many that they make up ``random_share`` (20%) of the task's distillation set -- they keep the
student from forgetting what it already does well.  Every item's target is the top tier's answer,
obtained through LiteLLM (:func:`fill_teacher_outputs`).

:func:`select_random` draws the untargeted control of the paper's comparison: the same number of
examples per task, uniformly from the same logged traffic.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from routenlp_core.tasks import get_task
from coopt.failures import ask_tiers, top_tier

HARD_FRACTION = 0.3
RANDOM_SHARE = 0.2


@dataclass(frozen=True)
class DistillItem:
    """One distillation example: a query and the teacher's answer to it."""

    task: str
    prompt: str
    kind: str                            # "hard" (from a failure cluster) | "random" (in-distribution)
    teacher_output: Optional[str] = None
    teacher_tier: Optional[str] = None
    cluster_id: Optional[int] = None
    gap: Optional[float] = None
    request_id: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def hardest(failures: Sequence[Any], fraction: float) -> list[Any]:
    """The ``ceil(fraction * n)`` failures with the largest gap (then the largest uncertainty)."""
    count = math.ceil(fraction * len(failures))
    ranked = sorted(failures, key=lambda f: (-f.gap, -(f.uncertainty if f.uncertainty is not None else -1.0),
                                             f.request_id))
    return ranked[:count]


def random_count(n_hard: int, random_share: float) -> int:
    """How many random items make them ``random_share`` of a set that holds ``n_hard`` hard items."""
    if not 0.0 <= random_share < 1.0:
        raise ValueError(f"random_share must lie in [0, 1), got {random_share}")
    return int(round(n_hard * random_share / (1.0 - random_share)))


def _pool_by_task(pool: Iterable[Any]) -> dict[str, list[tuple[str, Optional[str]]]]:
    """Distinct (prompt, request id) of the logged requests per task, in log order."""
    out: dict[str, list[tuple[str, Optional[str]]]] = {}
    seen: set[tuple[str, str]] = set()
    for record in pool:
        if not record.task or not record.prompt or (record.task, record.prompt) in seen:
            continue
        seen.add((record.task, record.prompt))
        out.setdefault(record.task, []).append((record.prompt, record.request_id))
    return out


def select_targeted(failures: Sequence[Any], clustering: Mapping[str, Any], pool: Iterable[Any],
                    hard_fraction: float = HARD_FRACTION, random_share: float = RANDOM_SHARE,
                    seed: int = 0) -> list[DistillItem]:
    """Hard items from each task's top clusters plus the random in-distribution share (module docstring).

    ``clustering`` maps task -> :class:`coopt.clusters.TaskClusters` whose member indices refer to that
    task's failures in ``failures`` order; ``pool`` is the logged traffic (``RequestRecord``).
    A failure's teacher answer is kept as the target when the task's answers are labels (complete at
    any budget); a text answer, cut at the failure-scoring budget, is asked again by
    :func:`fill_teacher_outputs` with the distillation budget.
    """
    if not 0.0 < hard_fraction <= 1.0:
        raise ValueError(f"hard_fraction must lie in (0, 1], got {hard_fraction}")
    by_task = _pool_by_task(pool)
    items: list[DistillItem] = []
    for task in sorted(clustering):
        task_failures = [f for f in failures if f.task == task]
        keep_teacher = get_task(task).labels() is not None
        hard: list[DistillItem] = []
        taken: set[str] = set()
        for cluster in clustering[task].chosen():
            members = [task_failures[i] for i in cluster.members]
            for failure in hardest(members, hard_fraction):
                if failure.prompt in taken:
                    continue
                taken.add(failure.prompt)
                hard.append(DistillItem(task=task, prompt=failure.prompt, kind="hard",
                                        teacher_output=failure.teacher_output if keep_teacher else None,
                                        teacher_tier=failure.teacher_tier if keep_teacher else None,
                                        cluster_id=cluster.cluster_id, gap=failure.gap,
                                        request_id=failure.request_id))
        candidates = [(p, r) for p, r in by_task.get(task, []) if p not in taken]
        wanted = random_count(len(hard), random_share)
        rng = random.Random(f"{seed}:{task}:random")
        chosen = rng.sample(candidates, min(wanted, len(candidates)))
        items += hard + [DistillItem(task=task, prompt=p, kind="random", request_id=r) for p, r in chosen]
    return items


def select_random(pool: Iterable[Any], counts: Mapping[str, int], seed: int = 0,
                  exclude: Iterable[str] = ()) -> list[DistillItem]:
    """``counts[task]`` queries per task drawn uniformly from the logged traffic (the untargeted control)."""
    by_task = _pool_by_task(pool)
    skip = set(exclude)
    items = []
    for task, count in sorted(counts.items()):
        candidates = [(p, r) for p, r in by_task.get(task, []) if p not in skip]
        rng = random.Random(f"{seed}:{task}:control")
        for prompt, request_id in rng.sample(candidates, min(count, len(candidates))):
            items.append(DistillItem(task=task, prompt=prompt, kind="random", request_id=request_id))
    return items


def fill_teacher_outputs(items: Sequence[DistillItem], config_path: str | os.PathLike[str], max_tokens: int = 256,
                         concurrency: int = 2, progress: bool = True) -> list[DistillItem]:
    """Ask the top tier (through LiteLLM, the config's deployment) for every item without a target.

    Items whose teacher call fails are dropped (a distillation target must exist).  ``max_tokens`` is
    the teacher's budget: generous, since a truncated target teaches truncation.
    """
    teachers = {task: top_tier(config_path, task) for task in {item.task for item in items}}
    missing = [i for i, item in enumerate(items) if item.teacher_output is None]
    answers = ask_tiers(config_path, [(teachers[items[i].task], items[i].task, items[i].prompt) for i in missing],
                        max_tokens=max_tokens, concurrency=concurrency, desc="teacher answers", progress=progress)
    filled = list(items)
    for i, answer in zip(missing, answers):
        filled[i] = replace(items[i], teacher_output=None if answer.get("error") else (answer.get("output") or ""),
                            teacher_tier=teachers[items[i].task])
    return [item for item in filled if item.teacher_output is not None]


def composition(items: Sequence[DistillItem]) -> dict[str, dict[str, int]]:
    """Per task: how many hard and random items."""
    out: dict[str, dict[str, int]] = {}
    for item in items:
        entry = out.setdefault(item.task, {"hard": 0, "random": 0})
        entry[item.kind] += 1
    return out


def write_items(items: Iterable[DistillItem], path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps(item.to_dict(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def read_items(path: str | os.PathLike[str]) -> list[DistillItem]:
    with open(path, encoding="utf-8") as handle:
        return [DistillItem(**json.loads(line)) for line in handle if line.strip()]
