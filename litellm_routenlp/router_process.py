"""The proxy's side of ``router_execution: process``: queries go to :mod:`router_worker` over a pipe.

The event loop writes each query frame and reads the estimates itself (``add_reader``), so a decision
costs the loop a pipe write and a read instead of the router's own work (router_worker.py says why that
matters).  The router object built in the proxy stays: it answers whenever the process cannot --
before the process reports ready, after it died (the next query after ``restart_after_s`` starts a new
one; the wait doubles with every loss until a query is answered again, and a process that could not
build the router is not started again), when a query is not answered within ``timeout_s`` (the process
is then killed as stuck), or when the process reports an error.  So the process can make a decision
faster, never fail a request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Optional

from .pipes import read_available
from .router_worker import READY_ID, decode_replies, encode_query

logger = logging.getLogger("litellm_routenlp")

Estimates = tuple[list[float], Optional[list[float]]]


class RouterProcess:
    """One router process and the queries it has not answered yet (all on one event loop)."""

    def __init__(self, config_path: str | os.PathLike[str], tiers: int, timeout_s: float = 1.0,
                 restart_after_s: float = 5.0) -> None:
        self.config_path = str(Path(config_path).resolve())
        self.tiers = tiers
        self.timeout_s = timeout_s
        self.restart_after_s = restart_after_s
        self.answered = 0        # queries the process answered
        self.fell_back = 0       # queries the caller had to predict in the proxy instead
        self.starts = 0
        self.gave_up: Optional[str] = None  # why no process will be started again (it cannot build the router)
        self._losses = 0         # losses since the last answered query: each doubles the wait before a restart
        self._process: Optional[subprocess.Popen] = None
        self._send_fd = self._reply_fd = -1
        self._ready = False
        self._lost_at = -float("inf")
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._replies = bytearray()
        self._backlog = bytearray()
        self._pending: dict[int, asyncio.Future] = {}
        self._next_id = READY_ID + 1
        self._finalizer: Optional[weakref.finalize] = None
        self.start()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the process (it builds the router from the proxy config, then sends the ready frame)."""
        process = subprocess.Popen([sys.executable, "-m", "litellm_routenlp.router_worker", self.config_path],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, close_fds=True)
        assert process.stdin is not None and process.stdout is not None
        self._send_fd, self._reply_fd = os.dup(process.stdin.fileno()), os.dup(process.stdout.fileno())
        process.stdin.close()
        process.stdout.close()
        os.set_blocking(self._send_fd, False)
        os.set_blocking(self._reply_fd, False)
        self._process, self._ready, self._loop = process, False, None
        self._replies.clear()
        self._backlog.clear()
        self.starts += 1
        self._finalizer = weakref.finalize(self, _close_fds, self._send_fd, self._reply_fd)

    @property
    def ready(self) -> bool:
        return self._process is not None and self._ready

    @property
    def pid(self) -> Optional[int]:
        return None if self._process is None else self._process.pid

    def close(self) -> None:
        """End the process (end of input) and fail what it has not answered (the callers fall back)."""
        self._lost("closed", kill=False)

    def restart_delay_s(self) -> float:
        """How long after a loss the next query starts a new process: ``restart_after_s``, doubled for every
        loss since the last answered query (at most 64x), so a process that keeps dying costs little."""
        return self.restart_after_s * 2 ** min(max(self._losses - 1, 0), 6)

    def _lost(self, why: str, kill: bool = True) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        self._lost_at = time.monotonic()
        self._losses += 1
        self._unwatch()
        if self._finalizer is not None:
            self._finalizer()  # closes both pipes: the process sees end of input
        if kill and process.poll() is None:
            process.kill()
        try:
            process.wait(timeout=0 if kill else 2)
        except subprocess.TimeoutExpired:
            pass
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_result(None)
        if self.gave_up is not None:
            logger.error("RouteNLP: router process %s (%s); routing in the proxy from now on", process.pid, why)
        elif why != "closed":
            logger.warning("RouteNLP: router process %s (%s); routing in the proxy until it restarts in %.0f s",
                           process.pid, why, self.restart_delay_s())

    # ------------------------------------------------------------------ one query
    async def predict(self, text: str, task: str) -> Optional[Estimates]:
        """The router's (route, acceptance) for one query, or None: predict in the proxy instead."""
        loop = asyncio.get_running_loop()
        if (self._process is None and self.gave_up is None
                and time.monotonic() - self._lost_at >= self.restart_delay_s()):
            self.start()
        if self._process is None:
            self.fell_back += 1
            return None
        if self._loop is not loop:
            self._watch(loop)
        if not self._ready:
            self._drain()  # the ready frame may be waiting
            if not self._ready:
                self.fell_back += 1
                return None
        query_id, self._next_id = self._next_id, self._next_id + 1
        future = loop.create_future()
        self._pending[query_id] = future
        self._send(encode_query(query_id, task, text))
        timer = loop.call_later(self.timeout_s, self._overdue, query_id)
        try:
            estimates = await future
        finally:
            timer.cancel()
            self._pending.pop(query_id, None)
        if estimates is None:
            self.fell_back += 1
        else:
            self.answered += 1
        return estimates

    def _unwatch(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.remove_reader(self._reply_fd)
                self._loop.remove_writer(self._send_fd)
            except (RuntimeError, ValueError, OSError):  # another thread's loop, or closed meanwhile
                pass

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not None:
            self._unwatch()
            for future in self._pending.values():  # futures of another loop cannot be resolved from this one
                try:
                    future.get_loop().call_soon_threadsafe(_settle_none, future)
                except RuntimeError:  # that loop is closed: nobody waits on it any more
                    pass
            self._pending = {}
        loop.add_reader(self._reply_fd, self._drain)
        self._loop = loop

    def _send(self, frame: bytes) -> None:
        if self._backlog:
            self._backlog += frame
            return
        try:
            written = os.write(self._send_fd, frame)
        except BlockingIOError:
            written = 0
        except OSError as error:  # EPIPE: it died; the reader sees the end of its output too
            self._lost(f"pipe closed: {error}")
            return
        if written < len(frame):
            self._backlog += frame[written:]
            assert self._loop is not None
            self._loop.add_writer(self._send_fd, self._flush)

    def _flush(self) -> None:
        try:
            written = os.write(self._send_fd, self._backlog)
        except BlockingIOError:
            return
        except OSError as error:
            self._lost(f"pipe closed: {error}")
            return
        del self._backlog[:written]
        if not self._backlog and self._loop is not None:
            self._loop.remove_writer(self._send_fd)

    def _overdue(self, query_id: int) -> None:
        if query_id in self._pending:
            self._lost(f"no answer within {self.timeout_s:g} s: killed as stuck")

    def _drain(self) -> None:
        if self._process is None:
            return
        data = read_available(self._reply_fd)
        if data is None:
            return
        if not data:
            code = self._process.poll()
            self._lost("exited" if code is None else f"exited with status {code}")
            return
        self._replies += data
        for query_id, route, acceptance, error in decode_replies(self._replies):
            if query_id == READY_ID:
                if error:  # the same config would fail the same way: do not start it again
                    self.gave_up = f"could not build the router: {error}"
                    self._lost(self.gave_up)
                    return
                self._ready = True
                continue
            future = self._pending.pop(query_id, None)
            if future is None or future.done():
                continue  # overdue or cancelled meanwhile
            if error or len(route) != self.tiers:
                logger.warning("RouteNLP: router process could not predict (%s); predicting in the proxy",
                               error or f"{len(route)} route values for {self.tiers} tiers")
                future.set_result(None)
            else:
                self._losses = 0
                future.set_result((route, acceptance))


def _settle_none(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
