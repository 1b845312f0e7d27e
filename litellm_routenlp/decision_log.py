"""Durable, append-only decision log: one JSON line per routed request.

Why JSONL and not SQLite: records are written with a single ``write`` on an ``O_APPEND`` descriptor and
``fsync``'d before the request is acknowledged, so a record is either whole or absent after a crash,
other processes (the co-optimisation loop, ``tail -f``) can read it while the proxy runs, and a torn
last line (power loss mid-write) is detected and skipped by :func:`read_decisions` instead of
poisoning the file.

The writer is a separate process (:mod:`litellm_routenlp.decision_log_writer`, which says why: a writer
thread waits for the GIL three times per batch under load).  Callers serialise their record themselves
and send the line down a pipe; the writer commits whatever is pending with one ``write`` and one
``fsync`` (group commit) and sends back an acknowledgement frame.  :meth:`DecisionLog.append_async`
reads the acknowledgements on the caller's event loop (``add_reader``: no thread hop at all);
:meth:`DecisionLog.append` waits for them in its own thread.

Durability contract (unchanged by the batching or the process), in the default ``durability="on_disk"``:
``append`` / ``append_async`` return, and so the request's answer leaves, only after the writer reported
that record written and ``fsync``'d (when ``fsync`` is on).  Batching only shares one ``fsync`` between records that arrived
together; it never delays a record to wait for others.  A failed batch fails every caller in it with
the ``OSError`` of the failed call.  If the writer process dies, every record not yet acknowledged fails
(``OSError`` EIO) and the next record starts a new writer, which first ends any torn last line.  If the
proxy dies (even ``kill -9``, of the proxy or of its process group: the writer runs in its own
session), the writer still commits every complete record it was sent, then exits.

The opt-out, ``durability="handed_off"`` (``routenlp_settings.decision_log_durability``): ``append`` /
``append_async`` return as soon as the record's line is in the writer's pipe, which is at once unless
the pipe is full.  The writer commits it with its next batch, a fraction of a millisecond to a few
milliseconds later, so the answer no longer waits for the ``fsync`` and the writer's wake-up.  What
that gives up: a record is lost if the machine loses power or the writer process itself is killed
(``SIGKILL`` of its session, the OOM killer) between the answer and that commit.  A crash or ``kill -9``
of the proxy still loses nothing it answered.  A write or ``fsync`` that fails after the answer left is
counted (:attr:`DecisionLog.failed_after_answer`) and logged as an error naming the count.

Field cap.  Every string in a record is stored with at most :data:`FIELD_LIMIT` characters; a longer
one keeps its first ``FIELD_LIMIT`` characters followed by the marker ``"…[+N chars cut]"`` (N the
characters dropped), so a 5 MB prompt costs one ~8 KB line, and a reader can tell a cut field from a
whole one (:func:`was_cut`).  Strings are cut in the caller's thread, before serialising.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import json
import logging
import os
import select
import subprocess
import sys
import threading
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from routenlp_core.decision_record import DecisionRecord

from . import decision_log_writer
from .decision_log_writer import FRAME_BYTES, read_frame
from .pipes import read_available

logger = logging.getLogger("litellm_routenlp")

DURABILITY = ("on_disk", "handed_off")  # module docstring
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
    """Raised by ``append`` / ``append_async`` after :meth:`DecisionLog.close`."""


@dataclass
class WriterLink:
    """The two pipe ends to one writer, and how to wait for it to end.  ``send_fd`` takes record lines,
    ``ack_fd`` gives frames; :meth:`join` waits until the writer has committed everything and exited."""

    send_fd: int
    ack_fd: int
    join: Callable[[], None]
    alive: Callable[[], bool]
    pid: int | None = None


def start_writer_process(log_fd: int, fsync: bool, max_batch_records: int, max_batch_bytes: int) -> WriterLink:
    """Start :mod:`decision_log_writer` as a process (``python -S``: it needs no site-packages)."""
    process = subprocess.Popen(
        [sys.executable, "-S", "-E", decision_log_writer.__file__, str(log_fd), "1" if fsync else "0",
         str(max_batch_records), str(max_batch_bytes)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(log_fd,), close_fds=True, bufsize=0,
        start_new_session=True)  # a kill of the proxy's process group leaves it to commit what it was sent
    assert process.stdin is not None and process.stdout is not None
    send_fd, ack_fd = os.dup(process.stdin.fileno()), os.dup(process.stdout.fileno())
    process.stdin.close()
    process.stdout.close()
    return WriterLink(send_fd, ack_fd, process.wait, lambda: process.poll() is None, process.pid)


#: How a :class:`DecisionLog` starts its writer (tests swap in a thread running the same ``serve``).
start_writer: Callable[[int, bool, int, int], WriterLink] = start_writer_process


@dataclass
class _Waiter:
    """Who waits for one record: an asyncio future on ``loop``, or a ``concurrent.futures.Future``.
    ``done_at`` is the record's number with the current writer (``on_disk``: resolved by the writer's
    acknowledgement), or the byte offset its line ends at (``handed_off``: resolved once in the pipe)."""

    done_at: int
    future: Any
    loop: asyncio.AbstractEventLoop | None = None


@dataclass
class _State:
    """Everything the log shares between threads, kept apart from :class:`DecisionLog` so that the
    finalizer (an unclosed log garbage-collected, or still open at exit) holds no reference to the log."""

    path: Path
    fd: int
    fsync: bool
    max_batch_records: int
    max_batch_bytes: int
    durability: str = "on_disk"
    lock: threading.Lock = field(default_factory=threading.Lock)
    link: WriterLink | None = None
    sent: int = 0  # records sent to the current writer
    done: int = 0  # records it acknowledged (or failed)
    backlog: bytearray = field(default_factory=bytearray)  # lines the pipe did not take yet
    acks: bytes = b""  # a partial frame
    waiters: collections.deque = field(default_factory=collections.deque)  # on_disk: until acknowledged
    handoffs: collections.deque = field(default_factory=collections.deque)  # handed_off: until in the pipe
    queued: int = 0  # bytes of lines given to the current writer's backlog
    piped: int = 0  # bytes of them written into its pipe
    failed_after_answer: int = 0  # handed_off: records whose commit failed or was lost after they returned
    loops: dict = field(default_factory=dict)  # event loop -> the ack fd its reader watches
    closed: bool = False
    commits: int = 0  # batches acknowledged: how many fsyncs the records shared

    # ------------------------------------------------------------------ writer lifecycle (lock held)
    def ensure_writer(self) -> WriterLink:
        if self.link is not None and not self.link.alive():
            self.writer_lost("exited")  # its unacknowledged records fail; this one goes to a new writer
        if self.link is None:
            repair_torn_tail(self.path, self.fd)
            self.link = start_writer(self.fd, self.fsync, self.max_batch_records, self.max_batch_bytes)
            os.set_blocking(self.link.send_fd, False)
            os.set_blocking(self.link.ack_fd, False)
            self.sent = self.done = self.queued = self.piped = 0
            self.acks = b""
        return self.link

    def writer_lost(self, why: str) -> None:
        """The writer is gone: fail what it did not acknowledge; the next record starts a new one."""
        link, self.link = self.link, None
        if link is None:
            return
        self._unwatch(link.ack_fd)
        error = OSError(errno.EIO, f"decision log writer for {self.path.name} {why}; record not known to be on disk")
        if self.durability == "handed_off":
            self.lost_after_answer(self.sent - self.done - len(self.handoffs), f"the writer {why}")
        while self.waiters:
            resolve(self.waiters.popleft(), error)
        while self.handoffs:
            resolve(self.handoffs.popleft(), error)
        self.backlog.clear()
        for fd in (link.send_fd, link.ack_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            link.join()
        except Exception:  # noqa: BLE001 - it is gone either way
            pass

    def _unwatch(self, ack_fd: int) -> None:
        for loop, fd in list(self.loops.items()):
            if fd != ack_fd:
                continue
            del self.loops[loop]
            if loop.is_closed():
                continue
            try:
                if _in_loop_thread(loop):
                    loop.remove_reader(fd)
                else:
                    loop.call_soon_threadsafe(loop.remove_reader, fd)
            except RuntimeError:  # the loop closed meanwhile
                pass

    # ------------------------------------------------------------------ sending and acknowledging
    def send(self, line: bytes, waiter_for: Callable[[int], _Waiter],
             loop: asyncio.AbstractEventLoop | None = None) -> _Waiter:
        with self.lock:
            if self.closed:
                raise DecisionLogClosed("decision log is closed: no record can be appended after close()")
            link = self.ensure_writer()
            if loop is not None:
                self.watch(loop)
            self.sent += 1
            self.backlog += line
            self.queued += len(line)
            if self.durability == "on_disk":
                waiter = waiter_for(self.sent)
                self.waiters.append(waiter)
            else:
                waiter = waiter_for(self.queued)
                self.handoffs.append(waiter)
            self.flush(link)
            return waiter

    def lost_after_answer(self, count: int, why: str) -> None:
        """handed_off: ``count`` records that already returned are not known to be on disk (lock held)."""
        if count <= 0:
            return
        self.failed_after_answer += count
        logger.error("RouteNLP: %d decision record(s) of %s returned before their commit and are not known to "
                     "be on disk (%s); %d so far (decision_log_durability: handed_off)",
                     count, self.path.name, why, self.failed_after_answer)

    def _piped(self, count: int) -> None:
        """``count`` more backlog bytes are in the pipe: release the handed-off records they complete."""
        del self.backlog[:count]
        self.piped += count
        while self.handoffs and self.handoffs[0].done_at <= self.piped:
            resolve(self.handoffs.popleft(), None)

    def flush(self, link: WriterLink) -> None:
        """Write as much of the backlog as the pipe takes now (never blocks; the rest goes with the next
        acknowledgement, which means the writer has read from the pipe)."""
        while self.backlog:
            try:
                count = os.write(link.send_fd, self.backlog)
            except BlockingIOError:
                return
            except OSError:  # EPIPE: the writer died
                self.writer_lost("exited")
                return
            self._piped(count)

    def drain(self) -> None:
        """Read every frame that has arrived and resolve the records it covers (any thread, never blocks)."""
        with self.lock:
            link = self.link
            if link is None:
                return
            data = read_available(link.ack_fd)
            if data is None:
                return
            if not data:
                self.writer_lost("exited")
                return
            data = self.acks + data
            whole = len(data) - len(data) % FRAME_BYTES
            self.acks = data[whole:]
            for start in range(0, whole, FRAME_BYTES):
                done, code = read_frame(data[start:start + FRAME_BYTES])
                error = None if code == 0 else OSError(code, f"{os.strerror(code)} (decision log {self.path.name})")
                self.commits += 1
                if error is not None and self.durability == "handed_off":
                    self.lost_after_answer(done - self.done, str(error))
                self.done = done
                while self.waiters and self.waiters[0].done_at <= done:
                    resolve(self.waiters.popleft(), error)
            self.flush(link)

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Make ``loop`` read the acknowledgements itself (lock held)."""
        ack_fd = self.ensure_writer().ack_fd
        if self.loops.get(loop) != ack_fd:
            loop.add_reader(ack_fd, self.drain)
            self.loops[loop] = ack_fd

    def wait(self, waiter: _Waiter) -> None:
        """Block this thread until ``waiter`` is resolved, reading acknowledgements meanwhile."""
        while not waiter.future.done():
            link = self.link
            if link is None:  # lost: its waiters were failed
                break
            try:
                select.select([link.ack_fd], [], [], 0.05)
            except (OSError, ValueError):  # closed meanwhile by another thread
                pass
            self.drain()

    def stop(self) -> None:
        """Send what is queued, let the writer commit it and exit, resolve every waiter (idempotent)."""
        with self.lock:
            self.closed = True
            link = self.link
            if link is not None:
                os.set_blocking(link.send_fd, True)
                try:
                    while self.backlog:
                        self._piped(os.write(link.send_fd, self.backlog))
                except OSError:
                    self.backlog.clear()
                os.close(link.send_fd)  # end of input: the writer commits the rest, acknowledges it and exits
                link.send_fd = -1
        while self.link is link and link is not None:  # until drain() reads the writer's end of output
            try:
                select.select([link.ack_fd], [], [], 0.05)
            except (OSError, ValueError):
                pass
            self.drain()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _in_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled: its record is written all the same
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def resolve(waiter: _Waiter, error: BaseException | None) -> None:
    """Tell one waiter its record is durable (``error`` None) or failed, in the waiter's own thread or loop."""
    if waiter.loop is None:
        if error is None:
            waiter.future.set_result(None)
        else:
            waiter.future.set_exception(error)
    elif _in_loop_thread(waiter.loop):
        _settle(waiter.future, error)
    elif not waiter.loop.is_closed():
        waiter.loop.call_soon_threadsafe(_settle, waiter.future, error)


