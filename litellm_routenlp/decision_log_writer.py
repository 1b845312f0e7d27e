"""The decision log's writer: a separate process that appends records to the log file and fsyncs them.

Why a process and not a thread.  A writer thread shares the GIL with the proxy's event loop: under load
it waits for the GIL after waking up, after ``write`` and again after ``fsync`` (up to Python's 5 ms switch
interval each time), and its own Python work takes turns with the loop's.  Measured inside a proxy at
40 req/s, one record took 2-5 ms p50 and 17-36 ms p90 from submission to acknowledgement that way, about
4 ms of every request's p50, against ~0.25 ms for the ``write`` + ``fsync`` themselves.  This process has
its own interpreter, so the proxy only writes the record to a pipe and reads the acknowledgement on its
event loop.

Protocol (both directions are pipes; stdin and stdout when run as a program):

* in: the records, each one JSON line ending in ``\\n`` (JSON never holds a raw newline).  Lines may
  arrive split across reads; only complete lines are committed.  End of input (the proxy closed the
  pipe, exited or was killed) commits what is complete and exits.
* out: one 16-byte frame per committed batch: the cumulative number of records done (unsigned, 8 bytes
  big-endian) and 0, or the ``errno`` of the failed ``write`` / ``fsync`` (signed, 8 bytes) when the
  batch failed.  A record is acknowledged as durable only when its frame says 0.

Group commit: everything that is pending when the writer looks (up to ``max_batch_records`` records or
about ``max_batch_bytes``) is written with ONE ``os.write`` (looping on a short write) and ONE ``fsync``;
the writer never waits for a batch to fill.  A failed batch fails every record in it; a partial line it
left is ended before the next batch so later records start clean.

This module imports only the standard library and runs under ``python -S`` (no site-packages); keep it so.
"""

from __future__ import annotations

import errno
import os
import signal
import sys

FRAME_BYTES = 16


def frame(done: int, error: int = 0) -> bytes:
    """The acknowledgement for every record up to ``done`` (cumulative), failed with ``error`` if non-zero."""
    return done.to_bytes(8, "big") + error.to_bytes(8, "big", signed=True)


def read_frame(data: bytes) -> tuple[int, int]:
    """(done, error) of one :func:`frame`."""
    return int.from_bytes(data[:8], "big"), int.from_bytes(data[8:16], "big", signed=True)


class Committer:
    """Writes batches of complete lines to ``log_fd`` and reports each batch (kept apart from the pipe loop
    so that every failure path is a plain method call)."""

    def __init__(self, log_fd: int, fsync: bool) -> None:
        self.log_fd = log_fd
        self.fsync = fsync
        self.torn = False  # a failed write left a partial line: the next batch starts with b"\n"

    def commit(self, data: bytes) -> int:
        """Write ``data`` (complete lines) and fsync it; 0, or the errno of the failure."""
        if self.torn:
            data = b"\n" + data
        written = 0
        try:
            view = memoryview(data)
            while written < len(data):
                count = os.write(self.log_fd, view[written:])
                if count <= 0:  # never for a regular file; do not spin if it happens
                    raise OSError(errno.EIO, f"write to the decision log returned {count}")
                written += count
            self.torn = False
            if self.fsync:
                os.fsync(self.log_fd)
        except OSError as error:
            if written < len(data):
                # Part of the batch may be in the file without its newline: end that line before the next
                # batch.  When nothing was written this costs at most a blank line, which readers skip.
                self.torn = not (written and data[written - 1] == 0x0A)
            return error.errno or errno.EIO
        return 0


def serve(in_fd: int, out_fd: int, log_fd: int, fsync: bool, max_batch_records: int, max_batch_bytes: int) -> None:
    """Commit the records read from ``in_fd`` until end of input, acknowledging each batch on ``out_fd``."""
    committer = Committer(log_fd, fsync)
    pending = b""  # bytes after the last complete line
    done = 0
    acks_open = True
    while True:
        try:
            chunk = os.read(in_fd, max_batch_bytes)
        except InterruptedError:
            continue
        if chunk:
            pending += chunk
            end = pending.rfind(b"\n") + 1
            if not end:
                continue
            data, pending = pending[:end], pending[end:]
        else:
            data, pending = pending[: pending.rfind(b"\n") + 1], b""  # end of input: a torn tail is dropped
            if not data:
                break
        lines = data.splitlines(keepends=True)
        for start in range(0, len(lines), max_batch_records):
            batch = lines[start:start + max_batch_records]
            error = committer.commit(b"".join(batch))
            done += len(batch)
            if acks_open:
                try:
                    os.write(out_fd, frame(done, error))  # 16 bytes: atomic on a pipe
                except OSError:  # the proxy is gone: keep committing what it sent, tell no one
                    acks_open = False
        if not chunk:
            break


def main(argv: list[str]) -> int:
    """``decision_log_writer.py LOG_FD FSYNC MAX_RECORDS MAX_BYTES``: records on stdin, frames on stdout."""
    log_fd, fsync, max_records, max_bytes = int(argv[0]), argv[1] == "1", int(argv[2]), int(argv[3])
    # Ctrl-C / SIGTERM sent to the proxy's process group must not cut off records the proxy still sends:
    # this process ends when its input ends, which the proxy's exit (even kill -9) guarantees.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve(0, 1, log_fd, fsync, max_records, max_bytes)
    os.close(log_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
