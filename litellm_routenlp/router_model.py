"""The trained router at serving time: text + task -> P(tier k is the cheapest acceptable one)
and, per tier, P(tier k's answer is acceptable) (the ex-ante estimates of issue 14).

Loads the artifact directory written by ``routenlp train`` (``coopt.train_router``) with numpy and
ONNX Runtime only.  Everything is checked once, at load, so a broken artifact stops the proxy at
start-up instead of mis-routing traffic: every file router.json lists must exist with the recorded
sha256 (catches truncated copies and files from another run), the head's shapes must match the
tiers and tasks router.json names, and the encoder graph must be the one the router was trained
with (a router trained on one embedding space is meaningless on another).

Format 2 heads have a third ONNX output, ``acceptance`` (K sigmoids, trained with BCE on the
all-pairs labels).  Format 1 routers (no such output) still load; for them
:meth:`RouterModel.predict_acceptance` returns the cumulative of the route probabilities,
sum_{j<=k} p_j, and :attr:`RouterModel.acceptance_is_fallback` is True.

A task the router was not trained on maps to index 0, ``__unknown__``, the task-agnostic slot that
training filled by task dropout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from routenlp_core.hashing import sha256_file

from litellm_routenlp.encoder import PROBE_TOLERANCE, EncoderArtifactError, OnnxSentenceEncoder, probe_distance
from litellm_routenlp.routers import RouterEstimates

FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)  # 1: no acceptance output (falls back to the cumulative route probabilities)
UNKNOWN_TASK = "__unknown__"
HEAD_FILES = ("weights.safetensors", "head.onnx", "head.int8.onnx")
PathLike = Union[str, os.PathLike[str]]


class RouterArtifactError(RuntimeError):
    """The router artifact is missing, truncated or inconsistent; the message names the file."""




def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def cumulative_acceptance(route_probabilities: np.ndarray) -> np.ndarray:
    """P(tier k acceptable) implied by P(tier j is the cheapest acceptable one): sum_{j<=k} p_j.

    Exact only if acceptability is monotone in the tier (a tier that answers well implies every
    higher one does); the top tier's value is 1.  The fallback for format-1 routers.
    """
    return np.clip(np.cumsum(np.asarray(route_probabilities, dtype=np.float64), axis=1), 0.0, 1.0)


def _read_metadata(artifact_dir: Path) -> dict[str, Any]:
    path = artifact_dir / "router.json"
    if not artifact_dir.is_dir():
        raise RouterArtifactError(f"router artifact directory not found: {artifact_dir} (run `routenlp train`)")
    if not path.is_file():
        raise RouterArtifactError(f"{path}: missing (training did not finish, or this is not a router artifact)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RouterArtifactError(f"{path}: not valid JSON, possibly truncated ({error})") from None
    if not isinstance(meta, dict):
        raise RouterArtifactError(f"{path}: expected a JSON object")
    if meta.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
        raise RouterArtifactError(f"{path}: format_version {meta.get('format_version')!r} is not supported "
                                  f"(expected one of {SUPPORTED_FORMAT_VERSIONS})")
    tiers, tasks = meta.get("tiers"), meta.get("tasks")
    if not isinstance(tiers, list) or not tiers or not all(isinstance(t, str) and t for t in tiers) \
            or len(set(tiers)) != len(tiers):
        raise RouterArtifactError(f"{path}: field `tiers` must be a non-empty list of distinct names")
    if not isinstance(tasks, list) or not tasks or tasks[0] != UNKNOWN_TASK \
            or not all(isinstance(t, str) and t for t in tasks) or len(set(tasks)) != len(tasks):
        raise RouterArtifactError(f"{path}: field `tasks` must list distinct names starting with {UNKNOWN_TASK!r}")
    files = meta.get("files")
    if not isinstance(files, dict) or any(name not in files for name in HEAD_FILES):
        raise RouterArtifactError(f"{path}: field `files` must give the sha256 of {', '.join(HEAD_FILES)}")
    encoder = meta.get("encoder")
    if not isinstance(encoder, dict) or not isinstance(encoder.get("sha256"), str):
        raise RouterArtifactError(f"{path}: field `encoder` must name the encoder graph's sha256")
    return meta


def _check_files(artifact_dir: Path, meta: dict[str, Any]) -> None:
    for name in HEAD_FILES:
        path = artifact_dir / name
        if not path.is_file():
            raise RouterArtifactError(f"{path}: missing")
        actual = sha256_file(path)
        if actual != meta["files"][name]:
            raise RouterArtifactError(f"{path}: sha256 {actual[:12]}... does not match router.json "
                                      f"({str(meta['files'][name])[:12]}...): truncated or from another run")


def _check_weight_shapes(artifact_dir: Path, meta: dict[str, Any]) -> None:
    from safetensors import safe_open

    path = artifact_dir / "weights.safetensors"
    try:
        with safe_open(str(path), framework="numpy") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise RouterArtifactError(f"{path}: not a readable safetensors file ({error})") from None
    expected_rows = {"task_embedding.weight": len(meta["tasks"]), "out.weight": len(meta["tiers"]),
                     "out.bias": len(meta["tiers"])}
    if meta["format_version"] >= 2:
        expected_rows.update({"accept.weight": len(meta["tiers"]), "accept.bias": len(meta["tiers"])})
    for name, rows in expected_rows.items():
        if name not in shapes:
            raise RouterArtifactError(f"{path}: tensor {name} missing")
        if shapes[name][0] != rows:
            raise RouterArtifactError(f"{path}: {name} has {shapes[name][0]} rows but router.json lists {rows} "
                                      f"{'tasks' if name.startswith('task') else 'tiers'}")


def _resolve_encoder_dir(artifact_dir: Path, meta: dict[str, Any], encoder_dir: Optional[PathLike]) -> Path:
    if encoder_dir is not None:
        return Path(encoder_dir)
    hint = meta["encoder"].get("dir_hint")
    if not isinstance(hint, str) or not hint:
        raise RouterArtifactError(f"{artifact_dir / 'router.json'}: encoder.dir_hint missing; pass encoder_dir")
    project_root = Path(__file__).resolve().parent.parent
    candidates = [artifact_dir / hint, Path(hint), project_root / hint]
    for candidate in candidates:
        if (candidate / "encoder.json").is_file():
            return candidate
    raise RouterArtifactError(f"{artifact_dir / 'router.json'}: encoder directory {hint!r} not found "
                              f"(looked in {', '.join(str(c) for c in candidates)}); pass encoder_dir")


class RouterModel:
    """A loaded, validated router.  Build it with :meth:`load`; nothing is trained here."""

    # the registry kind this class serves (routers.py); a policy file calibrated on it records this
    router_spec = {"kind": "encoder_head", "options": {}}

    def __init__(self, artifact_dir: Path, meta: dict[str, Any], session: Any,
                 encoder: Optional[OnnxSentenceEncoder]) -> None:
        self.artifact_dir = artifact_dir
        self.meta = meta
        self.session = session
        self.encoder = encoder
        self.tiers: list[str] = list(meta["tiers"])
        self.tasks: list[str] = list(meta["tasks"])
        self._task_index = {task: position for position, task in enumerate(self.tasks)}
        self.embedding_dim = int((meta.get("head") or {}).get("embedding_dim", 384))
        self._outputs = [output.name for output in session.get_outputs()]
        # the metadata decides: a format-1 router.json declares no acceptance output, whatever the graph holds
        declared = meta.get("format_version", 1) >= 2 and "acceptance" in self._outputs
        self._accept_index = self._outputs.index("acceptance") if declared else None

    @property
    def acceptance_is_fallback(self) -> bool:
        """True when this router has no acceptance output (format 1): the estimates are cumulative route probabilities."""
        return self._accept_index is None

    @property
    def acceptance_source(self) -> str:
        """Where :meth:`predict_acceptance` comes from, for logs and reports."""
        if self._accept_index is None:
            return "cumulative route probabilities (router format 1 has no acceptance output)"
        return "acceptance head (BCE on all-pairs labels)"

    @classmethod
    def load(cls, artifact_dir: PathLike, encoder_dir: Optional[PathLike] = None, quantized: bool = True,
             threads: int = 1, with_encoder: bool = True) -> "RouterModel":
        """Validate and load ``artifact_dir``; ``quantized`` serves the int8 head and encoder graphs.

        ``encoder_dir`` defaults to router.json's ``encoder.dir_hint``, looked up inside the
        artifact, then relative to the working directory, then to the project root.
        ``with_encoder=False`` skips the encoder (for callers that bring their own embeddings).
        """
        import onnxruntime as ort

        artifact_dir = Path(artifact_dir)
        meta = _read_metadata(artifact_dir)
        _check_files(artifact_dir, meta)
        _check_weight_shapes(artifact_dir, meta)
        head_path = artifact_dir / ("head.int8.onnx" if quantized else "head.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(str(head_path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime has its own exception types
            raise RouterArtifactError(f"{head_path}: cannot be loaded by ONNX Runtime ({error})") from None
        names = {i.name for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        if names != {"embedding", "task_id"} or "logits" not in outputs:
            raise RouterArtifactError(f"{head_path}: expected inputs embedding, task_id and output logits")
        if meta["format_version"] >= 2 and "acceptance" not in outputs:
            raise RouterArtifactError(f"{head_path}: router.json has format_version {meta['format_version']} "
                                      f"but the graph has no `acceptance` output")
        encoder = None
        if with_encoder:
            encoder = cls._load_encoder(artifact_dir, meta, encoder_dir, quantized, threads)
        model = cls(artifact_dir, meta, session, encoder)
        if encoder is not None and encoder.dim != model.embedding_dim:
            raise RouterArtifactError(f"{encoder.encoder_dir}: encoder gives {encoder.dim}-d vectors but the head in "
                                      f"{artifact_dir} takes {model.embedding_dim}-d ones")
        probe = model.predict_proba_from_embeddings(np.zeros((1, model.embedding_dim), np.float32),
                                                    np.array([len(model.tasks) - 1]))
        if probe.shape != (1, len(model.tiers)):
            raise RouterArtifactError(f"{head_path}: produces {probe.shape[1]} logits, router.json lists "
                                      f"{len(model.tiers)} tiers")
        accept_probe = model.predict_acceptance_from_embeddings(np.zeros((1, model.embedding_dim), np.float32),
                                                                np.array([0]))
        if accept_probe.shape != (1, len(model.tiers)):
            raise RouterArtifactError(f"{head_path}: `acceptance` has {accept_probe.shape[1]} columns, router.json "
                                      f"lists {len(model.tiers)} tiers")
        return model

    @staticmethod
    def _load_encoder(artifact_dir: Path, meta: dict[str, Any], encoder_dir: Optional[PathLike],
                      quantized: bool, threads: int) -> OnnxSentenceEncoder:
        directory = _resolve_encoder_dir(artifact_dir, meta, encoder_dir)
        try:
            encoder = OnnxSentenceEncoder(directory, quantized=quantized, threads=threads,
                                          max_length=meta["encoder"].get("max_length"))
        except EncoderArtifactError as error:
            raise RouterArtifactError(str(error)) from None
        graph = Path(encoder.graph_path)
        recorded = dict(meta["encoder"].get("sha256_by_file") or {})
        recorded.setdefault(meta["encoder"].get("trained_on", "model.onnx"), meta["encoder"]["sha256"])
        if graph.name not in recorded:
            raise RouterArtifactError(f"{artifact_dir / 'router.json'}: records no sha256 for encoder graph "
                                      f"{graph.name}; cannot verify {graph}")
        actual = sha256_file(graph)
        if actual == recorded[graph.name]:
            return encoder
        # Not the same bytes: accept an encoder that computes the same embeddings (a static encoder
        # rebuilt on another CPU differs by float rounding only); refuse any other.
        probes = (meta["encoder"].get("probe_embeddings_by_file") or {}).get(graph.name)
        distance = probe_distance(encoder, probes) if probes else None
        if distance is not None and distance <= PROBE_TOLERANCE:
            return encoder
        detail = "" if distance is None else f"; its probe embeddings differ by {distance:.3g} > {PROBE_TOLERANCE}"
        raise RouterArtifactError(f"{graph}: sha256 {actual[:12]}... is not the encoder this router was "
                                  f"trained with ({recorded[graph.name][:12]}..., router.json){detail}")

    # ----------------------------------------------------------------------------------------------

    def task_index(self, task: Optional[str]) -> int:
        """Row of ``task`` in the task embedding; 0 (``__unknown__``) for None or an unseen task."""
        if task is None:
            return 0
        return self._task_index.get(task, 0)

    def _task_ids(self, tasks: Sequence[Optional[str]]) -> np.ndarray:
        return np.array([self.task_index(task) for task in tasks], dtype=np.int64)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self.encoder is None:
            raise RuntimeError("router loaded with with_encoder=False: pass embeddings instead")
        return self.encoder.encode(list(texts))

    def _run(self, embeddings: np.ndarray, task_ids: np.ndarray) -> list[np.ndarray]:
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        task_ids = np.asarray(task_ids, dtype=np.int64)
        if embeddings.ndim != 2 or embeddings.shape[0] != task_ids.shape[0]:
            raise ValueError(f"embeddings {embeddings.shape} and task_ids {task_ids.shape} do not match")
        if task_ids.size and (task_ids.min() < 0 or task_ids.max() >= len(self.tasks)):
            raise ValueError(f"task ids must lie in [0, {len(self.tasks)})")
        return self.session.run(None, {"embedding": embeddings, "task_id": task_ids})

    def logits_from_embeddings(self, embeddings: np.ndarray, task_ids: np.ndarray) -> np.ndarray:
        return self._run(embeddings, task_ids)[0]

    def predict_proba_from_embeddings(self, embeddings: np.ndarray, task_ids: np.ndarray) -> np.ndarray:
        """(n, K) softmax probabilities over tiers, cheapest first."""
        return softmax(self.logits_from_embeddings(embeddings, task_ids))

    def predict_both_from_embeddings(self, embeddings: np.ndarray,
                                     task_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(route probabilities, acceptance), both (n, K), from one head run (the hot path's call)."""
        outputs = self._run(embeddings, task_ids)
        route = softmax(outputs[0])
        if self._accept_index is None:
            return route, cumulative_acceptance(route)
        return route, outputs[self._accept_index].astype(np.float64)

    def predict_acceptance_from_embeddings(self, embeddings: np.ndarray, task_ids: np.ndarray) -> np.ndarray:
        """(n, K) P(tier k's answer is acceptable | query, task); see :attr:`acceptance_source`."""
        return self.predict_both_from_embeddings(embeddings, task_ids)[1]

    def predict_both(self, texts: Sequence[str],
                     tasks: Sequence[Optional[str]]) -> tuple[np.ndarray, np.ndarray]:
        """(route probabilities, acceptance) for texts and their tasks: one encoder and one head run."""
        if len(texts) != len(tasks):
            raise ValueError(f"{len(texts)} texts but {len(tasks)} tasks")
        if not texts:
            return np.zeros((0, len(self.tiers))), np.zeros((0, len(self.tiers)))
        return self.predict_both_from_embeddings(self.embed(texts), self._task_ids(tasks))

    def predict(self, texts: Sequence[str], tasks: Sequence[Optional[str]]) -> RouterEstimates:
        """The :class:`~litellm_routenlp.routers.Router` interface: both outputs of one head run."""
        route, acceptance = self.predict_both(texts, tasks)
        return RouterEstimates(route=route, acceptance=acceptance)

    @property
    def max_chars(self) -> Optional[int]:
        """The encoder's character cut (``encoder.CHARS_PER_TOKEN`` x max tokens); None without an encoder."""
        return self.encoder.max_chars if self.encoder is not None else None

    @property
    def blocking(self) -> bool:
        """A transformer encoder takes milliseconds (worth a worker thread); a static lookup does not."""
        return self.encoder is not None and self.encoder.meta.get("kind") != "static"

    def predict_acceptance(self, texts: Sequence[str], tasks: Sequence[Optional[str]]) -> np.ndarray:
        """(n, K) P(tier k's answer is acceptable | text, task), cheapest tier first."""
        return self.predict_both(texts, tasks)[1]

    def predict_proba(self, texts: Sequence[str], tasks: Sequence[Optional[str]]) -> np.ndarray:
        """(n, K) P(tier k is the cheapest acceptable one) for each text and its task."""
        if len(texts) != len(tasks):
            raise ValueError(f"{len(texts)} texts but {len(tasks)} tasks")
        if not texts:
            return np.zeros((0, len(self.tiers)))
        return self.predict_proba_from_embeddings(self.embed(texts), self._task_ids(tasks))

    def penultimate(self, texts: Sequence[str], tasks: Sequence[Optional[str]]) -> np.ndarray:
        """(n, 256) hidden features of the head: what co-optimisation clusters failures on."""
        if len(texts) != len(tasks):
            raise ValueError(f"{len(texts)} texts but {len(tasks)} tasks")
        outputs = self._run(self.embed(texts), self._task_ids(tasks))
        if len(outputs) < 2:
            raise RouterArtifactError(f"{self.artifact_dir}: this head has no penultimate output")
        return outputs[1]
