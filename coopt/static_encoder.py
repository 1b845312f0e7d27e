"""Distil a static (lookup-table) sentence encoder from the exported MiniLM: the fast router encoder.

Why: MiniLM-L6 costs about 10 ms per 128-token query on one core even in int8, which misses the
router's latency goal (p50 <= 3 ms, p99 <= 6 ms up to 128 tokens).  Following Model2Vec
(Tulkens & van Dongen, 2024) and its "tokenlearn" step:

1. every vocabulary token is passed through MiniLM on its own (``[CLS] token [SEP]``) and its
   mean-pooled output becomes that token's vector; PCA reduces the table to ``dim`` columns and each
   row is weighted by smooth inverse frequency (SIF, Arora et al. 2017; Zipf on the WordPiece rank,
   as Model2Vec does) so that frequent tokens count less in the mean;
2. the table is then tuned so that the mean of a text's token rows, through one linear map, matches
   MiniLM's embedding of the whole text (cosine loss), on the *train* splits of the enterprise
   tasks in ``../shared/data`` (no labels are used; no test split and none of the benchmark's
   multi-model sets are read).  The linear map is folded into the table afterwards, so serving is
   still a lookup and a mean.  On held-out test-split texts the tuned encoder's embeddings have
   cosine 0.83 with MiniLM's, and nearest-centroid intent accuracy rises from 0.73 to 0.82 on
   banking77 (MiniLM: 0.84).

Serving a query is then a table lookup and a mean: well under a millisecond, and its cost barely
grows with length.  The result is written in the *same format* as
:func:`coopt.export_encoder.export_encoder`: an ONNX graph ``input_ids, attention_mask ->
last_hidden_state`` (a ``Gather`` on a float16 table, cast to float32 and masked), the tokenizer and
``encoder.json``.  So :class:`litellm_routenlp.encoder.OnnxSentenceEncoder`, the router's encoder
checks, training and the benchmarks use it unchanged; only the encoder directory differs.  There
are no matmuls to quantize, so ``model.int8.onnx`` is the same graph.

The table is computed (seeded, one torch thread), not copied, so a rebuild on another CPU may differ
in the last bits; routers recognise their encoder by probe embeddings within a tolerance
(:mod:`litellm_routenlp.router_model`), not only by sha256.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer
from tqdm import tqdm

from routenlp_core.hashing import sha256_file
from routenlp_core.tasks import get_task
from litellm_routenlp.encoder import OnnxSentenceEncoder
from coopt.train_router import EmbeddingCache

STATIC_NAME = "routenlp/static-minilm"


def token_vectors(encoder_dir: Path, batch_size: int = 512, progress: bool = True) -> tuple[np.ndarray, list[int]]:
    """(vocab, 384) mean-pooled MiniLM outputs of ``[CLS] t [SEP]`` for every token t; special ids."""
    encoder = OnnxSentenceEncoder(encoder_dir, quantized=False, threads=2)
    vocab = encoder.tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    special = sorted(i for token, i in vocab.items() if token.startswith("[") and token.endswith("]"))
    table = np.zeros((size, encoder.dim), dtype=np.float32)
    feeds_extra = "token_type_ids" in encoder._input_names
    starts = range(0, size, batch_size)
    if progress:
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


DEFAULT_TUNE_TASKS = ("banking77", "clinc150", "bitext", "fin_ner", "ectsum", "cuad_clauses", "unfair_tos",
                      "financial_phrasebank")


def tuning_corpus(tasks: Sequence[str], per_task: int, seed: int = 0) -> list[str]:
    """Distinct texts of the *train* splits of ``tasks`` (at most ``per_task`` each)."""
    texts: list[str] = []
    for name in tasks:
        texts.extend(example.text for example in get_task(name).load("train", limit=per_task, seed=seed))
    return list(dict.fromkeys(text for text in texts if text.strip()))


def teacher_embeddings(texts: Sequence[str], encoder_dir: Path, max_length: int, cache_path: Optional[Path],
                       progress: bool) -> np.ndarray:
    """MiniLM (fp32 ONNX) embeddings of ``texts``, cached by text and encoder graph like training's."""
    encoder = OnnxSentenceEncoder(encoder_dir, quantized=False, threads=2, max_length=max_length)
    key = f"{sha256_file(encoder.graph_path)}-len{max_length}"
    if cache_path is None:
        cache_path = encoder_dir.resolve().parent / "cache" / f"static-teacher-{key[:16]}-len{max_length}.safetensors"
    cache = EmbeddingCache(cache_path, key)
    chunks = range(0, len(texts), 2000)
    if progress:
        chunks = tqdm(chunks, desc="static encoder: MiniLM teacher embeddings", unit="chunk")
    return np.concatenate([cache.embed(list(texts[start:start + 2000]), encoder, batch_size=64)
                           for start in chunks])


