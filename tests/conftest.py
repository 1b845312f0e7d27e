"""Shared fixtures: offline environment, the real data directory, and ONE real proxy per test session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def data_dir() -> Path:
    from routenlp_core.paths import data_dir as resolve

    path = resolve()
    if not path.is_dir():
        pytest.fail(f"shared data not found at {path} (set ROUTENLP_DATA_DIR)")
    return path


# ----------------------------------------------------------------------------------------- shared helpers
# Plain functions (tests import them: ``from conftest import write_proxy_config``) because they are
# called from parametrised lambdas and module-scoped fixtures alike.


def write_proxy_config(directory: Path, mutate=None, thresholds_path: Path | None = None,
                       mutate_settings=None, **settings) -> Path:
    """``proxy_config.yaml`` of the repo, served from ``directory``: the shipped router and policy file
    (or ``thresholds_path``), the decision log at ``directory/decisions.jsonl``, ``settings`` merged into
    ``routenlp_settings``; ``mutate(document)`` / ``mutate_settings(routenlp_settings)`` edit it last."""
    import yaml

    document = yaml.safe_load((ROOT / "proxy_config.yaml").read_text())
    block = document["routenlp_settings"]
    block["router_artifact"] = str(ROOT / "artifacts/router")
    block["thresholds_path"] = str(thresholds_path or ROOT / "artifacts/thresholds.json")
    block["decision_log_path"] = str(Path(directory) / "decisions.jsonl")
    block.update(settings)
    if mutate:
        mutate(document)
    if mutate_settings:
        mutate_settings(block)
    path = Path(directory) / "proxy_config.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path
