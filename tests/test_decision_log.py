import json
import os

import pytest
from pathlib import Path

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
import signal  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

from litellm_routenlp import decision_log  # noqa: E402
from litellm_routenlp.decision_log import DecisionLogClosed, WriterLink  # noqa: E402
from litellm_routenlp.decision_log_writer import serve  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def _writer_in_thread(log_fd, fsync, max_batch_records, max_batch_bytes):
    """The writer's own ``serve`` loop on a thread of this process, so a test can patch ``os.write`` /
    ``os.fsync`` under it (the shipped log runs the same function in a process)."""
    records_r, records_w = os.pipe()
    acks_r, acks_w = os.pipe()

    def run():
        serve(records_r, acks_w, log_fd, fsync, max_batch_records, max_batch_bytes)
        os.close(records_r)
        os.close(acks_w)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return WriterLink(records_w, acks_r, thread.join, thread.is_alive)


@pytest.fixture
def in_thread(monkeypatch):
    monkeypatch.setattr(decision_log, "start_writer", _writer_in_thread)


class _GatedFsync:
    """``os.fsync`` stand-in: counts calls on the log's descriptor and can hold the writer inside the
    first one, so records submitted meanwhile are known to be pending together."""

    def __init__(self, monkeypatch, log: DecisionLog, hold_first: bool = False, delay: float = 0.0):
        self.fd = log._state.fd
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


def _sent(log, count, timeout=10.0):
    """Wait until ``count`` records have gone to the writer (they are then pending together)."""
    deadline = time.monotonic() + timeout
    while log._state.sent < count:
        assert time.monotonic() < deadline, f"only {log._state.sent} of {count} records were sent"
        time.sleep(0.005)


def test_many_threads_each_record_exactly_once_with_shared_fsyncs(tmp_path, monkeypatch, in_thread):
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


def test_many_asyncio_tasks_each_record_exactly_once_with_shared_fsyncs_in_the_writer_process(tmp_path):
    path = tmp_path / "d.jsonl"
    log = DecisionLog(path)
    assert log.writer_pid and log.writer_pid != os.getpid()
    tasks, per_task = 200, 5

    async def client(t):
        for i in range(per_task):
            await log.append_async({"request_id": f"a{t}-{i}"})

    async def main():
        await asyncio.gather(*(client(t) for t in range(tasks)))

    asyncio.run(main())
    commits = log.commits
    log.close()
    ids = _ids(path)
    assert sorted(ids) == sorted(f"a{t}-{i}" for t in range(tasks) for i in range(per_task))
    assert 1 <= commits < tasks * per_task / 4, f"{commits} fsyncs for {tasks * per_task} records"


def test_records_that_arrive_together_share_one_fsync_and_wait_for_it(tmp_path, monkeypatch, in_thread):
    path = tmp_path / "d.jsonl"
    log = DecisionLog(path)
    fsyncs = _GatedFsync(monkeypatch, log, hold_first=True)
    with ThreadPoolExecutor(100) as pool:
        first = pool.submit(log.append, {"request_id": "first"})
        assert fsyncs.entered.wait(10)
        # the writer is inside first's fsync: first is written but not yet durable, so not acknowledged
        time.sleep(0.05)
        assert not first.done()
        rest = [pool.submit(log.append, {"request_id": f"r{i}"}) for i in range(99)]
        _sent(log, 100)
        assert not any(f.done() for f in rest)
        fsyncs.release.set()
        first.result(10)
        for future in rest:
            assert future.result(10) is None
    assert fsyncs.calls == 2  # one for "first", ONE for the 99 that were pending together
    log.close()
    assert _ids(path)[0] == "first" and sorted(_ids(path)[1:]) == sorted(f"r{i}" for i in range(99))


