"""Reading the serving package's JSON artifacts (policy file, thresholds, posterior estimator) one way.

A missing, truncated or non-object file raises the caller's own error type with a message naming the
file, so the proxy's start-up refusal says which artifact is wrong and how to rebuild it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_json_object(path: str | os.PathLike[str], error: type[Exception], what: str = "file",
                     hint: str = "") -> dict[str, Any]:
    """The JSON object in ``path``; ``error(message)`` when it is missing, not JSON, or not an object."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{what} not found: {path}{hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as problem:
        raise error(f"{path}: not valid JSON, possibly truncated ({problem})") from None
    if not isinstance(document, dict):
        raise error(f"{path}: expected a JSON object")
    return document
