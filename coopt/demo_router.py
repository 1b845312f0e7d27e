"""Rebuild the shipped demo router and thresholds from real tier answers (``make router``).

1. label held-out queries of the demo tasks with every tier of ``proxy_config.yaml`` (the test splits:
   T1 and T3 learned from the train splits, so their train-split answers would flatter them);
2. split the labelled queries by a hash of their id into router-training (60%) and calibration (40%);
3. ``train_router`` (frozen encoder) twice on the same labels: on the static encoder ->
   ``artifacts/router`` (what the proxy serves: the router's decision costs well under a
   millisecond) and on MiniLM -> ``artifacts/router-minilm`` (the slower alternative; the latency
   benchmark compares the two);
4. ``calibrate`` on the calibration part, under the served router -> ``artifacts/thresholds.json``
   (the paper's rule, the proxy's default policy), and ``calibrate_cascade_routing`` on the same part
   -> ``artifacts/policy-cascade-routing.json`` (the certified cascade routing policy; serve it with
   ``thresholds_path: artifacts/policy-cascade-routing.json``).

Labelling is the slow step (about 13-20 minutes on 2 cores, SmolLM2 answering bitext); with
``relabel=False`` an existing ``artifacts/labels/demo_allpairs.jsonl`` is reused, so retraining and
recalibrating take seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

from routenlp_core.allpairs import load_portfolio, read_allpairs, write_allpairs
from calibration.calibrate import calibrate, calibrate_cascade_routing
from coopt.label import iter_examples, label_examples
from coopt.train_router import train_router

DEMO_TASKS = ("banking77", "clinc150", "bitext")
# Enough tokens for a label; a support answer is cut at 48 tokens to keep CPU labelling affordable.
MAX_TOKENS = 48


def is_calibration_id(query_id: str, fraction: float = 0.4) -> bool:
    digest = hashlib.sha256(query_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def build_demo_router(artifacts: str | Path, config_path: str | Path = "proxy_config.yaml",
                      per_task: int = 250, seed: int = 0, relabel: bool = True) -> None:
    artifacts = Path(artifacts)
    labels_dir = artifacts / "labels"
    labelled = labels_dir / "demo_allpairs.jsonl"
    if relabel or not labelled.is_file():
        examples = iter_examples(DEMO_TASKS, "test", per_task, seed=seed)
        asyncio.run(label_examples(config_path, examples, labelled, concurrency=2, max_tokens=MAX_TOKENS))
    else:
        print(f"reusing the labels in {labelled} (relabel with --relabel)")
    portfolio = load_portfolio(artifacts / "portfolio.yaml")
    records = read_allpairs(labelled, portfolio)
    train_part = [r for r in records if not is_calibration_id(r.id)]
    calib_part = [r for r in records if is_calibration_id(r.id)]
    train_path, calib_path = labels_dir / "demo_train.jsonl", labels_dir / "demo_calibration.jsonl"
    write_allpairs(train_part, train_path)
    write_allpairs(calib_part, calib_path)
    for out, encoder in (("router", "encoder-static"), ("router-minilm", "encoder")):
        report = train_router(train_part, portfolio, artifacts / out, mode="frozen",
                              encoder_dir=artifacts / encoder, seed=seed)
        print(f"{out} ({encoder}): {report}")
    result = calibrate(calib_path, portfolio, router_artifact=artifacts / "router", alpha=0.05,
                       out_path=artifacts / "thresholds.json")
    print(json.dumps(result.get("thresholds", {}), indent=1))
    policy = calibrate_cascade_routing(calib_path, portfolio, router_artifact=artifacts / "router",
                                       out_path=artifacts / "policy-cascade-routing.json", seed=seed)
    for task, entry in policy["tasks"].items():
        print(f"cascade_routing {task}: {(entry.get('certificate') or {}).get('message')}")
