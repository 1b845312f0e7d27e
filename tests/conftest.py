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