def tune_table(table: np.ndarray, token_ids: Sequence[Sequence[int]], teacher: np.ndarray, epochs: int = 8,
               lr: float = 1e-3, batch_size: int = 256, seed: int = 0, progress: bool = True) -> tuple[np.ndarray, list[float]]:
    """Fit ``table`` (+ a linear map to the teacher's width) so mean-of-rows matches ``teacher``.

    Returns the tuned table with the map folded in (vocab, teacher dim) and the loss per epoch.
    """
    import torch  # local: only the tuning step trains (torch costs ~1 s and is the train extra's heavy half)

    torch.manual_seed(seed)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic reductions: a rebuild gives the same table on this CPU
    try:
        rows = torch.nn.EmbeddingBag.from_pretrained(torch.from_numpy(table.copy()), freeze=False, mode="mean",
                                                     sparse=True)
        mapping = torch.nn.Linear(table.shape[1], teacher.shape[1], bias=False)
        sparse_opt = torch.optim.SparseAdam(list(rows.parameters()), lr=lr)
        dense_opt = torch.optim.Adam(mapping.parameters(), lr=lr)
        target = torch.from_numpy(np.ascontiguousarray(teacher, dtype=np.float32))
        sequences = [torch.tensor(ids if ids else [0], dtype=torch.long) for ids in token_ids]
        rng = np.random.default_rng(seed)
        losses: list[float] = []
        epoch_range = range(epochs)
        if progress:
            epoch_range = tqdm(epoch_range, desc="static encoder: tuning to MiniLM", unit="epoch")
        for _ in epoch_range:
            order = rng.permutation(len(sequences))
            total = 0.0
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                pieces = [sequences[i] for i in batch]
                offsets = torch.tensor(np.cumsum([0] + [len(p) for p in pieces[:-1]]), dtype=torch.long)
                predicted = mapping(rows(torch.cat(pieces), offsets))
                loss = (1.0 - torch.nn.functional.cosine_similarity(predicted, target[batch])).mean()
                sparse_opt.zero_grad()
                dense_opt.zero_grad()
                loss.backward()
                sparse_opt.step()
                dense_opt.step()
                total += loss.item() * len(batch)
            losses.append(total / len(order))
        with torch.no_grad():
            folded = (rows.weight @ mapping.weight.T).numpy().astype(np.float32)
    finally:
        torch.set_num_threads(previous_threads)
    return folded, losses


def _gather_graph(table: np.ndarray):
    """ONNX graph: last_hidden_state = float(table[input_ids]) * attention_mask[..., None]."""
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["gathered_half"], axis=0),
        helper.make_node("Cast", ["gathered_half"], ["gathered"], to=TensorProto.FLOAT),
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
        initializer=[numpy_helper.from_array(table.astype(np.float16), "table"),
                     numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="routenlp")
    model.ir_version = 8
    return model


def export_static_encoder(out_dir: str | Path, source_encoder_dir: str | Path = "artifacts/encoder",
                          dim: int = 256, sif_coefficient: float = 1e-4, max_length: int = 512,
                          tune_tasks: Sequence[str] = DEFAULT_TUNE_TASKS, per_task: int = 4000, epochs: int = 8,
                          teacher_max_length: int = 128, seed: int = 0, progress: bool = True,
                          cache_path: Optional[Path] = None) -> Path:
    """Write model.onnx, model.int8.onnx, tokenizer.json and encoder.json for the static encoder.

    ``tune_tasks=()`` skips step 2 (the plain Model2Vec-style table, ``dim`` columns).
    """
    source = Path(source_encoder_dir)
    if not (source / "model.onnx").is_file():
        raise FileNotFoundError(f"{source / 'model.onnx'}: export MiniLM first (`routenlp export-encoder`)")
    source_meta = json.loads((source / "encoder.json").read_text())
    if dim < 1 or dim > int(source_meta["dim"]):
        raise ValueError(f"dim must lie in [1, {source_meta['dim']}], got {dim}")
    raw, special = token_vectors(source, progress=progress)
    table = reduce_and_weight(raw, special, dim, sif_coefficient)
    tuning: dict = {}
    if tune_tasks:
        texts = tuning_corpus(tune_tasks, per_task, seed)
        teacher = teacher_embeddings(texts, source, teacher_max_length, cache_path, progress)
        tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
        tokenizer.enable_truncation(max_length=max_length)
        token_ids = [encoding.ids for encoding in tokenizer.encode_batch(texts)]
        table, losses = tune_table(table, token_ids, teacher, epochs=epochs, seed=seed, progress=progress)
        table[special] = 0.0
        tuning = {"tasks": list(tune_tasks), "split": "train", "texts": len(texts), "per_task": per_task,
                  "epochs": epochs, "teacher_max_length": teacher_max_length, "seed": seed,
                  "loss_by_epoch": [round(loss, 5) for loss in losses]}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fp32 = out / "model.onnx"
    onnx.save(_gather_graph(table), str(fp32))
    shutil.copyfile(fp32, out / "model.int8.onnx")
    shutil.copyfile(source / "tokenizer.json", out / "tokenizer.json")
    meta = {
        "name": STATIC_NAME,
        "kind": "static",
        "distilled_from": {"name": source_meta.get("name"), "sha256": sha256_file(source / "model.onnx")},
        "dim": int(table.shape[1]),
        "max_length": max_length,
        "pooling": "mean+l2",
        "pca_dim": dim,
        "sif_coefficient": sif_coefficient,
        "tuned": tuning or None,
        "sha256": {"model.onnx": sha256_file(fp32), "model.int8.onnx": sha256_file(out / "model.int8.onnx")},
    }
    (out / "encoder.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
