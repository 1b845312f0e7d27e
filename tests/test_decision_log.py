import json
import os

import pytest

from litellm_routenlp.decision_log import DecisionLog, read_decisions


def test_records_round_trip_and_are_on_disk_immediately(tmp_path):
    path = tmp_path / "d.jsonl"
    log = DecisionLog(path)
    log.append({"request_id": "a", "task": "bitext"})
    # readable by another reader before close: written and fsync'd on append
    assert [r["request_id"] for r in read_decisions(path)] == ["a"]
    log.append({"request_id": "b"})
    log.close()
    assert [r["request_id"] for r in read_decisions(path)] == ["a", "b"]


def test_torn_last_line_is_skipped_and_next_record_starts_clean(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"request_id": "a"}) + "\n" + '{"request_id": "b", "ta')
    assert [r["request_id"] for r in read_decisions(path)] == ["a"]
    with pytest.raises(ValueError, match=":2:"):
        list(read_decisions(path, strict=True))
    log = DecisionLog(path)
    log.append({"request_id": "c"})
    log.close()
    assert [r["request_id"] for r in read_decisions(path)] == ["a", "c"]


def test_append_only_across_reopen(tmp_path):
    path = tmp_path / "d.jsonl"
    for name in ("a", "b"):
        log = DecisionLog(path)
        log.append({"request_id": name})
        log.close()
    assert [r["request_id"] for r in read_decisions(path)] == ["a", "b"]
    assert os.stat(path).st_size == len(path.read_bytes())


# ----------------------------------------------------------------------------------- group commit
import asyncio  # noqa: E402
import errno  # noqa: E402
import threading  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

from litellm_routenlp.decision_log import DecisionLogClosed  # noqa: E402

pytestmark = pytest.mark.timeout(120)


class _GatedFsync:
    """``os.fsync`` stand-in: counts calls on the log's descriptor and can hold the writer inside the
    first one, so records submitted meanwhile are known to be pending together."""

    def __init__(self, monkeypatch, log: DecisionLog, hold_first: bool = False, delay: float = 0.0):
        self.fd = log._fd
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()
        self.delay = delay
        self._real = os.fsync
        monkeypatch.setattr(os, "fsync", self)

    def __call__(self, fd):
        if fd == self.fd:
            self.calls += 1
            self.entered.set()
            assert self.release.wait(30), "test never released the held fsync"
            if self.delay:
                threading.Event().wait(self.delay)
        return self._real(fd)


def _ids(path, strict=True):
    return [r["request_id"] for r in read_decisions(path, strict=strict)]


def test_many_threads_each_record_exactly_once_with_shared_fsyncs(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    log = DecisionLog(path)
    fsyncs = _GatedFsync(monkeypatch, log, delay=0.002)  # a disk-like fsync, so arrivals overlap
    threads, per_thread = 32, 25
    barrier = threading.Barrier(threads)

    def worker(t):
        barrier.wait()
        for i in range(per_thread):
            log.append({"request_id": f"t{t}-{i}", "payload": "x" * (i * 7)})

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, range(threads)))
    log.close()
    ids = _ids(path)  # strict: raises on any torn or interleaved line
    expected = {f"t{t}-{i}" for t in range(threads) for i in range(per_thread)}
    assert len(ids) == len(expected) and set(ids) == expected
    for t in range(threads):  # each thread's records in its own order (it waited for each one)
        assert [i for i in ids if i.startswith(f"t{t}-")] == [f"t{t}-{i}" for i in range(per_thread)]
    assert 1 <= fsyncs.calls < len(expected), f"{fsyncs.calls} fsyncs for {len(expected)} records"


