"""The MiniLM encoder and tokenizer shared by the classifier, retrieval and replay stand-ins.

One ONNX session per artifacts root serves all three tiers (and the build), so the proxy holds one
copy of the 23 MB int8 graph.  The tokenizer here is the encoder's own WordPiece vocabulary, used
for two things the encoder does not do: count prompt tokens without its 256-token truncation (the
usage a call is priced on), and cut an answer into pieces that concatenate back to the exact text
(the "tokens" these tiers report logprobs for).
"""

from __future__ import annotations

import threading
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from litellm_routenlp.encoder import ENCODER_FILES, OnnxSentenceEncoder
from routenlp_standins.artifacts import encoder_dir, require_file


class MiniLM:
    """Embeddings (int8 ONNX, 1 thread: a short query takes ~2.4 ms) plus token counting/splitting."""

    def __init__(self, root: Path, threads: int = 1) -> None:
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
        """WordPiece tokens of ``text`` (no special tokens, no truncation): the usage a call is priced on.

        A long text is counted in pieces of at most :data:`COUNT_CHUNK_CHARS` characters cut at
        whitespace, with a GIL hand-off between pieces: one ``encode`` of a 5 MB prompt holds the GIL
        for seconds and stalls the proxy's event loop (issue 11), while WordPiece never joins text
        across whitespace, so the pieces' counts add up to the whole text's (exactly, unless a single
        "word" is longer than a piece)."""
        total = 0
        for piece in whitespace_chunks(text, COUNT_CHUNK_CHARS):
            with self._lock:
                total += len(self._tokenizer.encode(piece, add_special_tokens=False).ids)
            time.sleep(0)  # let the event loop's thread take the GIL
        return total

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


COUNT_CHUNK_CHARS = 8192  # ~5 ms of tokenising per piece


def whitespace_chunks(text: str, size: int) -> list[str]:
    """``text`` cut into consecutive pieces of at most ``size`` characters, each ending at whitespace
    when there is any in its window (the pieces concatenate back to ``text``)."""
    if len(text) <= size:
        return [text]
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
            end = cut + 1 if cut > start else end
        out.append(text[start:end])
        start = end
    return out


@lru_cache(maxsize=4)
def _shared(root_key: str) -> MiniLM:
    return MiniLM(Path(root_key))


def shared_minilm(root: Path) -> MiniLM:
    """The process-wide :class:`MiniLM` for ``root`` (loaded once)."""
    return _shared(str(Path(root).resolve()))
