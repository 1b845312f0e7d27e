"""Durable, append-only decision log: one JSON line per routed request.

Why JSONL and not SQLite: records are written with a single ``write`` on an ``O_APPEND`` descriptor and
``fsync``'d before the request is acknowledged, so a record is either whole or absent after a crash,
other processes (the co-optimisation loop, ``tail -f``) can read it while the proxy runs, and a torn
last line (power loss mid-write) is detected and skipped by :func:`read_decisions` instead of
poisoning the file.

Group commit.  Under load (tens to hundreds of concurrent requests) one ``fsync`` per record, each
behind a thread hop, is most of the plugin's per-request cost.  So one daemon writer thread per log
owns the descriptor: callers serialise their record themselves and enqueue it (:meth:`DecisionLog.submit`
returns a :class:`concurrent.futures.Future`, :meth:`DecisionLog.append_async` awaits it without a
thread hop); the writer takes everything that is pending (up to ``max_batch_records`` records or about
``max_batch_bytes``), writes it with ONE ``os.write`` of the concatenated lines (looping only on a short
write), ONE ``fsync``, and only then resolves every future of the batch (or fails them all with the
error).

Durability contract (unchanged by the batching): a future resolves, and so ``append`` /
``append_async`` return and the request's answer leaves, only after that record has been written and
``fsync``'d (when ``fsync`` is on).  Batching only shares one ``fsync`` between records that arrived
together; it never delays a record to wait for others: the writer does not wait for a batch to fill,
it drains whatever is queued and then blocks, so an idle proxy pays one write + one fsync per request
as before.  A failed batch fails every caller in it; its records may or may not be in the file (as
with a failed write/fsync before), and a partial line it left is ended so later records start clean.

Field cap.  Every string in a record is stored with at most :data:`FIELD_LIMIT` characters; a longer
one keeps its first ``FIELD_LIMIT`` characters followed by the marker ``"…[+N chars cut]"`` (N the
characters dropped), so a 5 MB prompt costs one ~8 KB line, and a reader can tell a cut field from a
whole one (:func:`was_cut`).  Strings are cut in the caller's thread, before serialising.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import queue
import threading
import weakref
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Iterator, Mapping

from routenlp_core.decision_record import DecisionRecord

_STOP = object()  # queued by close(): everything queued before it is committed, then the writer exits
FIELD_LIMIT = 8192  # characters kept per string field of a record (module docstring)
CUT_MARKER = "…[+{} chars cut]"


def cap_field(text: str, limit: int = FIELD_LIMIT) -> str:
    """``text`` itself, or its first ``limit`` characters plus the cut marker."""
    if len(text) <= limit:
        return text
    return text[:limit] + CUT_MARKER.format(len(text) - limit)


def was_cut(text: Any) -> bool:
    """Did :func:`cap_field` cut this stored string?"""
    return isinstance(text, str) and text.endswith(" chars cut]") and "…[+" in text[-40:]


def cap_strings(value: Any, limit: int = FIELD_LIMIT) -> Any:
    """A copy of ``value`` (JSON-like) with every string capped by :func:`cap_field`."""
    if isinstance(value, str):
        return cap_field(value, limit)
    if isinstance(value, Mapping):
        return {key: cap_strings(item, limit) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [cap_strings(item, limit) for item in value]
    return value


class DecisionLogClosed(RuntimeError):
    """Raised by ``submit`` / ``append`` / ``append_async`` after :meth:`DecisionLog.close`."""


class _Writer:
    """The writer thread's state.  Kept apart from :class:`DecisionLog` so that the thread does not keep
    the log alive: an unclosed log that is garbage-collected (or still open at interpreter exit) is
    flushed and closed by a ``weakref.finalize``."""

    def __init__(self, fd: int, path: Path, fsync: bool, max_batch_records: int, max_batch_bytes: int) -> None:
        self.fd = fd
        self.fsync = fsync
        self.max_batch_records = max_batch_records
        self.max_batch_bytes = max_batch_bytes
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        # orders submit() against stop(): no record can be queued after _STOP, so none is left unresolved
        self.lock = threading.Lock()
        self.closed = False
        self.torn = False  # a failed write left a partial line: the next batch starts with b"\n"
        self.thread = threading.Thread(target=self.run, name=f"decision-log-writer:{path.name}", daemon=True)
        self.thread.start()

    def submit(self, line: bytes) -> Future:
        future: Future = Future()
        with self.lock:
            if self.closed:
                raise DecisionLogClosed("decision log is closed: no record can be appended after close()")
            self.queue.put((line, future))
        return future

    def stop(self) -> None:
        """Flush what is queued, stop the thread and close the descriptor (idempotent)."""
        with self.lock:
            if not self.closed:
                self.closed = True
                self.queue.put(_STOP)
        if threading.current_thread() is not self.thread:
            self.thread.join()

    def run(self) -> None:
        get, get_nowait = self.queue.get, self.queue.get_nowait
        while True:
            item = get()  # block while idle; the first record of a batch is written at once
            stop = item is _STOP
            lines: list[bytes] = []
            futures: list[Future] = []
            size = 0
            while not stop:
                line, future = item
                lines.append(line)
                futures.append(future)
                size += len(line)
                if len(lines) >= self.max_batch_records or size >= self.max_batch_bytes:
                    break
                try:
                    item = get_nowait()  # whatever else is already pending joins this batch; never wait
                except queue.Empty:
                    break
                stop = item is _STOP
            if lines:
                self.commit(lines, futures)
            if stop:
                break
        os.close(self.fd)
        self.fd = -1

    def commit(self, lines: list[bytes], futures: list[Future]) -> None:
        # A caller that gave up (cancelled asyncio task) still gets its record written, as it did when the
        # write ran in a worker thread; it just is not notified.  After this, no future can be cancelled.
        live = [future for future in futures if future.set_running_or_notify_cancel()]
        data = b"".join(lines)
        if self.torn:
            data = b"\n" + data
        written = 0
        try:
            view = memoryview(data)
            while written < len(data):
                count = os.write(self.fd, view[written:])
                if count <= 0:  # never for a regular file; do not spin if it happens
                    raise OSError(errno.EIO, f"write to the decision log returned {count}")
                written += count
            self.torn = False
            if self.fsync:
                os.fsync(self.fd)
        except BaseException as error:  # noqa: BLE001 - every waiting caller must hear about it
            if written < len(data):
                # Part of the batch may be in the file without its newline (a short write, then an error;
                # or a failing call that wrote some bytes anyway): end that line before the next batch.
                # When nothing was written this costs at most a blank line, which readers skip.
                self.torn = not (written and data[written - 1] == 0x0A)
            for future in live:
                future.set_exception(error)
            return
        for future in live:
            future.set_result(None)


class DecisionLog:
    """Appends decision records to ``path``; safe to share between threads and event loops of one process.

    ``append`` (blocking), ``append_async`` (awaitable) and ``submit`` (a future) all go through the
    group-commit writer described in the module docstring and return / resolve only once the record is
    on disk.
    """

    def __init__(self, path: str | os.PathLike[str], fsync: bool = True, *,
                 max_batch_records: int = 256, max_batch_bytes: int = 256 << 10) -> None:
        if max_batch_records < 1 or max_batch_bytes < 1:
            raise ValueError("max_batch_records and max_batch_bytes must be >= 1")
        self.path = Path(path)
        self.fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._repair_torn_tail()
        self._writer = _Writer(self._fd, self.path, fsync, max_batch_records, max_batch_bytes)
        self._finalizer = weakref.finalize(self, self._writer.stop)

    def _repair_torn_tail(self) -> None:
        """A previous crash may have left a line without its newline: end it so new records start clean."""
        size = self.path.stat().st_size
        if size == 0:
            return
        with open(self.path, "rb") as handle:
            handle.seek(size - 1)
            if handle.read(1) != b"\n":
                os.write(self._fd, b"\n")

    @staticmethod
    def _line(record: DecisionRecord | Mapping[str, Any]) -> bytes:
        """The record's one serialisation (a :class:`DecisionRecord`, or a mapping already in its shape)."""
        raw = record.to_dict() if isinstance(record, DecisionRecord) else record
        return (json.dumps(cap_strings(raw), ensure_ascii=False, separators=(",", ":"), default=str) + "\n").encode()

    def submit(self, record: DecisionRecord | Mapping[str, Any]) -> Future:
        """Serialise ``record`` here (so a bad record fails in the caller) and queue it for the writer.

        The future resolves to ``None`` once the record is written and fsync'd, or raises the write/fsync
        error.  Raises :class:`DecisionLogClosed` after :meth:`close`.
        """
        return self._writer.submit(self._line(record))

    def append(self, record: DecisionRecord | Mapping[str, Any]) -> None:
        """Blocking append: returns once the record is on disk."""
        self.submit(record).result()

    async def append_async(self, record: DecisionRecord | Mapping[str, Any]) -> None:
        """Awaitable append for the event loop (no worker-thread hop): returns once the record is on disk."""
        await asyncio.wrap_future(self.submit(record))

    def close(self) -> None:
        """Commit every record already submitted, stop the writer thread and close the descriptor."""
        self._finalizer()
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


def read_records(path: str | os.PathLike[str], strict: bool = False) -> Iterator[DecisionRecord]:
    """Every complete record as a :class:`DecisionRecord` (any version); one that is not a record at all
    (no request id, an unknown version) is skipped, or raises naming file:line when ``strict``."""
    for line_number, raw in enumerate(read_decisions(path, strict=strict), start=1):
        try:
            yield DecisionRecord.from_dict(raw)
        except ValueError as error:
            if strict:
                raise ValueError(f"{path}: record {line_number}: {error}") from None
