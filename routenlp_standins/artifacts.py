"""Where the stand-in tiers keep their built artifacts, and the one error a missing artifact raises.

Layout under the artifacts root (env ``ROUTENLP_ARTIFACTS_DIR``, default ``artifacts`` relative to the
working directory, because the proxy is started from the repository root)::

    encoder/                          MiniLM ONNX encoder (written by `routenlp export-encoder`)
    tiers/classifier/<task>.safetensors|json    T1 logistic-regression head
    tiers/retrieval/<task>.safetensors|json     T3 k-NN index
    smollm2/                          T2 transformers-format copy of SmolLM2-135M-Instruct

Weights go to safetensors and metadata to JSON: nothing here is ever pickled.

Co-optimisation (``routenlp coopt``) writes distilled tiers into an iteration directory with the same
layout (``tiers/classifier/<task>.*``) plus ``lora/smollm2/`` (a PEFT adapter).  When the env variable
``ROUTENLP_COOPT_DIR`` names such a directory, the classifier of a task it holds and the adapter it
holds are served instead of the base artifacts; unset (the default), nothing changes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

TIER_NAMES = ("classifier", "smollm2", "retrieval", "replay")  # T1..T4, cheapest first
ARTIFACTS_ENV = "ROUTENLP_ARTIFACTS_DIR"
COOPT_ENV = "ROUTENLP_COOPT_DIR"  # a co-optimisation iteration whose distilled tiers are served
BUILD_COMMAND = "python -m routenlp_standins build"


class MissingArtifactError(FileNotFoundError):
    """A stand-in tier's artifact is absent; the message names the file and the command that builds it."""


def artifacts_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``explicit`` if given, else ``$ROUTENLP_ARTIFACTS_DIR``, else ``./artifacts``."""
    if explicit is not None:
        return Path(explicit)
    return Path(os.environ.get(ARTIFACTS_ENV) or "artifacts")


def build_hint(root: Path) -> str:
    """The exact command that (re)builds the artifacts under ``root``."""
    return f"`{BUILD_COMMAND} --artifacts {root}`"


def encoder_dir(root: Path) -> Path:
    return root / "encoder"


def smollm2_dir(root: Path) -> Path:
    return root / "smollm2"


def tier_files(root: Path, tier: str, task: str) -> tuple[Path, Path]:
    """``(weights.safetensors, meta.json)`` of ``tier`` ("classifier"|"retrieval") for ``task``."""
    base = root / "tiers" / tier
    return base / f"{task}.safetensors", base / f"{task}.json"


def require_file(path: Path, what: str, root: Path) -> Path:
    """Return ``path`` or raise :class:`MissingArtifactError` naming it and the build command."""
    if not path.is_file():
        hint = ("run `routenlp export-encoder` (or coopt.export_encoder)" if path.parent == encoder_dir(root)
                else f"build it with {build_hint(root)}")
        raise MissingArtifactError(f"{what}: artifact {path} is missing; {hint}")
    return path


def write_tensors_and_meta(weights_path: Path, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    """Write the pair atomically-enough: JSON last, so a present JSON means the weights are complete."""
    from safetensors.numpy import save_file

    weights_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path = weights_path.with_suffix(".json")
    meta_path.unlink(missing_ok=True)
    save_file({name: np.ascontiguousarray(value) for name, value in tensors.items()}, str(weights_path))
    weights_path.chmod(0o644)  # safetensors creates 0600; the proxy may run as another user
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(meta_path)


def read_tensors_and_meta(root: Path, tier: str, task: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Load a tier's safetensors + JSON for ``task``; missing files raise :class:`MissingArtifactError`."""
    from safetensors.numpy import load_file

    weights_path, meta_path = tier_files(root, tier, task)
    what = f"{tier} tier for task {task!r}"
    require_file(meta_path, what, root)
    require_file(weights_path, what, root)
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    return load_file(str(weights_path)), meta


def tier_artifact_exists(root: Path, tier: str, task: str) -> bool:
    """Both files present (the JSON is written last, so this also means 'complete')."""
    weights_path, meta_path = tier_files(root, tier, task)
    return weights_path.is_file() and meta_path.is_file()


def smollm2_exists(root: Path) -> bool:
    directory = smollm2_dir(root)
    return all((directory / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def coopt_dir() -> Path | None:
    """The co-optimisation iteration named by ``$ROUTENLP_COOPT_DIR``, or None (read at use time)."""
    value = os.environ.get(COOPT_ENV)
    return Path(value) if value else None


def classifier_root(root: Path, task: str) -> Path:
    """Where the classifier of ``task`` is loaded from: the co-opt iteration when it holds one, else ``root``."""
    override = coopt_dir()
    if override is not None and tier_artifact_exists(override, "classifier", task):
        return override
    return root


def smollm2_adapter_dir() -> Path | None:
    """The PEFT adapter for the SmolLM2 tier in the co-opt iteration, or None."""
    override = coopt_dir()
    if override is None:
        return None
    adapter = override / "lora" / "smollm2"
    return adapter if (adapter / "adapter_config.json").is_file() else None
