"""What the router's decision costs inside a busy proxy, step by step: CPU and wall time.

    .venv/bin/python benchmarks/router_in_proxy.py [--rate 31] [--duration 20] [--switch-interval-ms 0.5]
                                                   [--router-execution process]

One real ``litellm --config`` proxy with the plugin and the four ``mock_response`` deployments of
``benchmarks/proxy_overhead.py``, loaded by Poisson arrivals at ``--rate`` req/s (banking77 test
queries).  Its callback is the plugin with each router step wrapped in a timer (``time.perf_counter``
for wall time, ``time.thread_time`` for the event loop thread's CPU): the tokenizer, the encoder, the
head and ``decide`` as a whole.  The same steps are then timed in a tight loop in this process (warm
caches), as a reference.

``benchmarks/proxy_router_latency.py`` reports the decision's wall time from the decision records;
this one splits it by step and sets CPU beside wall time, which says why it is slow.

Wall time well above CPU time on a step that calls native code is time spent getting the GIL back:
ONNX Runtime (and numpy on large arrays) release it, and a thread that wants it back waits up to
Python's switch interval (5 ms by default) behind LiteLLM's worker threads.
``--switch-interval-ms`` sets ``sys.setswitchinterval`` inside the proxy to test that: the tail
should shrink.  Only a measurement; the plugin does not change the interval.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from litellm_routenlp.proxy_process import ProxyProcess  # noqa: E402
from proxy_overhead import closed_loop, open_loop, write_configs  # noqa: E402

STEPS = ("tokenize", "encode", "head", "decide")
PROCESS_STEPS = ("send", "read", "decide")  # router_execution: process, on the event loop

# The callback the proxy loads: the plugin, with its router steps timed; figures go to TIMING_PATH.
TIMED_HOOK = textwrap.dedent('''
    import json, os, sys, time
    from litellm_routenlp.proxy_hook import routenlp

    if os.environ.get("SWITCH_INTERVAL_MS"):
        sys.setswitchinterval(float(os.environ["SWITCH_INTERVAL_MS"]) / 1000.0)
    samples = {}
    out_path = os.environ["TIMING_PATH"]

    def record(name, wall, cpu):
        if os.path.exists(out_path + ".reset"):  # the warm-up is over: count from here
            os.remove(out_path + ".reset")
            samples.clear()
        samples.setdefault(name, []).append(((time.perf_counter() - wall) * 1e3, (time.thread_time() - cpu) * 1e3))
        if name == "decide" and len(samples[name]) % 50 == 0:
            with open(out_path + ".tmp", "w") as handle:
                json.dump(samples, handle)
            os.replace(out_path + ".tmp", out_path)

    def timed(name, function):
        def wrapper(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                record(name, wall, cpu)
        return wrapper

    def timed_wall(name, function):  # a coroutine: its CPU figure would count whatever ran while it waited
        async def wrapper(*args, **kwargs):
            wall = time.perf_counter()
            try:
                return await function(*args, **kwargs)
            finally:
                record(name, wall, time.thread_time())
        return wrapper

    if routenlp.router_process is None:
        router = routenlp.router
        tokenizer = router.encoder.tokenizer
        router.encoder.tokenizer = type("Timed", (), {"encode": staticmethod(timed("tokenize", tokenizer.encode))})()
        router.encoder.encode = timed("encode", router.encoder.encode)
        router._run = timed("head", router._run)
        routenlp.decide = timed("decide", routenlp.decide)
    else:  # router_execution: process: what the event loop still does (the router runs in the other process)
        process = routenlp.router_process
        process._send = timed("send", process._send)
        process._drain = timed("read", process._drain)
        routenlp.decide_async = timed_wall("decide", routenlp.decide_async)
''')


def summary(rows: list[list[float]]) -> dict[str, float]:
    wall, cpu = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    return {"n": len(rows), "wall_p50_ms": float(np.percentile(wall, 50)), "wall_p90_ms": float(np.percentile(wall, 90)),
            "cpu_p50_ms": float(np.percentile(cpu, 50)), "cpu_p90_ms": float(np.percentile(cpu, 90))}


def tight_loop(texts: list[str], repeats: int = 2000) -> dict[str, float]:
    """Median CPU per step of the same router in this process, back to back (warm caches)."""
    from litellm_routenlp.router_model import RouterModel

    router = RouterModel.load(ROOT / "artifacts" / "router", quantized=True)
    text = texts[0]
    embedding, task_ids = router.embed([text]), router._task_ids(["banking77"])
    steps = {"tokenize": lambda: router.encoder.tokenizer.encode(text),
             "encode": lambda: router.encoder.encode([text]),
             "head": lambda: router._run(embedding, task_ids),
             "decide": lambda: router.predict([text], ["banking77"])}
    out = {}
    for name, step in steps.items():
        step()
        started = time.thread_time()
        for _ in range(repeats):
            step()
        out[name] = (time.thread_time() - started) * 1e3 / repeats
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=31.0, help="offered Poisson rate, req/s")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals")
    parser.add_argument("--switch-interval-ms", type=float, default=None,
                        help="sys.setswitchinterval inside the proxy (default: Python's 5 ms)")
    parser.add_argument("--router-execution", choices=["in_proxy", "process"], default="in_proxy",
                        help="routenlp_settings.router_execution; with process, the event loop's own steps "
                             "(writing the query, reading the estimates) are timed, and decide's wall time")
    args = parser.parse_args()
    from routenlp_core.tasks import get_task

    texts = [e.text for e in get_task("banking77").load("test", limit=500, seed=9)]
    bodies = [json.dumps({"model": "routenlp", "messages": [{"role": "user", "content": t}],
                          "metadata": {"task": "banking77"}, "max_tokens": 16}).encode() for t in texts]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        document = yaml.safe_load(write_configs(work)["routenlp"].read_text())
        document["litellm_settings"]["callbacks"] = "timed_hook.routenlp"
        document["routenlp_settings"]["router_execution"] = args.router_execution
        config = work / "timed.yaml"
        config.write_text(yaml.safe_dump(document, sort_keys=False))
        (work / "timed_hook.py").write_text(TIMED_HOOK)
        env = {"PYTHONPATH": os.pathsep.join([str(work), str(ROOT)]), "TIMING_PATH": str(work / "timing.json")}
        if args.switch_interval_ms is not None:
            env["SWITCH_INTERVAL_MS"] = str(args.switch_interval_ms)
        proxy = ProxyProcess(config, log_path=work / "proxy.log", cwd=ROOT, env=env).start()
        try:
            asyncio.run(closed_loop(proxy.base_url, proxy.master_key, bodies, 4, 3, 1, 30))  # warm-up
            (work / "timing.json.reset").touch()
            result = asyncio.run(open_loop(proxy.base_url, proxy.master_key, bodies, args.rate, args.duration, 7, 30))
            time.sleep(1.0)
        finally:
            proxy.stop()
        samples = json.loads((work / "timing.json").read_text())
    alone = tight_loop(texts)
    interval = f"{args.switch_interval_ms} ms" if args.switch_interval_ms is not None else "5 ms (Python's default)"
    print(f"router steps inside the proxy at {args.rate:g} req/s offered for {args.duration:g} s "
          f"(switch interval {interval}, router_execution {args.router_execution}); requests ok {result['ok']}, p50 {result['p50_ms']:.1f} ms, "
          f"p99 {result['p99_ms']:.1f} ms; load average {os.getloadavg()[0]:.2f}")
    print(f"{'step':<9} | {'n':>5} | {'CPU p50':>8} {'p90':>7} | {'wall p50':>8} {'p90':>7} | "
          f"{'alone, CPU':>10} | in proxy / alone")
    for step in STEPS if args.router_execution == "in_proxy" else PROCESS_STEPS:
        row = summary(samples.get(step, [[0.0, 0.0]]))
        if args.router_execution == "process" and step == "decide":  # awaited: CPU would be other tasks'
            print(f"{step:<9} | {row['n']:>5} | {'-':>8} {'-':>7} | {row['wall_p50_ms']:>8.3f} "
                  f"{row['wall_p90_ms']:>7.3f} | {alone[step]:>10.3f} | (round trip to the router process)")
            continue
        reference = f"{alone[step]:>10.3f} | {row['cpu_p50_ms'] / max(alone[step], 1e-9):.1f}x" if step in alone \
            else f"{'-':>10} |"
        print(f"{step:<9} | {row['n']:>5} | {row['cpu_p50_ms']:>8.3f} {row['cpu_p90_ms']:>7.3f} | "
              f"{row['wall_p50_ms']:>8.3f} {row['wall_p90_ms']:>7.3f} | {reference}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
