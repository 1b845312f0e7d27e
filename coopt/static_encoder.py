"""Distil a static (lookup-table) sentence encoder from the exported MiniLM: the fast router encoder.

Why: MiniLM-L6 costs about 10 ms per 128-token query on one core even in int8, which misses the
router's latency goal (p50 <= 3 ms, p99 <= 6 ms up to 128 tokens).  Following Model2Vec
(Tulkens & van Dongen, 2024), every vocabulary token is passed through MiniLM on its own
(``[CLS] token [SEP]``), its mean-pooled output becomes that token's vector, PCA reduces the table to
``dim`` dimensions and each row is weighted by smooth inverse frequency (SIF, Arora et al. 2017) so
that frequent tokens ("the", "?") count less in the mean.  Serving a query is then a table lookup
and a mean: microseconds, and its cost barely grows with length.

The result is written in the *same format* as :func:`coopt.export_encoder.export_encoder`: an ONNX
graph ``input_ids, attention_mask -> last_hidden_state`` (a ``Gather`` on the table, masked), the
tokenizer and ``encoder.json``.  So :class:`litellm_routenlp.encoder.OnnxSentenceEncoder`, the
router's encoder checks, training and the benchmarks use it unchanged; only the encoder directory
differs.  There are no matmuls to quantize, so ``model.int8.onnx`` is the fp32 graph.

Token frequencies for SIF come from the Zipf law on MiniLM's WordPiece vocabulary rank (as
Model2Vec does), so the table depends on nothing but the MiniLM export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from litellm_routenlp.hashing import sha256_file

STATIC_NAME = "routenlp/static-minilm"


def token_vectors(encoder_dir: Path, batch_size: int = 512, progress: bool = True) -> tuple[np.ndarray, list[int]]:
    """(vocab, 384) mean-pooled MiniLM outputs of ``[CLS] t [SEP]`` for every token t; special ids."""
    from tokenizers import Tokenizer

    from litellm_routenlp.encoder import OnnxSentenceEncoder

    encoder = OnnxSentenceEncoder(encoder_dir, quantized=False, threads=2)
    tokenizer = Tokenizer.from_file(str(Path(encoder_dir) / "tokenizer.json"))
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    special = sorted(i for token, i in vocab.items() if token.startswith("[") and token.endswith("]"))
    table = np.zeros((size, encoder.dim), dtype=np.float32)
    feeds_extra = "token_type_ids" in encoder._input_names
    starts = range(0, size, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="static encoder: embedding the vocabulary", unit="batch")
    for start in starts:
        ids = np.arange(start, min(start + batch_size, size), dtype=np.int64)
        batch = np.stack([np.full_like(ids, cls_id), ids, np.full_like(ids, sep_id)], axis=1)
        feeds = {"input_ids": batch, "attention_mask": np.ones_like(batch)}
        if feeds_extra:
            feeds["token_type_ids"] = np.zeros_like(batch)
        hidden = encoder.session.run(None, feeds)[0]
        table[start:start + len(ids)] = hidden.mean(axis=1)
    return table, special


def reduce_and_weight(table: np.ndarray, special: list[int], dim: int, sif_coefficient: float) -> np.ndarray:
    """PCA to ``dim`` columns (centred, float64 SVD) and SIF weights a / (a + p_zipf(rank))."""
    keep = np.ones(len(table), dtype=bool)
    keep[special] = False
    data = table.astype(np.float64)
    mean = data[keep].mean(axis=0)
    _, _, components = np.linalg.svd(data[keep] - mean, full_matrices=False)
    reduced = (data - mean) @ components[:dim].T
    # deterministic sign: the largest-magnitude loading of each component is positive
    signs = np.sign(components[:dim][np.arange(dim), np.abs(components[:dim]).argmax(axis=1)])
    reduced *= signs
    ranks = np.arange(1, len(table) + 1, dtype=np.float64)
    probability = (1.0 / ranks) / (1.0 / ranks).sum()
    weights = sif_coefficient / (sif_coefficient + probability)
    reduced *= weights[:, None]
    reduced[~keep] = 0.0  # [CLS]/[SEP]/[PAD] add nothing to the mean's direction
    return reduced.astype(np.float32)


def _gather_graph(table: np.ndarray):
    """ONNX graph: last_hidden_state = table[input_ids] * attention_mask[..., None]."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["gathered"], axis=0),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "last_axis"], ["mask_3d"]),
        helper.make_node("Mul", ["gathered", "mask_3d"], ["last_hidden_state"]),
    ]
    graph = helper.make_graph(
        nodes, "static_encoder",
        inputs=[helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"]),
                helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "tokens"])],
        outputs=[helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT,
                                               ["batch", "tokens", table.shape[1]])],
        initializer=[numpy_helper.from_array(table, "table"),
                     numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="routenlp")
    model.ir_version = 8
    return model


def export_static_encoder(out_dir: str | Path, source_encoder_dir: str | Path = "artifacts/encoder",
                          dim: int = 256, sif_coefficient: float = 1e-4, max_length: int = 512,
                          progress: bool = True, table: Optional[np.ndarray] = None) -> Path:
    """Write model.onnx, model.int8.onnx, tokenizer.json and encoder.json for the static encoder."""
    import onnx

    source = Path(source_encoder_dir)
    if not (source / "model.onnx").is_file():
        raise FileNotFoundError(f"{source / 'model.onnx'}: export MiniLM first (`routenlp export-encoder`)")
    source_meta = json.loads((source / "encoder.json").read_text())
    if dim < 1 or dim > int(source_meta["dim"]):
        raise ValueError(f"dim must lie in [1, {source_meta['dim']}], got {dim}")
    special: list[int]
    if table is None:
        table, special = token_vectors(source, progress=progress)
    else:
        special = []
    reduced = reduce_and_weight(table, special, dim, sif_coefficient)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fp32 = out / "model.onnx"
    onnx.save(_gather_graph(reduced), str(fp32))
    shutil.copyfile(fp32, out / "model.int8.onnx")
    shutil.copyfile(source / "tokenizer.json", out / "tokenizer.json")
    meta = {
        "name": STATIC_NAME,
        "kind": "static",
        "distilled_from": {"name": source_meta.get("name"), "sha256": sha256_file(source / "model.onnx")},
        "dim": dim,
        "max_length": max_length,
        "pooling": "mean+l2",
        "sif_coefficient": sif_coefficient,
        "sha256": {"model.onnx": sha256_file(fp32), "model.int8.onnx": sha256_file(out / "model.int8.onnx")},
    }
    (out / "encoder.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
