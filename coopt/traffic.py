"""Serve a batch of queries through the real LiteLLM proxy, so the next iteration reads a real decision log.

The offline stand-in for a week of production traffic: start ``litellm --config <iteration config>``
on 127.0.0.1, send every query as a client would (model alias + ``metadata.task``), stop the proxy.
The plugin writes its decision records to the log named here (message logging on: the records carry
the query text the clustering needs).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from openai import AsyncOpenAI
from tqdm.auto import tqdm

from litellm_routenlp.config import read_yaml
from litellm_routenlp.proxy_process import ProxyProcess


def traffic_config(config_path: str | os.PathLike[str], decision_log: Path, out_path: Path) -> Path:
    """A copy of ``config_path`` writing its decisions to ``decision_log``, with every path made absolute."""
    source = Path(config_path).resolve()
    document = read_yaml(source)
    settings = dict(document.get("routenlp_settings") or {})
    for key in ("router_artifact", "thresholds_path"):
        if settings.get(key) and not Path(settings[key]).is_absolute():
            settings[key] = str((source.parent / settings[key]).resolve())
    settings["decision_log_path"] = str(decision_log.resolve())
    document["routenlp_settings"] = settings
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return out_path


async def _send(base_url: str, key: str, queries: Sequence[tuple[str, str]], concurrency: int, max_tokens: int,
                progress: bool) -> dict[str, Any]:
    client = AsyncOpenAI(base_url=base_url, api_key=key, timeout=600, max_retries=0)
    semaphore = asyncio.Semaphore(max(1, concurrency))
    bar = tqdm(total=len(queries), desc="traffic through the proxy", disable=not progress)
    errors: list[str] = []

    async def one(task: str, text: str) -> None:
        async with semaphore:
            try:
                await client.chat.completions.create(model="routenlp", messages=[{"role": "user", "content": text}],
                                                     metadata={"task": task}, max_tokens=max_tokens, temperature=0.0)
            except Exception as error:  # counted; the decision log is what the loop reads
                errors.append(f"{type(error).__name__}: {str(error)[:200]}")
            bar.update(1)

    try:
        await asyncio.gather(*(one(task, text) for task, text in queries))
    finally:
        bar.close()
        await client.close()
    return {"sent": len(queries), "errors": len(errors), "first_errors": errors[:3]}


def send_through_proxy(config_path: str | os.PathLike[str], queries: Sequence[tuple[str, str]], decision_log: Path,
                       work_dir: Path, concurrency: int = 4, max_tokens: int = 48, progress: bool = True,
                       env: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Start the proxy on ``config_path`` (decisions -> ``decision_log``), send ``(task, text)`` queries, stop it."""
    config = traffic_config(config_path, decision_log, work_dir / "traffic_proxy_config.yaml")
    started = time.perf_counter()
    proxy = ProxyProcess(config, log_path=work_dir / "traffic_proxy.log", env=env, cwd=Path.cwd())
    proxy.start(timeout=600)
    try:
        report = asyncio.run(_send(proxy.base_url, proxy.master_key, queries, concurrency, max_tokens, progress))
    finally:
        proxy.stop()
    report.update({"proxy_start_seconds": round(proxy.start_seconds or 0.0, 1),
                   "seconds": round(time.perf_counter() - started, 1), "decision_log": str(decision_log)})
    return report
