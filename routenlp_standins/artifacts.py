"""Where the stand-in tiers keep their built artifacts, and the one error a missing artifact raises.

Layout under the artifacts root::

    encoder/                          MiniLM ONNX encoder (written by `routenlp export-encoder`)
    tiers/classifier/<task>.safetensors|json    T1 logistic-regression head
    tiers/retrieval/<task>.safetensors|json     T3 k-NN index
    smollm2/                          T2 transformers-format copy of SmolLM2-135M-Instruct

Weights go to safetensors and metadata to JSON: nothing here is ever pickled.

Co-optimisation (``routenlp coopt``) writes distilled tiers into an iteration directory with the same
layout (``tiers/classifier/<task>.*``) plus ``lora/smollm2/`` (a PEFT adapter); the classifier of a
task it holds and the adapter it holds are served instead of the base artifacts.

Which directories a stand-in deployment serves is explicit configuration, :class:`StandinDirs`, read
from the deployment's ``model_info`` (``routenlp_artifacts_dir``, ``routenlp_coopt_dir``: absolute
paths; ``coopt.versions`` writes them into every config it generates).  ``model_info`` and not
``litellm_params`` because LiteLLM's router overwrites ``model_info`` with the deployment's own on
every call, while a client's request body can override any extra ``litellm_params`` key (checked on
LiteLLM 1.106.2): a client must not be able to point a tier at another directory.  A deployment that
names no artifacts root gets :func:`default_artifacts_root`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
from safetensors.numpy import load_file, save_file

from routenlp_core.paths import project_root

PROVIDER = "routenlp-local"  # the LiteLLM custom provider serving the stand-ins (routenlp_standins.handler)
TIER_NAMES = ("classifier", "smollm2", "retrieval", "replay")  # T1..T4, cheapest first
ARTIFACTS_ENV = "ROUTENLP_ARTIFACTS_DIR"  # user-facing default of the artifacts root, read only below
ARTIFACTS_KEY = "routenlp_artifacts_dir"  # model_info keys of a stand-in deployment
COOPT_KEY = "routenlp_coopt_dir"
BUILD_COMMAND = "python -m routenlp_standins build"


class MissingArtifactError(FileNotFoundError):
    """A stand-in tier's artifact is absent; the message names the file and the command that builds it."""


class StandinConfigError(ValueError):
    """A stand-in deployment's ``model_info`` names its directories wrongly (the message names the field)."""


def default_artifacts_root() -> Path:
    """The artifacts root of a deployment (or command) that names none: ``$ROUTENLP_ARTIFACTS_DIR``, else
    ``<project root>/artifacts``.

    The one place the environment is read: a user-facing default (one setting for a container whose
    artifacts live elsewhere), never the channel ``coopt`` uses -- that writes ``model_info``.
    """
    override = os.environ.get(ARTIFACTS_ENV)
    return Path(override).expanduser() if override else project_root() / "artifacts"


@dataclass(frozen=True)
class StandinDirs:
    """What one stand-in deployment serves: the base artifacts, and optionally a co-optimisation iteration
    whose distilled tiers (classifier heads, the SmolLM2 adapter) replace the base ones."""

    artifacts: Path
    coopt: Optional[Path] = None

    @classmethod
    def default(cls) -> "StandinDirs":
        return cls(default_artifacts_root())

    @classmethod
    def from_model_info(cls, model_info: Optional[Mapping[str, Any]], where: str = "model_info",
                        default_artifacts: Optional[Path] = None) -> "StandinDirs":
        """The directories a deployment's ``model_info`` names (no artifacts root: ``default_artifacts``,
        else :func:`default_artifacts_root`); a relative path or a non-string raises
        :class:`StandinConfigError` naming ``where.<key>`` (relative to what would be a guess: the
        proxy's working directory and the config's folder differ)."""
        info = model_info or {}

        def path(key: str) -> Optional[Path]:
            value = info.get(key)
            if value is None:
                return None
            if not isinstance(value, (str, os.PathLike)) or not Path(value).is_absolute():
                raise StandinConfigError(f"{where}.{key} must be an absolute path, got {value!r}")
            return Path(value)

        return cls(path(ARTIFACTS_KEY) or default_artifacts or default_artifacts_root(), path(COOPT_KEY))

    def as_model_info(self) -> dict[str, str]:
        """The ``model_info`` entries naming these directories (absolute), for a generated proxy config."""
        entries = {ARTIFACTS_KEY: str(Path(self.artifacts).resolve())}
        if self.coopt is not None:
            entries[COOPT_KEY] = str(Path(self.coopt).resolve())
        return entries


def is_standin(deployment: Mapping[str, Any]) -> bool:
    """Whether a proxy-config deployment is served by the stand-ins (``routenlp-local/<tier>``)."""
    return str((deployment.get("litellm_params") or {}).get("model", "")).startswith(PROVIDER + "/")


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


def classifier_root(dirs: StandinDirs, task: str) -> Path:
    """Where the classifier of ``task`` is loaded from: the co-opt iteration when it holds one, else the base."""
    if dirs.coopt is not None and tier_artifact_exists(dirs.coopt, "classifier", task):
        return dirs.coopt
    return dirs.artifacts


def smollm2_adapter_dir(dirs: StandinDirs) -> Path | None:
    """The PEFT adapter for the SmolLM2 tier in the co-opt iteration, or None."""
    if dirs.coopt is None:
        return None
    adapter = dirs.coopt / "lora" / "smollm2"
    return adapter if (adapter / "adapter_config.json").is_file() else None
