"""Router decision latency inside the real proxy, and the proxy's start-up time.

    .venv/bin/python benchmarks/proxy_router_latency.py [--requests 1000] [--concurrency 4]

Starts ``litellm --config proxy_config.yaml`` on loopback with a private decision log, sends real
held-out intent queries (banking77 + clinc150, served mostly by the in-process T1 classifier so the
run is quick), and reports the router's own time per request as the plugin measured it
(``router.router_ms`` in each decision record: tokenise + ONNX encoder + ONNX head), next to the
end-to-end request latency seen by the client in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from litellm_routenlp.decision_log import read_decisions  # noqa: E402
from litellm_routenlp.proxy_process import ProxyProcess  # noqa: E402


def private_config(work: Path) -> Path:
    document = yaml.safe_load((ROOT / "proxy_config.yaml").read_text())
    settings = document["routenlp_settings"]
    for key in ("router_artifact", "thresholds_path"):
        settings[key] = str((ROOT / settings[key]).resolve())
    settings["decision_log_path"] = str(work / "decisions.jsonl")
    path = work / "proxy_config.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


async def send_all(base_url: str, key: str, queries: list[tuple[str, str]], concurrency: int) -> list[float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=key, timeout=120, max_retries=0)
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(task: str, text: str) -> None:
        async with semaphore:
            started = time.perf_counter()
            await client.chat.completions.create(model="routenlp", messages=[{"role": "user", "content": text}],
                                                 metadata={"task": task}, max_tokens=16)
            latencies.append((time.perf_counter() - started) * 1000.0)

    await asyncio.gather(*(one(task, text) for task, text in queries))
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    from routenlp_core.tasks import get_task

    half = args.requests // 2
    queries = [("banking77", e.text) for e in get_task("banking77").load("test", limit=half, seed=5)]
    queries += [("clinc150", e.text) for e in get_task("clinc150").load("test", limit=args.requests - half, seed=5)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        proxy = ProxyProcess(private_config(work), log_path=work / "proxy.log", cwd=ROOT)
        proxy.start(timeout=300)
        try:
            started = time.perf_counter()
            latencies = asyncio.run(send_all(proxy.base_url, proxy.master_key, queries, args.concurrency))
            wall = time.perf_counter() - started
        finally:
            proxy.stop()
        records = list(read_decisions(work / "decisions.jsonl"))
    router_ms = np.array([r["router"]["router_ms"] for r in records if r.get("router", {}).get("router_ms")])
    end_to_end = np.array(latencies)
    tiers = {}
    for record in records:
        tiers[record.get("final_tier")] = tiers.get(record.get("final_tier"), 0) + 1
    result = {
        "proxy_start_seconds": round(proxy.start_seconds or float("nan"), 2),
        "requests": len(records),
        "router_ms_p50": round(float(np.percentile(router_ms, 50)), 3),
        "router_ms_p99": round(float(np.percentile(router_ms, 99)), 3),
        "router_ms_mean": round(float(router_ms.mean()), 3),
        "request_ms_p50": round(float(np.percentile(end_to_end, 50)), 1),
        "request_ms_p99": round(float(np.percentile(end_to_end, 99)), 1),
        "router_share_of_p50_request": round(float(np.percentile(router_ms, 50) / np.percentile(end_to_end, 50)), 4),
        "throughput_rps": round(len(latencies) / wall, 1),
        "final_tiers": tiers,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
