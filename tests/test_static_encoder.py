"""The static (lookup-table) router encoder: its graph, its quality on real intents, and how a router
recognises the encoder it was trained with by what it computes (probe embeddings), not only by bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from routenlp_core.paths import project_root
from coopt.static_encoder import _gather_graph, reduce_and_weight
from litellm_routenlp.encoder import OnnxSentenceEncoder
from routenlp_core.hashing import sha256_file
from litellm_routenlp.router_model import RouterArtifactError, RouterModel

STATIC_DIR = project_root() / "artifacts" / "encoder-static"
MINILM_DIR = project_root() / "artifacts" / "encoder"
pytestmark = pytest.mark.needs(data=["cascades_9llm"], artifacts=["encoder-static/model.onnx"])  # missing: fail, say how


@pytest.fixture(scope="module")
def static() -> OnnxSentenceEncoder:
    return OnnxSentenceEncoder(STATIC_DIR, quantized=True, threads=1)


def test_graph_is_a_masked_lookup_with_zero_special_rows(static):
    meta = json.loads((STATIC_DIR / "encoder.json").read_text())
    assert meta["kind"] == "static" and static.dim == meta["dim"] == 384
    assert meta["tuned"]["split"] == "train" and meta["tuned"]["loss_by_epoch"][-1] < meta["tuned"]["loss_by_epoch"][0]
    table = numpy_helper.to_array(onnx.load(str(STATIC_DIR / "model.onnx")).graph.initializer[0])
    assert table.dtype == np.float16 and table.shape == (len(static.tokenizer.get_vocab()), 384)
    vocab = static.tokenizer.get_vocab()
    for special in ("[CLS]", "[SEP]", "[PAD]", "[UNK]"):
        assert not table[vocab[special]].any(), special
    # padding in a batch must not change a text's embedding
    texts = ["hi", "my card got eaten by the atm, what now? it happened at the station"]
    batched = static.encode(texts)
    alone = np.stack([static.encode([text])[0] for text in texts])
    np.testing.assert_allclose(batched, alone, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


def test_reduce_and_weight_is_centred_pca_with_sif():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(500, 24)).astype(np.float32) + 3.0
    reduced = reduce_and_weight(table, special=[0, 1], dim=8, sif_coefficient=1e-3)
    assert reduced.shape == (500, 8) and not reduced[[0, 1]].any()
    # frequent (low-rank) tokens are damped more than rare ones
    assert np.linalg.norm(reduced[2:20], axis=1).mean() < np.linalg.norm(reduced[-20:], axis=1).mean()
    again = reduce_and_weight(table, special=[0, 1], dim=8, sif_coefficient=1e-3)
    np.testing.assert_array_equal(reduced, again)


@pytest.mark.parametrize("task", ["banking77", "clinc150"])
def test_static_encoder_separates_real_intents(static, task):
    """Nearest intent centroid on real held-out queries: far above chance (1/77, 1/151), near MiniLM.

    Measured: banking77 0.73 (MiniLM 0.84), clinc150 0.70 (MiniLM 0.76) with 3,000 training queries.
    """
    from routenlp_core.tasks import get_task

    spec = get_task(task)
    train, test = spec.load("train", limit=3000, seed=0), spec.load("test", limit=500, seed=0)
    labels = sorted({example.reference for example in train})
    index = {label: i for i, label in enumerate(labels)}
    x = static.encode([example.text for example in train])
    y = np.array([index[example.reference] for example in train])
    centroids = np.stack([x[y == i].mean(axis=0) for i in range(len(labels))])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    predicted = (static.encode([example.text for example in test]) @ centroids.T).argmax(axis=1)
    accuracy = float(np.mean([labels[p] == example.reference for p, example in zip(predicted, test)]))
    assert accuracy > 0.6, accuracy


# ------------------------------------------------------------------------------- router <-> encoder identity
@pytest.fixture(scope="module")
def static_router(tmp_path_factory) -> Path:
    from coopt.multimodel import load_cascades_9llm
    from coopt.train_router import train_router

    records, portfolio = load_cascades_9llm("truthfulqa", limit=200)
    out = tmp_path_factory.mktemp("static_router")
    cache = tmp_path_factory.mktemp("cache") / "emb.safetensors"
    train_router(records, portfolio, out, encoder_dir=STATIC_DIR, cache_path=cache, seed=0, epochs=3)
    return out


def _rebuilt_encoder(target: Path, noise: float) -> Path:
    """A copy of the static encoder whose table differs by ``noise`` (other bytes, maybe other maths)."""
    target.mkdir()
    table = numpy_helper.to_array(onnx.load(str(STATIC_DIR / "model.onnx")).graph.initializer[0])
    rng = np.random.default_rng(1)
    table = table.astype(np.float32)
    shifted = (table + rng.normal(scale=noise, size=table.shape) * (table != 0)).astype(np.float32)
    onnx.save(_gather_graph(shifted), str(target / "model.onnx"))
    shutil.copyfile(target / "model.onnx", target / "model.int8.onnx")
    for name in ("tokenizer.json", "encoder.json"):
        shutil.copyfile(STATIC_DIR / name, target / name)
    return target


def test_router_records_encoder_kind_dim_and_probes(static_router):
    meta = json.loads((static_router / "router.json").read_text())
    assert meta["encoder"]["kind"] == "static" and meta["encoder"]["dim"] == 384
    assert meta["head"]["embedding_dim"] == 384
    probes = meta["encoder"]["probe_embeddings_by_file"]
    assert set(probes) == {"model.onnx", "model.int8.onnx"} and np.asarray(probes["model.onnx"]).shape == (3, 384)
    model = RouterModel.load(static_router, encoder_dir=STATIC_DIR)
    probabilities = model.predict_proba(["Is it true that cracking your knuckles causes arthritis?"], ["truthfulqa"])
    assert probabilities.shape == (1, 4) and abs(probabilities.sum() - 1.0) < 1e-6


def test_a_rebuilt_encoder_that_computes_the_same_is_accepted(static_router, tmp_path):
    """Float-rounding differences (another CPU) change the bytes, not the embeddings: accepted."""
    rebuilt = _rebuilt_encoder(tmp_path / "rebuilt", noise=1e-7)
    assert sha256_file(rebuilt / "model.onnx") != sha256_file(STATIC_DIR / "model.onnx")
    model = RouterModel.load(static_router, encoder_dir=rebuilt)
    reference = RouterModel.load(static_router, encoder_dir=STATIC_DIR)
    texts, tasks = ["Can pigs fly?", "What happens if you swallow gum?"], ["truthfulqa", "truthfulqa"]
    np.testing.assert_allclose(model.predict_proba(texts, tasks), reference.predict_proba(texts, tasks), atol=1e-4)


def test_an_encoder_that_computes_differently_is_refused(static_router, tmp_path):
    other = _rebuilt_encoder(tmp_path / "other", noise=0.05)
    with pytest.raises(RouterArtifactError, match="model.int8.onnx: sha256 .* is not the encoder .* probe embeddings "
                                                  "differ by"):
        RouterModel.load(static_router, encoder_dir=other)


def test_a_router_refuses_another_encoder_of_the_same_width(static_router):
    with pytest.raises(RouterArtifactError, match="is not the encoder .* probe embeddings differ"):
        RouterModel.load(static_router, encoder_dir=MINILM_DIR)


def test_tuned_static_encoder_tracks_minilm_on_held_out_texts(static):
    """The tuning read only train splits; on test-split texts of every task the static embedding
    stays close to MiniLM's (measured: mean cosine 0.83 over 1,491 texts of 8 tasks)."""
    from routenlp_core.tasks import TASKS, get_task

    texts = [example.text for name in TASKS for example in get_task(name).load("test", limit=60, seed=1)]
    minilm = OnnxSentenceEncoder(MINILM_DIR, quantized=False)
    cosine = np.sum(static.encode(texts) * minilm.encode(texts), axis=1)
    assert cosine.mean() > 0.75, cosine.mean()
