"""``make demo``: start the real proxy with proxy_config.yaml, send a dozen real requests, print a table.

The requests are held-out queries of the demo tasks (intent classification on banking77 and clinc150,
customer-support answers on bitext) plus two written here, so the router sees easy and hard ones.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from litellm_routenlp.proxy_process import ProxyProcess

WRITTEN_QUERIES = [
    ("banking77", "my card got eaten by the atm, what now?"),
    ("bitext", "hi, i was charged twice for the same order and i want one of the payments back"),
]


def demo_queries(per_task: int = 3, seed: int = 7) -> list[tuple[str, str]]:
    from routenlp_core.tasks import get_task

    queries = []
    for task in ("banking77", "clinc150", "bitext"):
        examples = get_task(task).load("test", limit=per_task + 20, seed=seed)[-per_task:]
        queries.extend((task, example.text) for example in examples)
    return queries + WRITTEN_QUERIES


def run(config: str, port: int | None, keep: bool) -> int:
    from openai import OpenAI

    log_path = Path("logs/demo_proxy.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proxy = ProxyProcess(config, port=port, log_path=log_path)
    print(f"starting litellm --config {config} on {proxy.base_url} (log: {log_path}) ...", flush=True)
    proxy.start()
    print(f"proxy healthy after {proxy.start_seconds:.1f}s\n")
    try:
        client = OpenAI(base_url=proxy.base_url, api_key=proxy.master_key, timeout=300)
        header = f"{'task':<10} {'tier':<4} {'tried':<9} {'uncertainty':<16} {'cost $':>10} {'ms':>6}  query -> answer"
        print(header)
        print("-" * len(header))
        total = 0.0
        for task, text in demo_queries():
            started = time.perf_counter()
            raw = client.chat.completions.with_raw_response.create(
                model="routenlp", messages=[{"role": "user", "content": text}], metadata={"task": task},
                max_tokens=48)
            elapsed = (time.perf_counter() - started) * 1000
            completion = raw.parse()
            h = raw.headers
            answer = (completion.choices[0].message.content or "").replace("\n", " ")
            cost = float(h.get("x-routenlp-total-cost", "0"))
            total += cost
            print(f"{task:<10} {h.get('x-routenlp-tier', '?'):<4} {h.get('x-routenlp-path', '?'):<9} "
                  f"{h.get('x-routenlp-uncertainty', '?'):<16} {cost:>10.6f} {elapsed:>6.0f}  "
                  f"{text[:50]!r} -> {answer[:60]!r}")
        print(f"\ntotal cost of the demo requests: ${total:.6f}")
        print("decision log: logs/routenlp_decisions.jsonl")
        if keep:
            print(f"\nproxy left running on {proxy.base_url}; master key {proxy.master_key}; Ctrl-C stops it")
            proxy.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        proxy.stop()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="proxy_config.yaml")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="leave the proxy running after the table")
    args = parser.parse_args()
    return run(args.config, args.port, args.keep)


if __name__ == "__main__":
    sys.exit(main())
