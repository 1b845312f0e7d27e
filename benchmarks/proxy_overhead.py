"""What the RouteNLP plugin adds to the LiteLLM proxy: latency, throughput and memory.

    .venv/bin/python benchmarks/proxy_overhead.py [--duration 8] [--concurrency 1 50 200] [--repeats 2]
                                                  [--open-rates 0.25 0.5 0.75] [--open-duration 15]
                                                  [--configs plain routenlp [handed_off] [router_process] [callback]]
                                                  [--profile SVG [--profile-config plain]]
                                                  [--baseline-ref GIT_REF]

Real ``litellm --config`` proxies on loopback with the SAME four deployments of the alias
``routenlp`` (one per tier), differing only in ``litellm_settings.callbacks``:

* ``plain``: LiteLLM alone (its default ``simple-shuffle`` routing over the four deployments);
* ``routenlp``: the same plus ``litellm_routenlp.proxy_hook.routenlp`` with the shipped router
  (int8 ONNX), thresholds and a durable, fsync'd decision log (shadow audit off: its sampled extra
  top-tier call would be a second model call, not overhead);
* ``handed_off`` (``--configs plain routenlp handed_off``): ``routenlp`` with
  ``decision_log_durability: handed_off``, the opt-out in which an answer waits only until its record is
  in the log writer's pipe, not for the ``fsync`` (README, "The decision log");
* ``router_process``: ``routenlp`` with ``router_execution: process`` (the router in its own process,
  router_worker.py);
* ``callback`` (attribution only, ``--configs plain callback routenlp``): the same plus a
  ``CustomLogger`` that overrides nothing, so ``routenlp - callback`` is the plugin's own work and
  ``callback - plain`` what LiteLLM's callback machinery costs any callback;
* ``baseline`` (``--baseline-ref REF``): the plugin proxy again, its code taken from the git commit
  ``REF`` (a temporary ``git worktree``, first on the proxy's ``PYTHONPATH``; artifacts and settings as
  ``routenlp``), so a change to the plugin is measured against its previous version in the same run.

Every deployment answers with LiteLLM's own ``mock_response`` (a fixed chat completion with one
confident logprob per token, no network, no model).  That isolates the proxy: a real tier's latency would
only add the same constant to both sides.  Because the mock answers are confident, the plugin's
cascade computes u and keeps the answer.  An escalation would be a second model call (the feature,
not overhead), so after the runs the decision log is read and the script exits non-zero if any
request had more than one attempt: the comparison would not be like for like.

Two phases, queries are real banking77 test texts with ``metadata.task``:

* closed loop: N clients (aiohttp, keep-alive) each send requests back to back for ``--duration``
  seconds after a short warm-up.  This saturates the proxy and measures capacity (throughput
  ratio; the 50- and 200-client latency goals) and, at one client, the per-request work.
* open loop: Poisson arrivals at fixed rates, ``--open-rates`` times plain LiteLLM's capacity as
  measured by the closed-loop phase of the same run.  Each arrival is its own asyncio task launched
  at its scheduled time, so any number of requests may be in flight; each is timed from its
  SCHEDULED arrival (queueing in the generator, the connection pool or the proxy all count), and
  every request is waited for (a request that takes longer than ``--request-timeout`` counts as a
  failure, none is dropped).  Throughput = completed / (first scheduled arrival to last
  completion), relative to plain's at the same offered rate.  Latency percentiles pool the
  repeats' requests.  The proxies were warmed by the closed-loop phase, so there is no warm-up.

Runs alternate between the configs (order rotated every repeat) so drifting load from other
processes hits all alike.  Both proxies, the load generator and anything else running share this
machine's CPUs: the load average is printed with the figures.  Memory: RSS of each proxy process
(and its children) idle after start-up, and after the load.  ``--profile SVG`` adds one unmeasured
open-loop run (``--profile-rps``, default 50% of capacity) with ``py-spy record`` attached to the
``--profile-config`` proxy (default routenlp).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from litellm_routenlp.proxy_process import ProxyProcess  # noqa: E402

GOALS = {"added_p50_ms": 5.0, "added_p99_ms": 15.0, "throughput_ratio": 0.90}
#: the plugin proxy with one routenlp setting changed, each measured against plain LiteLLM
VARIANTS = {"handed_off": {"decision_log_durability": "handed_off"},
            "router_process": {"router_execution": "process"},
            "process_handed_off": {"router_execution": "process", "decision_log_durability": "handed_off"}}
CONFIGS = ["plain", "callback", "routenlp", *VARIANTS]
PRICES = (0.00001, 0.0001, 0.0008, 0.008)


def mock_answer(tier: int) -> dict:
    """A fixed OpenAI chat completion with per-token logprobs (all confident: u ~ 0)."""
    tokens = ["card", "_arrival"]
    return {
        "id": f"chatcmpl-mock-t{tier}",
        "object": "chat.completion",
        "created": 1700000000,
        "model": f"mock-tier-{tier}",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "".join(tokens)},
                     "logprobs": {"content": [{"token": t, "logprob": -0.001, "bytes": list(t.encode()),
                                               "top_logprobs": []} for t in tokens]}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": len(tokens), "total_tokens": 12 + len(tokens)},
    }


NOOP_CALLBACK = """from litellm.integrations.custom_logger import CustomLogger