def test_many_asyncio_tasks_each_record_exactly_once_with_shared_fsyncs(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    log = DecisionLog(path)
    fsyncs = _GatedFsync(monkeypatch, log, delay=0.002)
    tasks, per_task = 200, 5

    async def client(t):
        for i in range(per_task):
            await log.append_async({"request_id": f"a{t}-{i}"})

    async def main():
        await asyncio.gather(*(client(t) for t in range(tasks)))

    asyncio.run(main())
    log.close()
    ids = _ids(path)
    assert sorted(ids) == sorted(f"a{t}-{i}" for t in range(tasks) for i in range(per_task))
    assert 1 <= fsyncs.calls < tasks * per_task / 4, f"{fsyncs.calls} fsyncs for {tasks * per_task} records"


def test_records_that_arrive_together_share_one_fsync_and_wait_for_it(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    log = DecisionLog(path)
    fsyncs = _GatedFsync(monkeypatch, log, hold_first=True)
    first = log.submit({"request_id": "first"})
    assert fsyncs.entered.wait(10)
    # the writer is inside first's fsync: first is written but not yet durable, so not acknowledged
    assert not first.done()
    rest = [log.submit({"request_id": f"r{i}"}) for i in range(99)]
    assert not any(f.done() for f in rest)
    fsyncs.release.set()
    first.result(10)
    for future in rest:
        assert future.result(10) is None
    assert fsyncs.calls == 2  # one for "first", ONE for the 99 that were pending together
    log.close()
    assert _ids(path) == ["first"] + [f"r{i}" for i in range(99)]


def test_batch_size_is_capped(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    log = DecisionLog(path, max_batch_records=10)
    fsyncs = _GatedFsync(monkeypatch, log, hold_first=True)
    first = log.submit({"request_id": "first"})
    assert fsyncs.entered.wait(10)
    rest = [log.submit({"request_id": f"r{i}"}) for i in range(45)]
    fsyncs.release.set()
    for future in [first, *rest]:
        future.result(10)
    assert fsyncs.calls == 1 + 5
    log.close()
    assert len(_ids(path)) == 46


def test_idle_append_does_not_wait_for_a_batch(tmp_path):
    log = DecisionLog(tmp_path / "d.jsonl", fsync=False)
    import time

    for _ in range(20):  # a lone record is written at once; no batching timer
        started = time.perf_counter()
        log.append({"request_id": "x"})
        assert time.perf_counter() - started < 0.5
    log.close()


def test_failed_write_fails_its_whole_batch_and_later_appends_work(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    log = DecisionLog(path)
    fsyncs = _GatedFsync(monkeypatch, log, hold_first=True)
    fd, real_write, failing = log._fd, os.write, threading.Event()

    def write(target, data):
        if target == fd and failing.is_set():
            raise OSError(errno.ENOSPC, "No space left on device (test)")
        return real_write(target, data)

    monkeypatch.setattr(os, "write", write)
    ok = log.submit({"request_id": "ok"})
    assert fsyncs.entered.wait(10)
    batch = [log.submit({"request_id": f"lost{i}"}) for i in range(5)]  # pending together
    failing.set()
    fsyncs.release.set()
    ok.result(10)
    for future in batch:
        with pytest.raises(OSError) as raised:
            future.result(10)
        assert raised.value.errno == errno.ENOSPC
    with pytest.raises(OSError):  # the sync API raises too
        log.append({"request_id": "lost-sync"})
    failing.clear()
    log.append({"request_id": "after"})  # the writer survived the error
    asyncio.run(log.append_async({"request_id": "after-async"}))
    log.close()
    assert _ids(path) == ["ok", "after", "after-async"]


@pytest.mark.parametrize("failure", ["short-write-then-error", "error-after-writing-some"])
def test_partial_write_then_error_leaves_later_records_intact(tmp_path, monkeypatch, failure):
    path = tmp_path / "d.jsonl"
    log = DecisionLog(path)
    log.append({"request_id": "a"})
    fd, real_write, calls = log._fd, os.write, []

    def write(target, data):
        if target != fd:
            return real_write(target, data)
        calls.append(len(data))
        if len(calls) == 1:  # half a line reaches the file ...
            written = real_write(target, bytes(data[: len(data) // 2]))
            if failure == "short-write-then-error":
                return written
            raise OSError(errno.EIO, "I/O error (test)")
        if len(calls) == 2 and failure == "short-write-then-error":
            raise OSError(errno.ENOSPC, "No space left on device (test)")  # ... then the device fails
        return real_write(target, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(OSError):
        log.append({"request_id": "torn", "pad": "y" * 50})
    log.append({"request_id": "b"})
    log.close()
    assert _ids(path, strict=False) == ["a", "b"]  # "b" was not glued onto the torn fragment
    with pytest.raises(ValueError, match=":2:"):
        list(read_decisions(path, strict=True))


def test_short_writes_are_completed(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    log = DecisionLog(path)
    fd, real_write, calls = log._fd, os.write, []

    def write(target, data):
        if target == fd:
            calls.append(len(data))
            return real_write(target, bytes(data[:7]))  # the kernel accepts at most 7 bytes a call
        return real_write(target, data)

    monkeypatch.setattr(os, "write", write)
    for i in range(5):
        log.append({"request_id": f"s{i}", "text": "é" * i})
    log.close()
    assert _ids(path) == [f"s{i}" for i in range(5)]
    assert len(calls) > 5


def test_close_flushes_pending_records_then_refuses_new_ones(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    log = DecisionLog(path)
    fsyncs = _GatedFsync(monkeypatch, log, hold_first=True)
    futures = [log.submit({"request_id": "first"})]
    assert fsyncs.entered.wait(10)
    futures += [log.submit({"request_id": f"p{i}"}) for i in range(50)]
    closer = threading.Thread(target=log.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive(), "close() must wait for the pending records"
    fsyncs.release.set()
    closer.join(10)
    assert not closer.is_alive()
    assert all(f.done() and f.exception() is None for f in futures)
    assert _ids(path) == ["first"] + [f"p{i}" for i in range(50)]
    with pytest.raises(DecisionLogClosed, match="closed"):
        log.submit({"request_id": "late"})
    with pytest.raises(DecisionLogClosed):
        log.append({"request_id": "late"})
    with pytest.raises(DecisionLogClosed):
        asyncio.run(log.append_async({"request_id": "late"}))
    log.close()  # idempotent
    assert _ids(path)[-1] == "p49"


def test_close_stops_the_writer_thread_and_closes_the_fd(tmp_path):
    log = DecisionLog(tmp_path / "d.jsonl", fsync=False)
    writer_fd, thread = log._fd, log._writer.thread
    futures = [log.submit({"request_id": str(i)}) for i in range(1000)]
    log.close()
    assert all(f.done() for f in futures)
    assert not thread.is_alive()
    with pytest.raises(OSError):
        os.fstat(writer_fd)
    assert len(_ids(tmp_path / "d.jsonl")) == 1000


def test_cancelled_caller_still_gets_its_record_written(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    log = DecisionLog(path)
    fsyncs = _GatedFsync(monkeypatch, log, hold_first=True)

    async def main():
        first = asyncio.ensure_future(log.append_async({"request_id": "first"}))
        await asyncio.to_thread(fsyncs.entered.wait, 10)
        doomed = asyncio.ensure_future(log.append_async({"request_id": "cancelled"}))
        await asyncio.sleep(0)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        fsyncs.release.set()
        await first
        await log.append_async({"request_id": "next"})

    asyncio.run(main())
    log.close()
    assert _ids(path) == ["first", "cancelled", "next"]


def test_unserialisable_record_fails_in_the_caller(tmp_path):
    log = DecisionLog(tmp_path / "d.jsonl", fsync=False)
    with pytest.raises(TypeError):
        log.submit({"request_id": "x", "bad": {1j: 2}})  # a complex key: json.dumps refuses it here
    log.append({"request_id": "y"})
    log.close()
    assert _ids(tmp_path / "d.jsonl") == ["y"]


# ---------------------------------------------------------------- the typed record (routenlp_core.decision_record)
from routenlp_core.decision_record import (RECORD_VERSION, Attempt, DecisionRecord, PolicyRecord,  # noqa: E402
                                           RouteRecord)
from litellm_routenlp.decision_log import read_records  # noqa: E402


def _answered() -> DecisionRecord:
    return DecisionRecord(
        request_id="r1", client_call_id="c1", ts="2026-01-01T00:00:00+00:00", task="banking77", task_status="known",
        router=RouteRecord(probabilities={"T1": 0.7, "T2": 0.3}, routed_tier="T1", wanted_tier="T1", reason="ok",
                           healthy_tiers=("T1", "T2"), router_ms=0.4),
        policy=PolicyRecord(name="conformal_thresholds", stop_reason="accepted"),
        attempts=(Attempt(tier=1, tier_name="T1", uncertainty=0.6, threshold=0.3, cost_usd=1e-5, latency_ms=2.0,
                          escalated=True, call_id="c1"),
                  Attempt(tier=2, tier_name="T2", uncertainty=0.1, threshold=0.3, cost_usd=1e-4, latency_ms=3.0,
                          estimates=(0.5, 0.9), call_id="e2")),
        final_tier="T2", total_cost_usd=1.1e-4, total_latency_ms=5.5, stream=False, prompt="lost my card",
        extra={"sla": {"budget_ms": 800}})


def test_decision_record_round_trips_through_the_log_with_version_and_unknown_keys(tmp_path):
    log = DecisionLog(tmp_path / "d.jsonl", fsync=False)
    log.append(_answered())
    log.close()
    raw = next(read_decisions(tmp_path / "d.jsonl"))
    assert raw["record_version"] == RECORD_VERSION and raw["outcome"] == "answered"
    assert raw["router"]["probabilities"] == {"T1": 0.7, "T2": 0.3} and raw["attempts"][1]["estimates"] == [0.5, 0.9]
    assert raw["sla"] == {"budget_ms": 800} and "error" not in raw  # unset error/prompt are left out
    back = next(read_records(tmp_path / "d.jsonl"))
    assert back == _answered() and back.path == ["T1", "T2"]
    assert DecisionRecord.from_json(back.to_json()) == back


def test_version_1_records_still_read():
    """Lines as the plugin wrote them before the typed record: no version, no outcome; a failure record's
    probabilities as a list; a retraction."""
    failed = DecisionRecord.from_json('{"request_id": "f", "ts": "t", "task": "clinc150", "router": '
                                      '{"probabilities": [0.25, 0.75], "routed_tier": "T2"}, "attempts": [], '
                                      '"final_tier": null, "error": "APIError: down"}')
    assert failed.record_version == 1 and failed.outcome == "failed" and failed.error == "APIError: down"
    assert failed.router.probabilities == {"T1": 0.25, "T2": 0.75}
    retract = DecisionRecord.from_json('{"request_id": "a", "outcome": "failed_after_answer", "attempts": [], '
                                       '"final_tier": null, "error": "X"}')
    assert retract.outcome == "failed_after_answer"
    old = DecisionRecord.from_json('{"request_id": "o", "attempts": [{"tier_name": "T1", "uncertainty": 0.2, '
                                   '"cost_usd": 1e-05}], "final_tier": "T1"}')
    assert old.outcome == "answered" and old.attempts[0].tier is None and old.path == ["T1"]
    assert old.with_version().to_dict()["record_version"] == RECORD_VERSION


def test_a_record_of_an_unknown_version_or_outcome_is_refused_naming_it(tmp_path):
    with pytest.raises(ValueError, match="record_version 9"):
        DecisionRecord.from_json('{"request_id": "x", "record_version": 9}')
    with pytest.raises(ValueError, match="outcome"):
        DecisionRecord(request_id="x", outcome="maybe")
    (tmp_path / "d.jsonl").write_text('{"request_id": "x", "record_version": 9}\n')
    assert list(read_records(tmp_path / "d.jsonl")) == []
    with pytest.raises(ValueError, match="d.jsonl: record 1"):
        list(read_records(tmp_path / "d.jsonl", strict=True))
