"""Relabel only the tiers that changed: ask them again through LiteLLM and splice their answers into all-pairs records.

After distillation only the student tiers answer differently; the others' answers (and costs) are
unchanged, so re-asking them would waste time (and, in real use, frontier-API money).  This writes a
proxy config holding just the changed tiers' deployments, runs the labeller on it
(:func:`coopt.label.label_examples`: same calls, same scoring, resumable), and replaces those tiers'
results in copies of the records.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import yaml

from routenlp_core.allpairs import AllPairsRecord, read_allpairs
from routenlp_core.tasks import TaskExample
from litellm_routenlp.config import read_yaml
from routenlp_standins import tiers as standin_tiers
from routenlp_standins.artifacts import StandinDirs
from coopt.label import label_examples


def config_with_tiers(config_path: str | os.PathLike[str], tiers: Sequence[str], out_path: Path) -> Path:
    """A copy of the proxy config whose alias keeps only the deployments of ``tiers`` (names ``T<k>``)."""
    document = read_yaml(Path(config_path))
    alias = (document.get("routenlp_settings") or {}).get("model_alias", "routenlp")
    kept = [d for d in document.get("model_list") or []
            if d.get("model_name") != alias or f"T{(d.get('model_info') or {}).get('routenlp_tier')}" in tiers]
    document["model_list"] = kept
    out_path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return out_path


def pin_torch_threads(threads: int = 1) -> None:
    """Generation threads of the in-process SmolLM2 tier (it sets 2 when it loads).

    On a shared 2-core machine two spinning torch threads made a 48-token answer 16-30 s instead of
    2.3 s with one thread (measured here), so offline relabelling pins one thread after the tier loads.
    """
    import torch  # local: only a config with an in-process SmolLM2 tier needs torch

    torch.set_num_threads(threads)


def relabel_tiers(records: Sequence[AllPairsRecord], config_path: str | os.PathLike[str], tiers: Sequence[str],
                  work_dir: Optional[Path] = None, concurrency: int = 2, max_tokens: int = 48,
                  progress: bool = True, threads: Optional[int] = 1) -> list[AllPairsRecord]:
    """Copies of ``records`` whose ``tiers`` results come from asking those tiers now.

    Give it a config whose stand-ins serve the iteration's students (:func:`coopt.versions.derive_proxy_config`).
    ``work_dir`` keeps the labeller's output (resumable); a temporary directory otherwise.
    """
    tiers = sorted(set(tiers))
    if not tiers or not records:
        return list(records)
    with tempfile.TemporaryDirectory(prefix="routenlp-relabel-") as scratch:
        base = Path(work_dir) if work_dir is not None else Path(scratch)
        base.mkdir(parents=True, exist_ok=True)
        config = config_with_tiers(config_path, tiers, base / f"relabel-{'-'.join(tiers)}.yaml")
        out = base / f"relabel-{'-'.join(tiers)}.jsonl"
        examples = [TaskExample(id=r.id, task=r.task, text=r.prompt, reference=r.reference) for r in records]
        if threads is not None:
            prepare_local_generators(config, tiers, threads)
        asyncio.run(label_examples(config, examples, out, concurrency=concurrency, max_tokens=max_tokens,
                                   progress=progress))
        fresh = {r.id: r for r in read_allpairs(out)}
    missing = [r.id for r in records if r.id not in fresh]
    if missing:
        raise RuntimeError(f"relabelling {tiers} left {len(missing)} records unlabelled (first: {missing[0]})")
    return [replace(r, tiers={**r.tiers, **{t: fresh[r.id].tiers[t] for t in tiers}}) for r in records]


def prepare_local_generators(config: str | os.PathLike[str], tiers: Optional[Sequence[str]] = None,
                             threads: int = 1) -> None:
    """Load the in-process SmolLM2 tier of ``config`` now (if one of ``tiers``, default all, is it) and pin
    torch to ``threads``: the tier sets its own thread count when it loads, so this must come after."""
    if load_local_generators(config, tiers):
        pin_torch_threads(threads)


def load_local_generators(config: str | os.PathLike[str], tiers: Optional[Sequence[str]] = None) -> bool:
    """Load the in-process SmolLM2 tier if the config serves one of ``tiers`` (names ``T<k>``) with it."""
    for deployment in read_yaml(Path(config)).get("model_list") or []:
        model = str((deployment.get("litellm_params") or {}).get("model", ""))
        name = f"T{(deployment.get('model_info') or {}).get('routenlp_tier')}"
        if model.endswith("/smollm2") and (tiers is None or name in tiers):
            standin_tiers.smollm2(StandinDirs.from_model_info(deployment.get("model_info"))).load()  # what it serves
            return True
    return False
