"""Decision-log append cost under concurrency: per-record fsync (the old path) vs group commit.

    .venv/bin/python benchmarks/decision_log_throughput.py [--records 5000] [--concurrency 1 50 200]
                                                           [--dir DIR] [--repeats 1]

Each run appends ``--records`` decision-sized JSON records to a fresh, fsync'd log, spread over C
concurrent asyncio tasks (closed loop: each task appends its share one after the other and awaits each
append, as a request handler does before its answer leaves).  Two paths, measured in the same run on the
same disk:

* ``per-record``: what the plugin did before group commit, reimplemented here as the baseline:
  ``await asyncio.to_thread(append)`` where ``append`` takes a lock, does one ``os.write`` and one
  ``os.fsync`` per record;
* ``group``: ``await DecisionLog.append_async(record)``: serialise in the caller, send the line to the
  writer process (``litellm_routenlp/decision_log_writer.py``), one write + one fsync per batch of whatever
  was pending, the acknowledgement read on the event loop.

Printed per (path, C): records/s, p50 and p99 of one append's latency (submit -> durable), the number of
fsyncs (the writer process's acknowledged batches for ``group``), and group/per-record ratios.  The temporary logs go under the repository by default (the disk the
proxy's log lives on), not /tmp, which may be a tmpfs where fsync costs nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Mapping

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from litellm_routenlp.decision_log import DecisionLog, read_decisions  # noqa: E402


class PerRecordLog:
    """The pre-group-commit DecisionLog.append: one write + one fsync per record under a lock."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def append(self, record: Mapping[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)
            os.fsync(self._fd)

    async def append_async(self, record: Mapping[str, Any]) -> None:
        await asyncio.to_thread(self.append, record)  # the plugin's old call

    def close(self) -> None:
        os.close(self._fd)


def make_record(i: int) -> dict[str, Any]:
    """Roughly the size and shape of a real success record (~0.9 KB)."""
    attempt = {"tier": 1, "tier_name": "T1", "model_id": "routenlp-t1", "uncertainty": 0.1234, "threshold": 0.5,
               "cost_usd": 1.2e-4, "latency_ms": 35.2, "escalated": False, "error": None}
    return {"request_id": f"chatcmpl-{i:08d}-bench", "ts": "2025-01-01T00:00:00.000000+00:00", "task": "banking77",
            "router": {"probabilities": [0.61, 0.2, 0.11, 0.08], "routed_tier": "T1"},
            "attempts": [attempt], "final_tier": "T1", "total_cost_usd": 1.2e-4, "total_latency_ms": 40.1,
            "escalation_error": None, "escalation_skipped": None, "stream": False, "key_alias": "bench",
            "prompt": "I still have not received my new card, I ordered it over a week ago. " * 4}


class FsyncCounter:
    def __init__(self) -> None:
        self.calls = 0
        self._real = os.fsync

    def __enter__(self) -> "FsyncCounter":
        def counting(fd: int) -> None:
            self.calls += 1  # the GIL makes this increment safe enough for a count
            self._real(fd)
        os.fsync = counting
        return self

    def __exit__(self, *exc: object) -> None:
        os.fsync = self._real


async def drive(log: Any, records: int, concurrency: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    shares = [records // concurrency + (1 if c < records % concurrency else 0) for c in range(concurrency)]
    starts = [sum(shares[:c]) for c in range(concurrency)]
    go = asyncio.Event()

    async def client(c: int) -> None:
        await go.wait()
        for i in range(starts[c], starts[c] + shares[c]):
            t0 = time.perf_counter()
            await log.append_async(make_record(i))
            latencies.append(time.perf_counter() - t0)

    tasks = [asyncio.create_task(client(c)) for c in range(concurrency)]
    await asyncio.sleep(0)
    started = time.perf_counter()
    go.set()
    await asyncio.gather(*tasks)
    return time.perf_counter() - started, latencies


def run_one(kind: str, records: int, concurrency: int, directory: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix=".decision_log_bench-", dir=directory) as tmp:
        path = Path(tmp) / "decisions.jsonl"
        log = PerRecordLog(path) if kind == "per-record" else DecisionLog(path, fsync=True)
        with FsyncCounter() as fsyncs:  # counts this process's fsyncs: the per-record path's
            elapsed, latencies = asyncio.run(drive(log, records, concurrency))
            if isinstance(log, DecisionLog):
                fsyncs.calls = log.commits  # one fsync per batch, made in the writer process
            log.close()
        got = sum(1 for _ in read_decisions(path, strict=True))
        assert got == records, f"{kind}: {got} records on disk, expected {records}"
    latencies.sort()
    return {"rps": records / elapsed, "p50_ms": statistics.median(latencies) * 1e3,
            "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1e3,
            "fsyncs": fsyncs.calls, "elapsed_s": elapsed}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 50, 200])
    parser.add_argument("--dir", type=Path, default=Path(__file__).resolve().parents[1],
                        help="where the temporary log directories go (same disk as the real log; default: "
                             "the repository); each is removed after its run")
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell, alternating paths; median shown")
    args = parser.parse_args(argv)
    print(f"{args.records} records per run, temp logs under {args.dir}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}, Python {sys.version.split()[0]}")
    header = f"{'C':>4}  {'path':<10} {'records/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'fsyncs':>7} {'recs/fsync':>10}"
    print(header)
    print("-" * len(header))
    for concurrency in args.concurrency:
        results: dict[str, list[dict[str, float]]] = {"per-record": [], "group": []}
        for repeat in range(args.repeats):
            order = ["per-record", "group"] if repeat % 2 == 0 else ["group", "per-record"]
            for kind in order:
                results[kind].append(run_one(kind, args.records, concurrency, args.dir))
        cell = {kind: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
                for kind, runs in results.items()}
        for kind in ("per-record", "group"):
            r = cell[kind]
            print(f"{concurrency:>4}  {kind:<10} {r['rps']:>10.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
                  f"{r['fsyncs']:>7.0f} {args.records / max(r['fsyncs'], 1):>10.1f}")
        old, new = cell["per-record"], cell["group"]
        print(f"{concurrency:>4}  {'ratio':<10} {new['rps'] / old['rps']:>9.2f}x "
              f"{new['p50_ms'] / old['p50_ms']:>7.2f}x {new['p99_ms'] / old['p99_ms']:>7.2f}x   (group / per-record)")


if __name__ == "__main__":
    main()
