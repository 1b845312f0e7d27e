"""How close the static router encoder stays to MiniLM, on text neither was tuned on.

    .venv/bin/python benchmarks/static_encoder_quality.py [--untuned DIR]

Prints, for the shipped static encoder (``artifacts/encoder-static``), MiniLM (``artifacts/encoder``)
and optionally an untuned static table (``routenlp export-encoder --static --no-tune --out DIR``):

* the mean cosine between each encoder's embedding and MiniLM's, over up to 200 test-split texts of
  each of the 8 enterprise tasks (the static encoder's tuning read only train splits);
* nearest-intent-centroid accuracy on banking77 and clinc150: centroids of 3,000 train-split
  queries, scored on 500 test-split queries.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def centroid_accuracy(encoder, task: str) -> float:
    from routenlp_core.tasks import get_task

    spec = get_task(task)
    train, test = spec.load("train", limit=3000, seed=0), spec.load("test", limit=500, seed=0)
    labels = sorted({example.reference for example in train})
    index = {label: i for i, label in enumerate(labels)}
    x = encoder.encode([example.text for example in train])
    y = np.array([index[example.reference] for example in train])
    centroids = np.stack([x[y == i].mean(axis=0) for i in range(len(labels))])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    predicted = (encoder.encode([example.text for example in test]) @ centroids.T).argmax(axis=1)
    return float(np.mean([labels[p] == example.reference for p, example in zip(predicted, test)]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--static", type=Path, default=ROOT / "artifacts" / "encoder-static")
    parser.add_argument("--minilm", type=Path, default=ROOT / "artifacts" / "encoder")
    parser.add_argument("--untuned", type=Path, default=None, help="an untuned static table, for comparison")
    args = parser.parse_args()

    from routenlp_core.tasks import TASKS, get_task
    from litellm_routenlp.encoder import OnnxSentenceEncoder

    encoders = {"static": OnnxSentenceEncoder(args.static), "minilm": OnnxSentenceEncoder(args.minilm, quantized=False)}
    if args.untuned is not None:
        encoders["static-untuned"] = OnnxSentenceEncoder(args.untuned)
    texts = [example.text for name in TASKS for example in get_task(name).load("test", limit=200, seed=1)]
    reference = encoders["minilm"].encode(texts)
    print(f"{'encoder':<16}{'cos vs MiniLM':>14}{'banking77':>11}{'clinc150':>10}   ({len(texts)} held-out texts)")
    for name, encoder in encoders.items():
        cosine = float(np.mean(np.sum(encoder.encode(texts) * reference, axis=1))) if encoder.dim == reference.shape[1] \
            else float("nan")  # an untuned table has its own width and space: no cosine with MiniLM
        print(f"{name:<16}{cosine:>14.3f}{centroid_accuracy(encoder, 'banking77'):>11.3f}"
              f"{centroid_accuracy(encoder, 'clinc150'):>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