class Noop(CustomLogger):
    pass


noop = Noop()
"""


def write_configs(work: Path) -> dict[str, Path]:
    model_list = []
    for tier, price in enumerate(PRICES, start=1):
        model_list.append({
            "model_name": "routenlp",
            "litellm_params": {"model": f"openai/mock-tier-{tier}", "api_key": "not-used",
                               "mock_response": mock_answer(tier),
                               "input_cost_per_token": price, "output_cost_per_token": price},
            "model_info": {"id": f"mock-t{tier}", "routenlp_tier": tier},
        })
    plain = {"model_list": model_list,
             "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"}}
    shipped = yaml.safe_load((ROOT / "proxy_config.yaml").read_text())
    settings = dict(shipped["routenlp_settings"])
    settings["router_artifact"] = str((ROOT / settings["router_artifact"]).resolve())
    settings["thresholds_path"] = str((ROOT / settings["thresholds_path"]).resolve())
    settings["decision_log_path"] = str(work / "decisions.jsonl")
    settings["shadow_audit"] = {"fraction": 0.0}  # an audit is a second model call, not the plugin's overhead
    plugin = {"model_list": model_list,
              "litellm_settings": {"callbacks": "litellm_routenlp.proxy_hook.routenlp"},
              "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
              "routenlp_settings": settings}
    callback = {**plain, "litellm_settings": {"callbacks": "noop_callback.noop"}}
    (work / "noop_callback.py").write_text(NOOP_CALLBACK)
    documents = {"plain": plain, "callback": callback, "routenlp": plugin}
    for name, changed in VARIANTS.items():  # the plugin with one setting changed, each with its own log
        documents[name] = {**plugin, "routenlp_settings": {**settings, **changed,
                                                           "decision_log_path": str(work / f"{name}-decisions.jsonl")}}
    paths = {}
    for name, document in documents.items():
        paths[name] = work / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(document, sort_keys=False))
    return paths


def baseline_proxy(ref: str, routenlp_config: Path, work: Path) -> ProxyProcess:
    """The plugin proxy with its code as of git commit ``ref`` (``--baseline-ref``)."""
    source = work / "baseline-src"
    added = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(source), ref],
                           capture_output=True, text=True)
    if added.returncode != 0:
        raise SystemExit(f"--baseline-ref {ref}: git worktree add failed: {added.stderr.strip()}")
    # built artifacts are git-ignored (make artifacts): the old code reads this checkout's
    for built in (ROOT / "artifacts").iterdir():
        if built.is_dir() and not (source / "artifacts" / built.name).exists():
            (source / "artifacts" / built.name).symlink_to(built)
    document = yaml.safe_load(routenlp_config.read_text())
    document["routenlp_settings"]["decision_log_path"] = str(work / "baseline-decisions.jsonl")
    config = work / "baseline.yaml"
    config.write_text(yaml.safe_dump(document, sort_keys=False))
    commit = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"baseline: the plugin as of {ref} ({commit}), from {source}")
    return ProxyProcess(config, log_path=work / "baseline.log", cwd=source,
                        env={"PYTHONPATH": str(source)})


def cpu_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs so far (/proc/stat; (0, 0) where there is none).

    Steal is time the hypervisor gave this VM's virtual CPUs to someone else: on a shared cloud machine it
    moves both proxies' capacity between runs with nothing running here, so "quiet" means low load
    average AND low steal."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def rss_mb(pid: int) -> float:
    import psutil

    process = psutil.Process(pid)
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by the proxy process (all its threads) and its children.

    CPU per answered request is the figure queueing multiplies, and unlike latency it barely moves
    when other processes share the cores, so it is the one to compare changes by on a busy machine."""
    import psutil

    total = 0.0
    process = psutil.Process(pid)
    for item in [process, *process.children(recursive=True)]:
        try:
            times = item.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def session_for(key: str, limit: int, timeout_s: float):
    import aiohttp

    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    # limit 0: aiohttp's "no connection limit", so an open-loop arrival never waits for a free socket
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, force_close=False),
                                 timeout=aiohttp.ClientTimeout(total=timeout_s), headers=headers)


