"""The router as a separate process (``router_execution: process``): the wire format and the child's loop.

Why a process.  Inside the proxy, one static-encoder decision costs 0.65-0.75 ms of the event loop's CPU
(``benchmarks/router_in_proxy.py``), 6-11x what the same steps take in a tight loop, because LiteLLM's
own Python between two requests leaves the caches cold, and ONNX Runtime releases the GIL, so getting it
back waits behind LiteLLM's threads.  Under open-loop load every millisecond of the loop's CPU is
multiplied by queueing.  In its own process the router keeps its caches warm and its own interpreter;
the event loop only writes the query to a pipe and reads the estimates back (README, "The proxy with
the plugin vs the plain LiteLLM proxy").

Protocol (both directions are pipes; stdin and stdout of ``python -m litellm_routenlp.router_worker
CONFIG``), little-endian:

* in, one frame per query: ``<QII`` (query id, task bytes, text bytes) then the task and the text in
  UTF-8.  The proxy has already cut the text at the router's ``max_chars``.
* out, one frame per query: ``<QiiI`` (query id, K route values, K acceptance values or -1 for none,
  error bytes) then the float64 values, then the error message in UTF-8 (non-empty: the prediction
  failed and the values are absent).  Query id 0 is the ready frame, sent once the router is built
  (its error, if building failed, is the reason).
* End of input (the proxy closed the pipe, exited or was killed) ends the process; SIGINT and SIGTERM
  are ignored for that reason (stop it with SIGKILL, or by stopping the proxy).

Queries that arrive together are predicted as one batch (one encoder and one head run).
"""

from __future__ import annotations

import os
import struct
import sys
from typing import Optional, Sequence

import numpy as np

QUERY_HEADER = struct.Struct("<QII")
REPLY_HEADER = struct.Struct("<QiiI")
READY_ID = 0


def encode_query(query_id: int, task: str, text: str) -> bytes:
    task_bytes, text_bytes = task.encode("utf-8", "replace"), text.encode("utf-8", "replace")
    return QUERY_HEADER.pack(query_id, len(task_bytes), len(text_bytes)) + task_bytes + text_bytes


def decode_queries(buffer: bytearray) -> list[tuple[int, str, str]]:
    """Every complete query frame at the start of ``buffer`` (removed from it); a partial one stays."""
    queries, offset = [], 0
    while len(buffer) - offset >= QUERY_HEADER.size:
        query_id, task_len, text_len = QUERY_HEADER.unpack_from(buffer, offset)
        end = offset + QUERY_HEADER.size + task_len + text_len
        if len(buffer) < end:
            break
        start = offset + QUERY_HEADER.size
        queries.append((query_id, bytes(buffer[start:start + task_len]).decode("utf-8", "replace"),
                        bytes(buffer[start + task_len:end]).decode("utf-8", "replace")))
        offset = end
    del buffer[:offset]
    return queries


def encode_reply(query_id: int, route: Sequence[float] = (), acceptance: Optional[Sequence[float]] = None,
                 error: str = "") -> bytes:
    message = error.encode("utf-8", "replace")
    if message:
        return REPLY_HEADER.pack(query_id, 0, -1, len(message)) + message
    values = np.asarray(list(route) + list(acceptance or ()), dtype="<f8").tobytes()
    return REPLY_HEADER.pack(query_id, len(route), -1 if acceptance is None else len(acceptance), 0) + values


def decode_replies(buffer: bytearray) -> list[tuple[int, list[float], Optional[list[float]], str]]:
    """Every complete reply frame at the start of ``buffer`` (removed from it): (id, route, acceptance, error)."""
    replies, offset = [], 0
    while len(buffer) - offset >= REPLY_HEADER.size:
        query_id, n_route, n_accept, n_error = REPLY_HEADER.unpack_from(buffer, offset)
        n_values = n_route + max(n_accept, 0)
        end = offset + REPLY_HEADER.size + 8 * n_values + n_error
        if len(buffer) < end:
            break
        start = offset + REPLY_HEADER.size
        values = np.frombuffer(bytes(buffer[start:start + 8 * n_values]), dtype="<f8").tolist()
        error = bytes(buffer[start + 8 * n_values:end]).decode("utf-8", "replace")
        replies.append((query_id, values[:n_route], values[n_route:] if n_accept >= 0 else None, error))
        offset = end
    del buffer[:offset]
    return replies


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def serve(config_path: str, in_fd: int, out_fd: int) -> int:
    """Build the router ``config_path`` serves, then answer queries until end of input."""
    try:
        from .routers import router_from_config

        router, _ = router_from_config(config_path)
    except BaseException as error:  # noqa: BLE001 - reported to the proxy, which keeps routing in-process
        _write_all(out_fd, encode_reply(READY_ID, error=f"{type(error).__name__}: {error}"[:2000]))
        return 1
    _write_all(out_fd, encode_reply(READY_ID, route=[float(len(router.tiers))]))
    buffer = bytearray()
    while True:
        try:
            data = os.read(in_fd, 1 << 16)
        except InterruptedError:
            continue
        if not data:
            return 0
        buffer += data
        queries = decode_queries(buffer)
        if not queries:
            continue
        try:
            estimates = router.predict([text for _, _, text in queries], [task or "" for _, task, _ in queries])
            replies = [encode_reply(query_id, estimates.route[row].tolist(),
                                    None if estimates.acceptance is None else estimates.acceptance[row].tolist())
                       for row, (query_id, _, _) in enumerate(queries)]
        except Exception as error:  # noqa: BLE001 - each query of the batch gets the reason
            replies = [encode_reply(query_id, error=f"{type(error).__name__}: {error}"[:2000])
                       for query_id, _, _ in queries]
        try:
            _write_all(out_fd, b"".join(replies))
        except BrokenPipeError:
            return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.stderr.write("usage: python -m litellm_routenlp.router_worker PROXY_CONFIG\n")
        raise SystemExit(2)
    import signal

    # Ctrl-C or a SIGTERM of the proxy's process group stops the proxy; this process ends with its pipe
    # (end of input), so the proxy never sees it die first and reports no lost router on a clean stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    replies_fd = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a library's print() must not corrupt the frames
    raise SystemExit(serve(sys.argv[1], sys.stdin.fileno(), replies_fd))
