"""Durable, append-only decision log: one JSON line per routed request.

Why JSONL and not SQLite: a line is written with a single ``write`` on an ``O_APPEND`` descriptor and
``fsync``'d before the request is acknowledged, so a record is either whole or absent after a crash,
other processes (the co-optimisation loop, ``tail -f``) can read it while the proxy runs, and a torn
last line (power loss mid-write) is detected and skipped by :func:`read_decisions` instead of
poisoning the file.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping


class DecisionLog:
    """Appends decision records to ``path``; safe to share between threads of one process."""

    def __init__(self, path: str | os.PathLike[str], fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._repair_torn_tail()

    def _repair_torn_tail(self) -> None:
        """A previous crash may have left a line without its newline: end it so new records start clean."""
        size = self.path.stat().st_size
        if size == 0:
            return
        with open(self.path, "rb") as handle:
            handle.seek(size - 1)
            if handle.read(1) != b"\n":
                os.write(self._fd, b"\n")

    def append(self, record: Mapping[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)
            if self.fsync:
                os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def read_decisions(path: str | os.PathLike[str], strict: bool = False) -> Iterator[dict[str, Any]]:
    """Yield every complete record; a torn or corrupt line is skipped (or raises when ``strict``)."""
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                if strict:
                    raise ValueError(f"{path}:{line_number}: corrupt decision record: {error}") from error
                continue
            if isinstance(record, dict):
                yield record