async def post(session, url: str, body: bytes) -> str | int:
    """One request; its status, or the name of the error (counted, never hidden)."""
    try:
        async with session.post(url, data=body) as reply:
            await reply.read()
            return reply.status
    except asyncio.TimeoutError:
        return "timeout"
    except Exception as error:
        return type(error).__name__


def percentiles(latencies: list[float]) -> dict[str, float]:
    array = np.array(latencies) if latencies else np.array([float("nan")])
    return {"p50_ms": float(np.percentile(array, 50)), "p99_ms": float(np.percentile(array, 99)),
            "mean_ms": float(array.mean())}


async def closed_loop(base_url: str, key: str, bodies: list[bytes], clients: int, duration: float,
                      warmup: float, timeout_s: float) -> dict:
    """``clients`` clients each send their next request as soon as the last one is answered, for
    ``warmup + duration`` seconds; requests sent and answered inside the measured window count."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    unmeasured = [0]  # served in the warm-up or finished after the window: the proxy's CPU still paid for them
    started = time.perf_counter()
    measure_from = started + warmup
    stop_at = measure_from + duration
    url = base_url + "/v1/chat/completions"

    async with session_for(key, clients, timeout_s) as session:
        async def client(index: int) -> None:
            i = index
            while time.perf_counter() < stop_at:
                body = bodies[i % len(bodies)]
                i += clients
                t0 = time.perf_counter()
                status = await post(session, url, body)
                t1 = time.perf_counter()
                if t0 >= measure_from and t1 <= stop_at:
                    if status == 200:
                        latencies.append((t1 - t0) * 1000.0)
                    else:
                        errors[str(status)] = errors.get(str(status), 0) + 1
                else:
                    unmeasured[0] += 1

        await asyncio.gather(*(client(i) for i in range(clients)))
    return {"ok": len(latencies), "errors": errors, "unmeasured": unmeasured[0], "rps": len(latencies) / duration,
            **percentiles(latencies)}


async def open_loop(base_url: str, key: str, bodies: list[bytes], rate: float, duration: float,
                    seed: int, timeout_s: float) -> dict:
    """Poisson arrivals at ``rate`` req/s for ``duration`` seconds, each launched as its own task at
    its scheduled time (unbounded in flight), timed from the schedule, every one waited for."""
    rng = np.random.default_rng(seed)
    offsets = np.cumsum(rng.exponential(1.0 / rate, size=int(rate * duration * 2) + 50))
    offsets = offsets[offsets < duration]
    url = base_url + "/v1/chat/completions"
    send_lag: list[float] = []

    async with session_for(key, 0, timeout_s) as session:
        async def one(index: int, scheduled: float) -> tuple[float, float, str | int]:
            send_lag.append((time.perf_counter() - scheduled) * 1000.0)
            status = await post(session, url, bodies[index % len(bodies)])
            return scheduled, time.perf_counter(), status

        t0 = time.perf_counter() + 0.05
        tasks = []
        for index, offset in enumerate(offsets):
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index, t0 + float(offset))))
        outcomes = await asyncio.gather(*tasks)
    latencies = [(done - scheduled) * 1000.0 for scheduled, done, status in outcomes if status == 200]
    errors: dict[str, int] = {}
    for _, _, status in outcomes:
        if status != 200:
            errors[str(status)] = errors.get(str(status), 0) + 1
    span = max(done for _, done, _ in outcomes) - (t0 + float(offsets[0]))
    return {"ok": len(latencies), "errors": errors, "sent": len(outcomes), "span_s": span,
            "rps": len(latencies) / span, "latencies": latencies,
            "send_lag_p99_ms": float(np.percentile(send_lag, 99)), **percentiles(latencies)}


def count_escalations(path: Path) -> tuple[int, int]:
    """(records, records with more than one attempt) in the plugin proxy's decision log."""
    from litellm_routenlp.decision_log import read_decisions

    if not path.exists():
        return 0, 0
    records = list(read_decisions(path))
    return len(records), sum(1 for record in records if len(record.get("attempts") or ()) > 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per closed-loop run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds at the start of each "
                                                                  "closed-loop run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 50, 200])
    parser.add_argument("--repeats", type=int, default=2, help="runs per (config, cell), alternating")
    parser.add_argument("--configs", nargs="+", default=["plain", "routenlp"],
                        choices=CONFIGS)
    parser.add_argument("--open-rates", type=float, nargs="*", default=[0.25, 0.5, 0.75],
                        help="open-loop Poisson rates as shares of plain's closed-loop capacity (none: skip)")
    parser.add_argument("--open-duration", type=float, default=15.0, help="seconds of arrivals per open-loop run")
    parser.add_argument("--request-timeout", type=float, default=60.0,
                        help="a request slower than this counts as a failure")
    parser.add_argument("--profile", type=Path, default=None,
                        help="after the measured runs, record a py-spy flame graph (SVG) of one proxy "
                             "(--profile-config) during one extra, unmeasured open-loop run at --profile-rps")
    parser.add_argument("--profile-config", default="routenlp", choices=CONFIGS)
    parser.add_argument("--profile-rps", type=float, default=None,
                        help="offered rate of the profiled run (default: 50%% of plain's capacity in this run)")
    parser.add_argument("--baseline-ref", default=None,
                        help="also run the plugin as of this git commit (the 'baseline' config) in the same run")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if "plain" not in args.configs and (args.open_rates or (args.profile and not args.profile_rps)):
        parser.error("--open-rates and --profile need the plain config: the rates are shares of plain's capacity")
    if args.profile and args.profile_config not in args.configs:
        parser.error(f"--profile-config {args.profile_config} is not among --configs")
    from routenlp_core.tasks import get_task

    texts = [e.text for e in get_task("banking77").load("test", limit=500, seed=9)]
    bodies = [json.dumps({"model": "routenlp", "messages": [{"role": "user", "content": t}],
                          "metadata": {"task": "banking77"}, "max_tokens": 16}).encode() for t in texts]
    load_at_start = os.getloadavg()
    ticks_at_start = cpu_ticks()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        configs = write_configs(work)
        proxies = {name: ProxyProcess(configs[name], log_path=work / f"{name}.log", cwd=ROOT)
                   for name in CONFIGS if name in args.configs}
        if args.baseline_ref:
            proxies["baseline"] = baseline_proxy(args.baseline_ref, configs["routenlp"], work)
        memory: dict[str, dict[str, float]] = {}
        runs: list[dict] = []
        profile_note = None
        try:
            for name, proxy in proxies.items():
                proxy.start(timeout=300)
                time.sleep(3.0)  # let start-up work settle before measuring idle memory
                memory[name] = {"idle_rss_mb": rss_mb(proxy.process.pid), "start_seconds": proxy.start_seconds}
            # sanity: each answers, and only the plugin proxy routes (its headers are present)
            import urllib.request

            for name, proxy in proxies.items():
                request = urllib.request.Request(proxy.base_url + "/v1/chat/completions", data=bodies[0],
                                                 headers={"Authorization": f"Bearer {proxy.master_key}",
                                                          "Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=60) as reply:
                    routed = reply.headers.get("x-routenlp-tier")
                    if (name in ("routenlp", "baseline", *VARIANTS)) != (routed is not None):
                        raise SystemExit(f"{name} proxy: unexpected x-routenlp-tier header {routed!r}")

            def run_cell(phase: str, concurrency: int | None, rate: float | None, share: float | None) -> None:
                for repeat in range(args.repeats):
                    names = list(proxies)
                    shift = repeat % len(names)
                    order = names[shift:] + names[:shift]
                    if repeat % 2:
                        order.reverse()
                    for name in order:
                        proxy = proxies[name]
                        before = os.getloadavg()[0]
                        cpu_before, ticks_before = cpu_seconds(proxy.process.pid), cpu_ticks()
                        if phase == "closed":
                            result = asyncio.run(closed_loop(proxy.base_url, proxy.master_key, bodies, concurrency,
                                                             args.duration, args.warmup, args.request_timeout))
                        else:  # the same arrival times for every config within a repeat
                            result = asyncio.run(open_loop(proxy.base_url, proxy.master_key, bodies, rate,
                                                           args.open_duration, 1000 + repeat, args.request_timeout))
                        cpu_used = cpu_seconds(proxy.process.pid) - cpu_before
                        ticks_after = cpu_ticks()
                        result["steal_share"] = ((ticks_after[0] - ticks_before[0])
                                                 / max(ticks_after[1] - ticks_before[1], 1))
                        answered = result["ok"] + sum(result["errors"].values()) + result.get("unmeasured", 0)
                        result["cpu_ms_per_request"] = cpu_used * 1000.0 / max(answered, 1)
                        result.update(config=name, concurrency=concurrency, repeat=repeat, load1_before=before,
                                      load1_after=os.getloadavg()[0], phase=phase, offered_rps=rate, share=share)
                        runs.append(result)
                        cell = f"c={concurrency}" if phase == "closed" else f"{rate:.1f}/s"
                        print(f"  {phase:<6} {name:<9} {cell:<8} rep={repeat} ok={result['ok']:<6} "
                              f"rps={result['rps']:7.1f} p50={result['p50_ms']:8.1f} p99={result['p99_ms']:8.1f} "
                              f"cpu/req={result['cpu_ms_per_request']:5.2f}ms errors={result['errors']} load1={before:.2f} "
                              f"steal={result['steal_share']:.1%}",
                              flush=True)
                        time.sleep(1.0)

            for concurrency in args.concurrency:
                run_cell("closed", concurrency, None, None)
            capacity = None
            if args.open_rates:
                capacity = max(float(np.median([r["rps"] for r in runs if r["config"] == "plain"
                                                and r["concurrency"] == c])) for c in args.concurrency)
                for share in args.open_rates:
                    run_cell("open", None, share * capacity, share)
            for name, proxy in proxies.items():
                memory[name]["after_load_rss_mb"] = rss_mb(proxy.process.pid)
            if args.profile:
                rate = args.profile_rps or 0.5 * max(float(np.median([r["rps"] for r in runs if r["config"] == "plain"
                                                                       and r["concurrency"] == c]))
                                                     for c in args.concurrency)
                profile_note = record_profile(proxies[args.profile_config], bodies, rate, args)
        finally:
            for proxy in proxies.values():
                proxy.stop()
            if args.baseline_ref:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(work / "baseline-src")],
                               capture_output=True)
        decision_records, escalated = count_escalations(work / "decisions.jsonl")
        # a lost, stuck or failing router process logs one warning each time (router_process.py); its
        # queries were then routed in the proxy, so the run is still like for like, but say so
        router_process_warnings = {name: [line for line in (work / f"{name}.log").read_text(errors="replace").splitlines()
                                          if "RouteNLP: router process" in line]
                                   for name in proxies if (work / f"{name}.log").is_file()}
        for name in VARIANTS:
            if name in proxies:
                more_records, more_escalated = count_escalations(work / f"{name}-decisions.jsonl")
                decision_records, escalated = decision_records + more_records, escalated + more_escalated
    load_at_end = os.getloadavg()
    ticks_at_end = cpu_ticks()
    steal_share = (ticks_at_end[0] - ticks_at_start[0]) / max(ticks_at_end[1] - ticks_at_start[1], 1)

    names = list(memory)
    closed = summarise_closed(runs, names, args.concurrency)
    opened = summarise_open(runs, names, args.open_rates or [])
    print()
    print(f"LiteLLM proxy with and without the RouteNLP plugin (same 4 mock_response deployments); "
          f"closed loop {args.duration:.0f} s, open loop {args.open_duration:.0f} s of Poisson arrivals; "
          f"{args.repeats} alternating runs per cell")
    print(f"load average at start {load_at_start[0]:.2f} {load_at_start[1]:.2f} {load_at_start[2]:.2f}, "
          f"at end {load_at_end[0]:.2f} {load_at_end[1]:.2f} {load_at_end[2]:.2f}; cpus {os.cpu_count()}; "
          f"CPU time stolen by the hypervisor during the run {steal_share:.1%}")
    print_closed(closed, names)
    if opened and "plain" in names and "routenlp" in names:
        print_open(opened, capacity)
    if "routenlp" in names:
        print(f"\ndecision records {decision_records}; requests with more than one attempt (escalated): {escalated}")
    for name in names:
        if name in router_process_warnings and VARIANTS.get(name, {}).get("router_execution") == "process":
            lines = router_process_warnings[name]
            print(f"{name}: router process warnings (lost, stuck or failing; its queries then routed in the "
                  f"proxy): {len(lines)}" + "".join(f"\n    {line.strip()[:300]}" for line in lines[:3]))
    print()
    for name, mem in memory.items():
        print(f"{name:<9} proxy RSS: idle {mem['idle_rss_mb']:.0f} MB, after load {mem['after_load_rss_mb']:.0f} MB "
              f"(started in {mem['start_seconds']:.1f} s)")
    if profile_note:
        print(profile_note)
    if args.json:
        slim = [{k: v for k, v in r.items() if k != "latencies"} for r in runs]
        args.json.write_text(json.dumps({"runs": slim, "closed": closed, "open": opened, "memory": memory,
                                         "capacity_rps": capacity, "escalated": escalated,
                                         "decision_records": decision_records,
                                         "load_at_start": load_at_start, "load_at_end": load_at_end,
                                         "steal_share": steal_share}, indent=2))
    if "routenlp" in names and escalated:
        print(f"FAIL: {escalated} routenlp request(s) escalated (a second model call): the comparison with "
              f"plain LiteLLM is not like for like", file=sys.stderr)
        return 1
    if "routenlp" in names and decision_records == 0:
        print("FAIL: the routenlp proxy wrote no decision record", file=sys.stderr)
        return 1
    return 0


def record_profile(proxy: ProxyProcess, bodies: list[bytes], rate: float, args: argparse.Namespace) -> str:
    """py-spy (sampling from outside the process, --nonblocking: the proxy is never paused) on one
    proxy during one extra open-loop run; not part of the figures."""
    import shutil
    import subprocess

    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        return "profile: py-spy not installed (.venv/bin/pip install py-spy)"
    seconds = max(5, int(args.open_duration) - 2)
    command = [py_spy, "record", "--pid", str(proxy.process.pid), "--duration", str(seconds), "--nonblocking",
               "--rate", "200", "--format", "flamegraph", "-o", str(args.profile)]
    spy = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    time.sleep(1.0)
    result = asyncio.run(open_loop(proxy.base_url, proxy.master_key, bodies, rate, args.open_duration, 4242,
                                   args.request_timeout))
    output = spy.communicate(timeout=120)[0].decode(errors="replace")
    if spy.returncode != 0:
        return f"profile: py-spy failed ({spy.returncode}): {output.strip()[-400:]}"
    return (f"profile: {args.profile_config} proxy, {args.profile} ({seconds} s of py-spy at {rate:.1f} req/s offered; that run: "
            f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, ok {result['ok']}/{result['sent']})")


def summarise_closed(runs: list[dict], names: list[str], concurrencies: list[int]) -> list[dict]:
    """Per client count: medians of the per-run figures over the repeats."""
    rows = []
    for concurrency in concurrencies:
        row: dict = {"concurrency": concurrency}
        loads = []
        for name in names:
            mine = [r for r in runs if r["phase"] == "closed" and r["config"] == name and r["concurrency"] == concurrency]
            loads += [r["load1_before"] for r in mine]
            row[name] = {"rps": float(np.median([r["rps"] for r in mine])),
                         "p50_ms": float(np.median([r["p50_ms"] for r in mine])),
                         "p99_ms": float(np.median([r["p99_ms"] for r in mine])),
                         "cpu_ms_per_request": float(np.median([r["cpu_ms_per_request"] for r in mine])),
                         "errors": sum(sum(r["errors"].values()) for r in mine)}
        row["load1"] = float(np.mean(loads))
        add_comparison(row, names)
        rows.append(row)
    return rows


def summarise_open(runs: list[dict], names: list[str], shares: list[float]) -> list[dict]:
    """Per offered rate: percentiles over all the repeats' requests; throughput = all completed /
    all spans (first scheduled arrival to last completion)."""
    rows = []
    for share in shares:
        row: dict = {"share": share}
        loads = []
        for name in names:
            mine = [r for r in runs if r["phase"] == "open" and r["config"] == name and r["share"] == share]
            loads += [r["load1_before"] for r in mine]
            row["offered_rps"] = mine[0]["offered_rps"]
            pooled = [x for r in mine for x in r["latencies"]]
            row[name] = {"rps": sum(r["ok"] for r in mine) / sum(r["span_s"] for r in mine),
                         "ok": sum(r["ok"] for r in mine), "sent": sum(r["sent"] for r in mine),
                         "errors": sum(sum(r["errors"].values()) for r in mine),
                         "send_lag_p99_ms": max(r["send_lag_p99_ms"] for r in mine),
                         "cpu_ms_per_request": float(np.median([r["cpu_ms_per_request"] for r in mine])),
                         **percentiles(pooled)}
        row["load1"] = float(np.mean(loads))
        add_comparison(row, names)
        rows.append(row)
    return rows


def add_comparison(row: dict, names: list[str]) -> None:
    if "plain" in names and "routenlp" in names:
        row["added_p50_ms"] = row["routenlp"]["p50_ms"] - row["plain"]["p50_ms"]
        row["added_p99_ms"] = row["routenlp"]["p99_ms"] - row["plain"]["p99_ms"]
        row["throughput_ratio"] = row["routenlp"]["rps"] / row["plain"]["rps"]
        row["added_cpu_ms_per_request"] = row["routenlp"]["cpu_ms_per_request"] - row["plain"]["cpu_ms_per_request"]
        row["goals_met"] = {"p50": row["added_p50_ms"] <= GOALS["added_p50_ms"],
                            "p99": row["added_p99_ms"] <= GOALS["added_p99_ms"],
                            "throughput": row["throughput_ratio"] >= GOALS["throughput_ratio"]}
    for variant in VARIANTS:
        if "plain" not in names or variant not in names:
            continue
        h, p = row[variant], row["plain"]
        c = row[f"{variant}_vs_plain"] = {
            "p50_ms": h["p50_ms"] - p["p50_ms"], "p99_ms": h["p99_ms"] - p["p99_ms"],
            "cpu_ms_per_request": h["cpu_ms_per_request"] - p["cpu_ms_per_request"], "rps_ratio": h["rps"] / p["rps"]}
        c["goals_met"] = {"p50": c["p50_ms"] <= GOALS["added_p50_ms"], "p99": c["p99_ms"] <= GOALS["added_p99_ms"],
                          "throughput": c["rps_ratio"] >= GOALS["throughput_ratio"]}
    if "baseline" in names and "routenlp" in names:
        row["routenlp_vs_baseline"] = {
            "p50_ms": row["routenlp"]["p50_ms"] - row["baseline"]["p50_ms"],
            "p99_ms": row["routenlp"]["p99_ms"] - row["baseline"]["p99_ms"],
            "cpu_ms_per_request": row["routenlp"]["cpu_ms_per_request"] - row["baseline"]["cpu_ms_per_request"],
            "rps_ratio": row["routenlp"]["rps"] / row["baseline"]["rps"]}
    if "callback" in names:
        for other in ("plain", "routenlp"):
            if other in names:
                row[f"callback_vs_{other}"] = {"p50_ms": row["callback"]["p50_ms"] - row[other]["p50_ms"],
                                               "rps_ratio": row["callback"]["rps"] / row[other]["rps"]}


def verdict(row: dict) -> str:
    return " ".join(f"{k} {'MET' if v else 'MISSED'}" for k, v in row.get("goals_met", {}).items())


GOAL_TEXT = (f"goals: +<= {GOALS['added_p50_ms']:.0f} ms p50, +<= {GOALS['added_p99_ms']:.0f} ms p99, "
             f"throughput >= {GOALS['throughput_ratio']:.2f} of plain")


def print_closed(rows: list[dict], names: list[str]) -> None:
    print("\nclosed loop (clients send back to back: capacity; medians over the runs)")
    print(f"{'clients':>7} | " + " | ".join(f"{n + ' rps':>13} {'p50':>7} {'p99':>7}" for n in names)
          + (f" | {'+p50':>7} {'+p99':>7} {'ratio':>6}" if "routenlp" in names and "plain" in names else "")
          + f" | load1 | {GOAL_TEXT}")
    for row in rows:
        line = f"{row['concurrency']:>7} | " + " | ".join(
            f"{row[n]['rps']:>13.1f} {row[n]['p50_ms']:>7.1f} {row[n]['p99_ms']:>7.1f}" for n in names)
        if "added_p50_ms" in row:
            line += (f" | {row['added_p50_ms']:>+7.1f} {row['added_p99_ms']:>+7.1f} {row['throughput_ratio']:>6.3f}")
        line += f" | {row['load1']:5.2f} | {verdict(row)}"
        errors = sum(row[n]["errors"] for n in names)
        print(line + (f" | errors {errors}" if errors else ""))
        if row["concurrency"] == 1 and "added_p50_ms" in row:
            print(f"{'':>7}   per-request work at one client: {row['added_p50_ms']:+.1f} ms p50 (goal +<= 2 ms)")
    if rows and all("cpu_ms_per_request" in row[n] for n in names):
        print(f"{'':>7}   proxy CPU per request (all threads; median over runs): " + "; ".join(
            f"c={row['concurrency']}: " + ", ".join(f"{n} {row[n]['cpu_ms_per_request']:.2f} ms" for n in names)
            for row in rows))
    for row in rows:
        parts = []
        if "callback_vs_plain" in row:
            c = row["callback_vs_plain"]
            parts.append(f"empty callback vs plain {c['p50_ms']:+.1f} ms p50, rps x{c['rps_ratio']:.3f}")
        if "callback_vs_routenlp" in row:
            c = row["callback_vs_routenlp"]
            parts.append(f"plugin vs empty callback {-c['p50_ms']:+.1f} ms p50, rps x{1 / c['rps_ratio']:.3f}")
        if "routenlp_vs_baseline" in row:
            parts.append(baseline_text(row))
        parts += [variant_text(row, v) for v in VARIANTS if f"{v}_vs_plain" in row]
        if parts:
            print(f"{row['concurrency']:>7} | attribution: " + "; ".join(parts))


def baseline_text(row: dict) -> str:
    b = row["routenlp_vs_baseline"]
    return (f"routenlp vs baseline {b['p50_ms']:+.1f} ms p50, {b['p99_ms']:+.1f} ms p99, "
            f"CPU/request {b['cpu_ms_per_request']:+.2f} ms, rps x{b['rps_ratio']:.3f} "
            f"(baseline p50 {row['baseline']['p50_ms']:.1f}, p99 {row['baseline']['p99_ms']:.1f})")


def variant_text(row: dict, variant: str) -> str:
    c = row[f"{variant}_vs_plain"]
    return (f"{variant} vs plain {c['p50_ms']:+.1f} ms p50, {c['p99_ms']:+.1f} ms p99, "
            f"CPU/request {c['cpu_ms_per_request']:+.2f} ms, rps x{c['rps_ratio']:.3f} "
            f"({verdict({'goals_met': c['goals_met']})})")


def print_open(rows: list[dict], capacity: float) -> None:
    print(f"\nopen loop (Poisson arrivals, unbounded in flight, timed from the scheduled arrival; plain's capacity "
          f"{capacity:.1f} req/s; percentiles over all runs' requests)")
    print(f"{'rate':>12} | {'plain p50':>9} {'p99':>7} | {'routenlp p50':>12} {'p99':>7} | {'+p50':>7} {'+p99':>7} | "
          f"{'tput ratio':>10} | load1 | {GOAL_TEXT}")
    for row in rows:
        p, r = row["plain"], row["routenlp"]
        rate = f"{row['offered_rps']:.1f}/s {row['share']:.0%}"
        failed = p["errors"] + r["errors"]
        print(f"{rate:>12} | {p['p50_ms']:>9.1f} {p['p99_ms']:>7.1f} | {r['p50_ms']:>12.1f} {r['p99_ms']:>7.1f} | "
              f"{row['added_p50_ms']:>+7.1f} {row['added_p99_ms']:>+7.1f} | {row['throughput_ratio']:>10.3f} | "
              f"{row['load1']:5.2f} | {verdict(row)} | requests {p['ok']}+{r['ok']}, failed {failed}, "
              f"generator send lag p99 {max(p['send_lag_p99_ms'], r['send_lag_p99_ms']):.1f} ms, "
              f"proxy CPU/request {p['cpu_ms_per_request']:.2f} vs {r['cpu_ms_per_request']:.2f} ms")
        if "routenlp_vs_baseline" in row:
            print(f"{'':>12}   {baseline_text(row)}")
        for variant in VARIANTS:
            if f"{variant}_vs_plain" in row:
                print(f"{'':>12}   {variant_text(row, variant)}")


if __name__ == "__main__":
    sys.exit(main())
