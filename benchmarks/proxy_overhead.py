"""What the RouteNLP plugin adds to the LiteLLM proxy: latency, throughput and memory.

    .venv/bin/python benchmarks/proxy_overhead.py [--duration 10] [--concurrency 1 50 200] [--repeats 3]
                                                  [--open-fraction 0.5]

Real ``litellm --config`` proxies on loopback with the SAME four deployments of the alias
``routenlp`` (one per tier), differing only in ``litellm_settings.callbacks``:

* ``plain``: LiteLLM alone (its default ``simple-shuffle`` routing over the four deployments);
* ``routenlp``: the same plus ``litellm_routenlp.proxy_hook.routenlp`` with the shipped router
  (int8 ONNX), thresholds and a durable, fsync'd decision log;
* ``callback`` (attribution only): the same plus a ``CustomLogger`` that overrides nothing, so
  ``routenlp - callback`` is the plugin's own work and ``callback - plain`` what LiteLLM's callback
  machinery costs any callback.

Every deployment answers with LiteLLM's own ``mock_response`` (a fixed chat completion with one
confident logprob per token, no network, no model).  That isolates the proxy: a real tier's latency would
only add the same constant to both sides.  Because the mock answers are confident, the plugin's
cascade computes u and keeps the answer (no escalation: an escalation is a second model call, which is
the feature, not overhead).  The per-request work measured is the plugin's: task resolution and
validation, the router (tokenise + MiniLM + head), deployment filtering, u from the logprobs, the
headers, and one fsync'd decision record.

Load: N closed-loop clients (aiohttp, keep-alive) each send requests back to back for ``--duration``
seconds after a short warm-up; the queries are real banking77 test texts with ``metadata.task``.
Then (``--open-fraction``, default 0.5) the 50- and 200-client runs are repeated with think time:
each client waits an exponential pause between sends so that together they offer half of plain
LiteLLM's best closed-loop rate.  Closed loop measures capacity (the throughput ratio); there, a
request's latency is mostly the queue of the other clients ahead of it, so any lost capacity shows
up as hundreds of added milliseconds.  The open-loop runs measure the latency the plugin adds when
the proxy is not saturated.  Runs alternate between the configs (order rotated every repeat) so drifting load from other processes
hits all alike; each figure is the median over the repeats.  Both proxies, the load generator and anything else running share this machine's CPUs: the
load average is printed with the figures.  Memory: RSS of each proxy process (and its children) idle
after start-up, and after the load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
    plugin = {"model_list": model_list,
              "litellm_settings": {"callbacks": "litellm_routenlp.proxy_hook.routenlp"},
              "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
              "routenlp_settings": settings}
    callback = {**plain, "litellm_settings": {"callbacks": "noop_callback.noop"}}
    (work / "noop_callback.py").write_text(NOOP_CALLBACK)
    paths = {}
    for name, document in (("plain", plain), ("callback", callback), ("routenlp", plugin)):
        paths[name] = work / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(document, sort_keys=False))
    return paths


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


async def load(base_url: str, key: str, bodies: list[bytes], clients: int, duration: float,
               warmup: float, offered_rps: float | None = None, seed: int = 0) -> dict:
    """Run ``clients`` concurrent clients for ``warmup + duration`` seconds.

    ``offered_rps`` None: closed loop, each client sends its next request as soon as the last one is
    answered (saturates the proxy: measures throughput).  Otherwise each client waits an exponential
    think time between sends so that all of them together offer ``offered_rps`` requests/s (users
    with think time: measures the latency a request sees when the proxy is not overloaded).
    """
    import aiohttp

    latencies: list[float] = []
    errors: dict[str, int] = {}
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    started = time.perf_counter()
    measure_from = started + warmup
    stop_at = measure_from + duration
    counted = 0

    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        async def client(index: int) -> None:
            nonlocal counted
            i = index
            rng = np.random.default_rng(seed * 100003 + index)
            next_send = started + (rng.exponential(clients / offered_rps) if offered_rps else 0.0)
            while True:
                now = time.perf_counter()
                if now >= stop_at:
                    return
                if offered_rps:
                    if next_send > now:
                        await asyncio.sleep(next_send - now)
                    next_send = max(next_send, time.perf_counter()) + rng.exponential(clients / offered_rps)
                    if time.perf_counter() >= stop_at:
                        return
                body = bodies[i % len(bodies)]
                i += clients
                t0 = time.perf_counter()
                try:
                    async with session.post(base_url + "/v1/chat/completions", data=body) as reply:
                        await reply.read()
                        status = reply.status
                except Exception as error:  # counted, never hidden
                    status = type(error).__name__
                t1 = time.perf_counter()
                if t0 >= measure_from and t1 <= stop_at:
                    if status == 200:
                        latencies.append((t1 - t0) * 1000.0)
                        counted += 1
                    else:
                        errors[str(status)] = errors.get(str(status), 0) + 1

        await asyncio.gather(*(client(i) for i in range(clients)))
    array = np.array(latencies) if latencies else np.array([float("nan")])
    return {"ok": counted, "errors": errors, "rps": counted / duration,
            "p50_ms": float(np.percentile(array, 50)), "p99_ms": float(np.percentile(array, 99)),
            "mean_ms": float(array.mean())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds at the start of each run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 50, 200])
    parser.add_argument("--repeats", type=int, default=3, help="runs per (config, concurrency), alternating")
    parser.add_argument("--configs", nargs="+", default=["plain", "callback", "routenlp"],
                        choices=["plain", "callback", "routenlp"])
    parser.add_argument("--open-fraction", type=float, default=0.5,
                        help="after the closed-loop runs, run the same clients with think time offering this "
                             "share of plain LiteLLM's best closed-loop throughput (0: skip)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from routenlp_core.tasks import get_task

    texts = [e.text for e in get_task("banking77").load("test", limit=500, seed=9)]
    bodies = [json.dumps({"model": "routenlp", "messages": [{"role": "user", "content": t}],
                          "metadata": {"task": "banking77"}, "max_tokens": 16}).encode() for t in texts]
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        configs = write_configs(work)
        proxies = {name: ProxyProcess(configs[name], log_path=work / f"{name}.log", cwd=ROOT)
                   for name in ("plain", "callback", "routenlp") if name in args.configs}
        memory: dict[str, dict[str, float]] = {}
        runs: list[dict] = []
        try:
            for name, proxy in proxies.items():
                proxy.start(timeout=300)
                time.sleep(3.0)  # let start-up work settle before measuring idle memory
                memory[name] = {"idle_rss_mb": rss_mb(proxy.process.pid), "start_seconds": proxy.start_seconds}
            # sanity: both answer, and the plugin proxy routes (its headers are present)
            import urllib.request

            for name, proxy in proxies.items():
                request = urllib.request.Request(proxy.base_url + "/v1/chat/completions", data=bodies[0],
                                                 headers={"Authorization": f"Bearer {proxy.master_key}",
                                                          "Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=60) as reply:
                    routed = reply.headers.get("x-routenlp-tier")
                    if (name == "routenlp") != (routed is not None):
                        raise SystemExit(f"{name} proxy: unexpected x-routenlp-tier header {routed!r}")
            def run_cell(phase: str, concurrency: int, offered: float | None) -> None:
                for repeat in range(args.repeats):
                    names = list(proxies)
                    shift = repeat % len(names)
                    order = names[shift:] + names[:shift]
                    if repeat % 2:
                        order.reverse()
                    for name in order:
                        proxy = proxies[name]
                        before = os.getloadavg()[0]
                        result = asyncio.run(load(proxy.base_url, proxy.master_key, bodies, concurrency,
                                                  args.duration, args.warmup, offered_rps=offered, seed=repeat))
                        result.update(config=name, concurrency=concurrency, repeat=repeat, load1_before=before,
                                      load1_after=os.getloadavg()[0], phase=phase, offered_rps=offered)
                        runs.append(result)
                        print(f"  {phase:<6} {name:<9} c={concurrency:<4} rep={repeat} ok={result['ok']:<6} "
                              f"rps={result['rps']:7.1f} p50={result['p50_ms']:8.1f} p99={result['p99_ms']:8.1f} "
                              f"errors={result['errors']} load1={before:.2f}", flush=True)
                        time.sleep(1.0)

            for concurrency in args.concurrency:
                run_cell("closed", concurrency, None)
            if args.open_fraction > 0:
                # the same clients with think time, offering a fixed share of what plain LiteLLM sustained
                plain_capacity = max(float(np.median([r["rps"] for r in runs if r["config"] == "plain"
                                                      and r["concurrency"] == c])) for c in args.concurrency)
                for concurrency in args.concurrency:
                    if concurrency > 1:
                        run_cell("open", concurrency, args.open_fraction * plain_capacity)
            for name, proxy in proxies.items():
                memory[name]["after_load_rss_mb"] = rss_mb(proxy.process.pid)
        finally:
            for proxy in proxies.values():
                proxy.stop()
        decision_records = sum(1 for _ in open(work / "decisions.jsonl")) if (work / "decisions.jsonl").exists() else 0
    load_at_end = os.getloadavg()

    names = list(memory)
    summary = []
    cells = [("closed", c) for c in args.concurrency] + \
        sorted({("open", r["concurrency"]) for r in runs if r["phase"] == "open"}, key=lambda cell: cell[1])
    for phase, concurrency in cells:
        row = {"phase": phase, "concurrency": concurrency}
        for name in names:
            mine = [r for r in runs if r["config"] == name and r["concurrency"] == concurrency
                    and r["phase"] == phase]
            row["offered_rps"] = mine[0]["offered_rps"] if mine else None
            # medians of the per-run figures over the repeats; total counts
            row[name] = {"rps": float(np.median([r["rps"] for r in mine])),
                         "p50_ms": float(np.median([r["p50_ms"] for r in mine])),
                         "p99_ms": float(np.median([r["p99_ms"] for r in mine])),
                         "ok": sum(r["ok"] for r in mine),
                         "errors": sum(sum(r["errors"].values()) for r in mine)}
        if "plain" in row and "routenlp" in row:
            row["added_p50_ms"] = row["routenlp"]["p50_ms"] - row["plain"]["p50_ms"]
            row["added_p99_ms"] = row["routenlp"]["p99_ms"] - row["plain"]["p99_ms"]
            row["throughput_ratio"] = row["routenlp"]["rps"] / row["plain"]["rps"]
            row["goals_met"] = {"added_p50": row["added_p50_ms"] <= GOALS["added_p50_ms"],
                                "added_p99": row["added_p99_ms"] <= GOALS["added_p99_ms"]}
            if phase == "closed":  # an open-loop run serves what is offered: its rps says nothing of capacity
                row["goals_met"]["throughput"] = row["throughput_ratio"] >= GOALS["throughput_ratio"]
        if "callback" in row:
            for other in ("plain", "routenlp"):
                if other in row:
                    row[f"callback_vs_{other}"] = {
                        "p50_ms": row["callback"]["p50_ms"] - row[other]["p50_ms"],
                        "p99_ms": row["callback"]["p99_ms"] - row[other]["p99_ms"],
                        "rps_ratio": row["callback"]["rps"] / row[other]["rps"]}
        summary.append(row)

    print()
    print(f"LiteLLM proxy with and without the RouteNLP plugin (same 4 mock_response deployments), "
          f"{args.duration:.0f} s x {args.repeats} alternating runs per cell, median of runs")
    print(f"load average at start {load_at_start[0]:.2f} {load_at_start[1]:.2f} {load_at_start[2]:.2f}, "
          f"at end {load_at_end[0]:.2f} {load_at_end[1]:.2f} {load_at_end[2]:.2f}; cpus {os.cpu_count()}")
    if any(row["phase"] == "open" for row in summary):
        print(f"closed = clients send back to back (saturation); open = clients with think time offering "
              f"{args.open_fraction:.0%} of plain's best closed-loop rate")
    header = f"{'phase':<6} {'clients':>7} | " + " | ".join(f"{name + ' rps':>13} {'p50':>7} {'p99':>7}"
                                                            for name in names)
    print(header)
    print("-" * len(header))
    for row in summary:
        print(f"{row['phase']:<6} {row['concurrency']:>7} | " + " | ".join(
            f"{row[n]['rps']:>13.1f} {row[n]['p50_ms']:>7.1f} {row[n]['p99_ms']:>7.1f}" for n in names)
            + f"   errors {sum(row[n]['errors'] for n in names)}")
    if "plain" in names and "routenlp" in names:
        print()
        print(f"{'phase':<6} {'clients':>7} | {'+p50 ms':>8} {'+p99 ms':>8} {'rps ratio':>9} | plugin vs plain "
              f"(goal: +<= {GOALS['added_p50_ms']:.0f} / +<= {GOALS['added_p99_ms']:.0f} ms, "
              f">= {GOALS['throughput_ratio']:.0%})")
        for row in summary:
            verdict = ", ".join(f"{k} {'MET' if v else 'MISSED'}" for k, v in row["goals_met"].items())
            print(f"{row['phase']:<6} {row['concurrency']:>7} | {row['added_p50_ms']:>+8.1f} "
                  f"{row['added_p99_ms']:>+8.1f} {row['throughput_ratio']:>9.3f} | {verdict}")
    if "callback" in names:
        print()
        print("attribution: an empty CustomLogger vs plain (LiteLLM's callback machinery), and the plugin vs that")
        for row in summary:
            parts = []
            if "callback_vs_plain" in row:
                c = row["callback_vs_plain"]
                parts.append(f"empty callback vs plain: {c['p50_ms']:+.1f} ms p50, rps x{c['rps_ratio']:.3f}")
            if "callback_vs_routenlp" in row:
                c = row["callback_vs_routenlp"]
                parts.append(f"plugin vs empty callback: {-c['p50_ms']:+.1f} ms p50, rps x{1 / c['rps_ratio']:.3f}")
            print(f"{row['phase']:<6} {row['concurrency']:>7} | " + "; ".join(parts))
    print()
    for name, mem in memory.items():
        print(f"{name:<9} proxy RSS: idle {mem['idle_rss_mb']:.0f} MB, after load {mem['after_load_rss_mb']:.0f} MB "
              f"(started in {mem['start_seconds']:.1f} s)")
    if "plain" in memory and "routenlp" in memory:
        added_idle = memory["routenlp"]["idle_rss_mb"] - memory["plain"]["idle_rss_mb"]
        added_after = memory["routenlp"]["after_load_rss_mb"] - memory["plain"]["after_load_rss_mb"]
        print(f"plugin adds {added_idle:+.0f} MB idle, {added_after:+.0f} MB after load; "
              f"decision records written: {decision_records}")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "summary": summary, "memory": memory,
                                         "load_at_start": load_at_start, "load_at_end": load_at_end}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
