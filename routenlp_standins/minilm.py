"""The MiniLM encoder and tokenizer shared by the classifier, retrieval and replay stand-ins.

One ONNX session per artifacts root serves all three tiers (and the build), so the proxy holds one
copy of the 23 MB int8 graph.  The tokenizer here is the encoder's own WordPiece vocabulary, used
for two things the encoder does not do: count prompt tokens without its 256-token truncation (the
usage a call is priced on), and cut an answer into pieces that concatenate back to the exact text
(the "tokens" these tiers report logprobs for).
"""

from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path

import numpy as np

from routenlp_standins.artifacts import encoder_dir, require_file


class MiniLM:
    """Embeddings (int8 ONNX, 1 thread: a short query takes ~2.4 ms) plus token counting/splitting."""

    def __init__(self, root: Path, threads: int = 1) -> None:
        from tokenizers import Tokenizer

        from litellm_routenlp.encoder import ENCODER_FILES, OnnxSentenceEncoder

        directory = encoder_dir(root)
        for name in ENCODER_FILES:
            require_file(directory / name, "MiniLM encoder", root)
        self.encoder = OnnxSentenceEncoder(directory, quantized=True, threads=threads)
        self._tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        # onnxruntime sessions are thread-safe, but the tokenizers object is shared: keep calls serial.
        self._lock = threading.Lock()

    def encode(self, texts: list[str]) -> np.ndarray:
        """(n, 384) float32, L2-normalised rows."""
        with self._lock:
            return self.encoder.encode(texts)

    def count_tokens(self, text: str) -> int:
        """WordPiece tokens of ``text`` (no special tokens, no truncation)."""
        with self._lock:
            return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def pieces(self, text: str) -> list[str]:
        """Split ``text`` into WordPiece-aligned pieces whose concatenation is exactly ``text``.

        Each piece carries the whitespace before it, so a stream of pieces reproduces the answer
        byte for byte.
        """
        with self._lock:
            offsets = self._tokenizer.encode(text, add_special_tokens=False).offsets
        ends = [end for _, end in offsets if end > 0]
        pieces: list[str] = []
        start = 0
        for end in ends:
            if end > start:
                pieces.append(text[start:end])
                start = end
        if start < len(text):
            if pieces:
                pieces[-1] += text[start:]
            else:
                pieces.append(text[start:])
        return pieces


@lru_cache(maxsize=4)
def _shared(root_key: str) -> MiniLM:
    return MiniLM(Path(root_key))


def shared_minilm(root: Path) -> MiniLM:
    """The process-wide :class:`MiniLM` for ``root`` (loaded once)."""
    return _shared(str(Path(root).resolve()))