def repair_torn_tail(path: Path, fd: int) -> None:
    """A previous crash may have left a line without its newline: end it so new records start clean."""
    size = os.fstat(fd).st_size
    if size == 0:
        return
    with open(path, "rb") as handle:
        handle.seek(size - 1)
        if handle.read(1) != b"\n":
            os.write(fd, b"\n")


class DecisionLog:
    """Appends decision records to ``path``; safe to share between threads and event loops of one process.

    ``append`` (blocking) and ``append_async`` (awaitable) return only once the writer process reports the
    record on disk, or with ``durability="handed_off"`` once the record is in the writer's pipe (module
    docstring).
    """

    def __init__(self, path: str | os.PathLike[str], fsync: bool = True, *, durability: str = "on_disk",
                 max_batch_records: int = 256, max_batch_bytes: int = 256 << 10) -> None:
        if max_batch_records < 1 or max_batch_bytes < 1:
            raise ValueError("max_batch_records and max_batch_bytes must be >= 1")
        if durability not in DURABILITY:
            raise ValueError(f"durability must be one of {DURABILITY}, not {durability!r}")
        self.durability = durability
        self.path = Path(path)
        self.fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._state = _State(self.path, fd, fsync, max_batch_records, max_batch_bytes, durability)
        with self._state.lock:
            self._state.ensure_writer()  # start it now: the first answer should not wait for a process start
        self._finalizer = weakref.finalize(self, self._state.stop)

    @property
    def commits(self) -> int:
        """Batches acknowledged so far (each one ``write`` and one ``fsync``), for tests and benchmarks."""
        return self._state.commits

    @property
    def failed_after_answer(self) -> int:
        """``handed_off``: records that returned but whose commit failed or whose writer was lost first."""
        return self._state.failed_after_answer

    @property
    def writer_pid(self) -> int | None:
        """The writer process's pid (None between a lost writer and the next record)."""
        link = self._state.link
        return link.pid if link is not None else None

    @staticmethod
    def _line(record: DecisionRecord | Mapping[str, Any]) -> bytes:
        """The record's one serialisation (a :class:`DecisionRecord`, or a mapping already in its shape)."""
        raw = record.to_dict() if isinstance(record, DecisionRecord) else record
        return (json.dumps(cap_strings(raw), ensure_ascii=False, separators=(",", ":"), default=str) + "\n").encode()

    def append(self, record: DecisionRecord | Mapping[str, Any]) -> None:
        """Blocking append: returns once the record is on disk, or in the pipe when handed off (raises the
        writer's ``OSError`` if not)."""
        line = self._line(record)  # a bad record fails here, in the caller
        waiter = self._state.send(line, lambda done_at: _Waiter(done_at, Future()))
        self._state.wait(waiter)
        waiter.future.result()

    async def append_async(self, record: DecisionRecord | Mapping[str, Any]) -> None:
        """Awaitable append for the event loop, which reads the writer's acknowledgement itself."""
        line = self._line(record)
        loop = asyncio.get_running_loop()
        waiter = self._state.send(line, lambda done_at: _Waiter(done_at, loop.create_future(), loop), loop)
        # Awaited through a shield-free future: a cancelled caller stops waiting, its record is still written.
        # A handed-off record is usually in the pipe already: awaiting a done future does not yield.
        await waiter.future

    def close(self) -> None:
        """Commit every record already sent, stop the writer and close the descriptor (idempotent)."""
        self._finalizer()


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