def test_batch_size_is_capped(tmp_path, monkeypatch, in_thread):
    path = tmp_path / "d.jsonl"
    log = DecisionLog(path, max_batch_records=10)
    fsyncs = _GatedFsync(monkeypatch, log, hold_first=True)
    with ThreadPoolExecutor(46) as pool:
        first = pool.submit(log.append, {"request_id": "first"})
        assert fsyncs.entered.wait(10)
        rest = [pool.submit(log.append, {"request_id": f"r{i}"}) for i in range(45)]
        _sent(log, 46)
        fsyncs.release.set()
        for future in [first, *rest]:
            future.result(10)
    assert fsyncs.calls == 1 + 5
    log.close()
    assert len(_ids(path)) == 46


def test_idle_append_does_not_wait_for_a_batch(tmp_path):
    log = DecisionLog(tmp_path / "d.jsonl", fsync=False)
    for _ in range(20):  # a lone record is written at once; no batching timer
        started = time.perf_counter()
        log.append({"request_id": "x"})
        assert time.perf_counter() - started < 0.5
    log.close()


def test_failed_write_fails_its_whole_batch_and_later_appends_work(tmp_path, monkeypatch, in_thread):
    path = tmp_path / "d.jsonl"
    log = DecisionLog(path)
    fsyncs = _GatedFsync(monkeypatch, log, hold_first=True)
    fd, real_write, failing = log._state.fd, os.write, threading.Event()

    def write(target, data):
        if target == fd and failing.is_set():
            raise OSError(errno.ENOSPC, "No space left on device (test)")
        return real_write(target, data)

    monkeypatch.setattr(os, "write", write)
    with ThreadPoolExecutor(6) as pool:
        ok = pool.submit(log.append, {"request_id": "ok"})
        assert fsyncs.entered.wait(10)
        batch = [pool.submit(log.append, {"request_id": f"lost{i}"}) for i in range(5)]  # pending together
        _sent(log, 6)
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
def test_partial_write_then_error_leaves_later_records_intact(tmp_path, monkeypatch, in_thread, failure):
    path = tmp_path / "d.jsonl"
    log = DecisionLog(path)
    log.append({"request_id": "a"})
    fd, real_write, calls = log._state.fd, os.write, []

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


def test_short_writes_are_completed(tmp_path, monkeypatch, in_thread):
    path = tmp_path / "d.jsonl"
    log = DecisionLog(path)
    fd, real_write, calls = log._state.fd, os.write, []

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


def test_close_flushes_pending_records_then_refuses_new_ones(tmp_path, monkeypatch, in_thread):
    path = tmp_path / "d.jsonl"
    log = DecisionLog(path)
    fsyncs = _GatedFsync(monkeypatch, log, hold_first=True)
    with ThreadPoolExecutor(51) as pool:
        futures = [pool.submit(log.append, {"request_id": "first"})]
        assert fsyncs.entered.wait(10)
        futures += [pool.submit(log.append, {"request_id": f"p{i}"}) for i in range(50)]
        _sent(log, 51)
        closer = threading.Thread(target=log.close)
        closer.start()
        closer.join(0.2)
        assert closer.is_alive(), "close() must wait for the pending records"
        fsyncs.release.set()
        closer.join(10)
        assert not closer.is_alive()
        assert all(f.result(10) is None for f in futures)
    ids = _ids(path)
    assert ids[0] == "first" and sorted(ids[1:]) == sorted(f"p{i}" for i in range(50))
    with pytest.raises(DecisionLogClosed, match="closed"):
        log.append({"request_id": "late"})
    with pytest.raises(DecisionLogClosed):
        asyncio.run(log.append_async({"request_id": "late"}))
    log.close()  # idempotent
    assert len(_ids(path)) == 51


def test_close_stops_the_writer_process_and_closes_the_fd(tmp_path):
    log = DecisionLog(tmp_path / "d.jsonl", fsync=False)
    writer_fd, pid = log._state.fd, log.writer_pid

    async def main():
        await asyncio.gather(*(log.append_async({"request_id": str(i)}) for i in range(1000)))

    asyncio.run(main())
    log.close()
    with pytest.raises(ProcessLookupError):  # exited and reaped
        os.kill(pid, 0)
    with pytest.raises(OSError):
        os.fstat(writer_fd)
    assert len(_ids(tmp_path / "d.jsonl")) == 1000


