"""Load-once registry of the stand-in tier objects, shared by every handler instance in the process.

LiteLLM's proxy loads ``custom_handler: routenlp_standins.handler.local_tiers`` by executing
``handler.py`` from the config's directory as a fresh module when the file is found there, so a
plugin that imports ``routenlp_standins.handler`` itself (e.g. to call ``warmup()``) gets a second
``LocalTiers`` object.  Keeping the loaded models here, in a normally imported module, means both
share one SmolLM2 (540 MB) and one copy of each index instead of loading them twice.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from routenlp_standins.answer import UnsupportedTaskError
from routenlp_standins.artifacts import StandinDirs, classifier_root, smollm2_adapter_dir
from routenlp_standins.classifier import ClassifierTier, check_classifiable
from routenlp_standins.replay import ReplayTier
from routenlp_standins.retrieval import RetrievalTier, vote_groups
from routenlp_standins.smollm import SmolLM2Tier

_lock = threading.Lock()
_loaded: dict[tuple[str, str, str], Any] = {}
# SmolLM2 requests queue in their own one-thread pool: a backlog of slow generations must not occupy
# the event loop's default executor, which the fast tiers (milliseconds per query) and LiteLLM use.
_executors = {
    "smollm2": ThreadPoolExecutor(max_workers=1, thread_name_prefix="routenlp-smollm2"),
    "fast": ThreadPoolExecutor(max_workers=2, thread_name_prefix="routenlp-standins"),
}


def executor(tier: str) -> ThreadPoolExecutor:
    """Worker pool that runs ``tier``'s blocking work."""
    return _executors["smollm2" if tier == "smollm2" else "fast"]


def _key(root: Path) -> str:
    return str(Path(root).resolve())


def smollm2(dirs: StandinDirs) -> SmolLM2Tier:
    """The process-wide SmolLM2 tier for ``dirs`` (the model itself loads lazily, on first use).

    With a co-optimisation adapter (``dirs.coopt`` holding ``lora/smollm2``) it is a separate entry:
    base and adapted models never share a cache slot.
    """
    root = dirs.artifacts
    adapter = smollm2_adapter_dir(dirs)
    key = (_key(root), "smollm2", "" if adapter is None else _key(adapter))
    with _lock:
        if key not in _loaded:
            _loaded[key] = SmolLM2Tier(Path(root), adapter_dir=adapter)
        return _loaded[key]


def task_tier(dirs: StandinDirs, tier: str, task: str) -> Any:
    """The loaded ``tier`` ("classifier"|"retrieval"|"replay") for ``task``.

    Raises :class:`UnsupportedTaskError` for a task the tier cannot serve and
    :class:`~routenlp_standins.artifacts.MissingArtifactError` when its artifact is not built.
    """
    root = Path(dirs.artifacts)
    source = classifier_root(dirs, task) if tier == "classifier" else root
    key = (_key(root), tier, task) if source == root else (_key(root), tier, task, _key(source))
    found = _loaded.get(key)
    if found is not None:
        return found
    with _lock:
        if key not in _loaded:
            _loaded[key] = _load(dirs, tier, task, source)
        return _loaded[key]


def _load(dirs: StandinDirs, tier: str, task: str, source: Path) -> Any:
    root = Path(dirs.artifacts)
    if tier == "classifier":
        check_classifiable(task)
        return ClassifierTier(source, task)  # source: a distilled head from a co-opt iteration, or root
    if tier == "retrieval":
        vote_groups(task, [])  # raises for tasks with nothing to vote on
        return RetrievalTier(root, task)
    if tier == "replay":
        # The retrieval fallback is looked up only on the first miss (outside this lock).
        return ReplayTier(task, retrieval=lambda: task_tier(dirs, "retrieval", task))
    raise UnsupportedTaskError(f"unknown tier {tier!r}")