def test_a_dead_writer_fails_what_it_did_not_acknowledge_and_the_next_record_starts_a_new_one(tmp_path):
    path = tmp_path / "d.jsonl"
    log = DecisionLog(path)
    log.append({"request_id": "before"})
    first = log.writer_pid
    os.kill(first, signal.SIGKILL)
    time.sleep(0.2)
    log.append({"request_id": "after"})  # a new writer: nothing was pending, so nothing failed
    assert log.writer_pid not in (None, first)
    asyncio.run(log.append_async({"request_id": "after-async"}))
    log.close()
    assert _ids(path) == ["before", "after", "after-async"]


def _wait_for_exit(pid: int, timeout: float = 10.0) -> None:
    """The writer exits once its caller is gone (end of input): wait for that, or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError("the writer did not exit after its caller died")


def test_the_writer_process_commits_what_it_was_sent_after_its_caller_is_killed(tmp_path):
    """kill -9 of the process holding the log: every record it sent is still committed (acknowledged ones
    certainly; the writer reads to end of input)."""
    import subprocess
    import sys
    path = tmp_path / "d.jsonl"
    script = (
        "import asyncio, os, sys\n"
        "from litellm_routenlp.decision_log import DecisionLog\n"
        f"log = DecisionLog({str(path)!r})\n"
        "async def main():\n"
        "    await asyncio.gather(*(log.append_async({'request_id': f'k{i}'}) for i in range(300)))\n"
        "    print(log.writer_pid, flush=True)\n"
        "    state = log._state\n"
        "    with state.lock:\n"
        "        for i in range(300, 400):\n"
        "            state.backlog += ('{\"request_id\":\"k%d\"}\\n' % i).encode()\n"
        "        state.flush(state.link)\n"
        "    os.kill(os.getpid(), 9)\n"
        "asyncio.run(main())\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=str(Path(__file__).resolve().parents[1]))
    assert done.returncode == -9, done.stderr
    pid = int(done.stdout.split()[0])
    _wait_for_exit(pid)
    assert sorted(_ids(path)) == sorted(f"k{i}" for i in range(400))


# ------------------------------------------------------------------ durability: handed_off (the opt-out)
def test_handed_off_records_return_before_their_commit_and_are_committed_after(tmp_path, monkeypatch, in_thread):
    """The opt-out: append_async returns while the writer is still inside the first fsync (on_disk would
    wait for it, test_records_that_arrive_together_share_one_fsync_and_wait_for_it)."""
    path = tmp_path / "d.jsonl"
    log = DecisionLog(path, durability="handed_off")
    fsyncs = _GatedFsync(monkeypatch, log, hold_first=True)

    async def main():
        await asyncio.wait_for(log.append_async({"request_id": "first"}), 5)
        assert await asyncio.to_thread(fsyncs.entered.wait, 10)
        for i in range(50):  # all return at once, none is on disk yet
            await asyncio.wait_for(log.append_async({"request_id": f"r{i}"}), 5)
        log.append({"request_id": "sync"})
        assert log.commits == 0 and log._state.done == 0
        fsyncs.release.set()

    asyncio.run(main())
    log.close()
    assert _ids(path) == ["first", *(f"r{i}" for i in range(50)), "sync"]
    assert log.failed_after_answer == 0


def test_handed_off_waits_while_the_pipe_is_full_and_returns_once_its_line_is_in_it(tmp_path, monkeypatch):
    """A record still in the proxy's own memory (the pipe took only part of the backlog) has not been
    handed off: its caller waits until the writer has read enough for the line to fit."""
    path = tmp_path / "d.jsonl"
    records_r, records_w = os.pipe()
    acks_r, acks_w = os.pipe()
    reading = threading.Event()

    def run():
        assert reading.wait(30)
        serve(records_r, acks_w, log_fd, False, 256, 256 << 10)
        os.close(records_r)
        os.close(acks_w)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    link = WriterLink(records_w, acks_r, thread.join, thread.is_alive)
    monkeypatch.setattr(decision_log, "start_writer", lambda *args: link)  # a writer that has not started reading
    log = DecisionLog(path, fsync=False, durability="handed_off")
    log_fd = log._state.fd  # read by run() once `reading` is set
    big = ["x" * 8000] * 6  # 48 kB a record (each string within FIELD_LIMIT): two do not fit a 64 KiB pipe

    async def main():
        await asyncio.wait_for(log.append_async({"request_id": "b0", "pad": big}), 5)
        stuck = asyncio.ensure_future(log.append_async({"request_id": "b1", "pad": big}))
        await asyncio.sleep(0.2)
        assert not stuck.done() and log._state.backlog, "b1 cannot be in the full pipe yet"
        reading.set()  # the writer starts reading: its acknowledgement flushes the backlog
        await asyncio.wait_for(stuck, 10)

    asyncio.run(main())
    log.close()
    assert _ids(path) == ["b0", "b1"]


def test_handed_off_commit_failures_after_the_answer_are_counted_and_logged(tmp_path, monkeypatch, in_thread,
                                                                         caplog):
    path = tmp_path / "d.jsonl"
    log = DecisionLog(path, durability="handed_off")
    fd = log._state.fd
    real = os.fsync

    def failing(target):
        if target == fd:
            raise OSError(errno.EIO, "disk gone")
        return real(target)

    monkeypatch.setattr(os, "fsync", failing)
    with caplog.at_level("ERROR", logger="litellm_routenlp"):
        log.append({"request_id": "lost"})  # returns: it was handed off
        deadline = time.monotonic() + 10
        while log.failed_after_answer == 0 and time.monotonic() < deadline:
            log._state.drain()  # no event loop reads this log's acknowledgements: read them here
            time.sleep(0.01)
    assert log.failed_after_answer == 1
    assert any("not known to be on disk" in r.getMessage() and os.strerror(errno.EIO) in r.getMessage()
               for r in caplog.records)
    monkeypatch.setattr(os, "fsync", real)
    log.append({"request_id": "next"})
    log.close()
    assert "next" in _ids(path)


def test_handed_off_records_survive_a_kill_9_of_the_callers_process_group(tmp_path):
    """kill -9 of the caller's whole process group while its handed-off records are still in the pipe (the
    writer is held with SIGSTOP, so none is committed yet): the writer, in its own session, survives the
    kill and commits every one of them once it runs again."""
    import subprocess
    import sys
    path = tmp_path / "d.jsonl"
    script = (
        "import asyncio, os, signal\n"
        "from litellm_routenlp.decision_log import DecisionLog\n"
        f"log = DecisionLog({str(path)!r}, durability='handed_off')\n"
        "os.kill(log.writer_pid, signal.SIGSTOP)\n"
        "async def main():\n"
        "    await asyncio.wait_for(asyncio.gather(*(log.append_async({'request_id': f'h{i}'}) for i in range(200))), 10)\n"
        "    print(log.writer_pid, log.commits, flush=True)\n"
        "    os.killpg(0, signal.SIGKILL)\n"
        "asyncio.run(main())\n")
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:  # files: the surviving writer holds stderr open
        child = subprocess.run([sys.executable, "-c", script], stdout=stdout, stderr=stderr, timeout=60,
                               cwd=str(Path(__file__).resolve().parents[1]), start_new_session=True)
    assert child.returncode == -9, err.read_text()
    pid, commits = (int(v) for v in out.read_text().split())
    assert commits == 0  # every append returned before anything was committed
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        raise AssertionError("the writer died with its caller's process group") from None
    _wait_for_exit(pid)
    assert sorted(_ids(path)) == sorted(f"h{i}" for i in range(200))


def test_durability_must_be_known(tmp_path):
    with pytest.raises(ValueError, match="durability must be one of"):
        DecisionLog(tmp_path / "d.jsonl", durability="eventually")


def test_cancelled_caller_still_gets_its_record_written(tmp_path, monkeypatch, in_thread):
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
        log.append({"request_id": "x", "bad": {1j: 2}})  # a complex key: json.dumps refuses it here
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
