"""Co-optimisation step 4: distillation into the local tiers, and the tiers serving what was distilled.

Real components: the MiniLM T1 head refitted on teacher labels, and SmolLM2-135M trained with LoRA
for a few steps on a handful of real support answers (CPU, seconds).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coopt.selection import DistillItem
from routenlp_standins.artifacts import StandinDirs, default_artifacts_root
from routenlp_standins.build import BuildSettings, build_all


@pytest.fixture(scope="module")
def artifacts() -> Path:
    """The artifacts root with the T1 banking77 head and the SmolLM2 copy (built small if missing)."""
    root = default_artifacts_root().resolve()
    if not (root / "encoder" / "model.onnx").is_file():
        pytest.fail(f"MiniLM encoder not exported to {root / 'encoder'}: run `routenlp export-encoder` first")
    build_all(root, tasks=("banking77",), tiers=("classifier", "smollm2"), progress=False, log=lambda _: None,
              settings=BuildSettings(classifier_train_limit=1500, eval_limit=200))
    return root


# -- T1: label distillation -------------------------------------------------------------------------


def test_label_distillation_teaches_the_classifier_the_teachers_labels_and_the_tier_serves_it(artifacts, tmp_path):
    from coopt.distill_classifier import distill_classifier, embed
    from routenlp_core.tasks import get_task
    from routenlp_standins import tiers as registry
    from routenlp_standins.classifier import ClassifierTier

    base = ClassifierTier(artifacts, "banking77")
    rows = get_task("banking77").load("test", limit=400, seed=11)
    predicted = base.classify(embed([r.text for r in rows], artifacts, progress=False))
    wrong = [r for r, (label, _) in zip(rows, predicted) if label != r.reference][:12]
    assert len(wrong) >= 8, "the base head should miss some of 400 held-out queries"
    items = [DistillItem(task="banking77", prompt=r.text, kind="hard", teacher_output=r.reference) for r in wrong]
    items.append(DistillItem(task="banking77", prompt="hello", kind="random", teacher_output="not a banking77 label"))

    report = distill_classifier("banking77", items, artifacts, tmp_path, weight=5, base_limit=600, progress=False)

    assert report["n_items"] == len(wrong) and report["n_dropped"] == 1   # a non-label answer is not learned
    assert report["teacher_agreement_before"] == 0.0
    assert report["teacher_agreement_after"] >= 0.9
    meta = json.loads((tmp_path / "tiers" / "classifier" / "banking77.json").read_text())
    assert meta["build"]["distillation"]["n_hard"] == len(wrong) and meta["labels"] == base.labels

    query = wrong[0].text
    served = registry.task_tier(StandinDirs(artifacts, tmp_path), "classifier", "banking77")  # the distilled head
    assert Path(served.meta["build"]["distillation"]["base"]) == artifacts
    assert served.classify(embed([query], artifacts, progress=False))[0][0] == wrong[0].reference
    base_again = registry.task_tier(StandinDirs(artifacts), "classifier", "banking77")
    assert base_again.meta.get("build", {}).get("distillation") is None


# -- T2: SeqKD with LoRA ----------------------------------------------------------------------------


def test_a_few_lora_steps_lower_the_distillation_loss_and_the_adapter_loads_back(artifacts, tmp_path):
    import torch

    from coopt.distill_lora import HUB_BASE_MODEL, LoraSettings, adapter_loss, load_student, train_lora
    from routenlp_core.tasks import get_task
    from routenlp_standins import tiers as registry

    rows = get_task("bitext").load("train", limit=4, seed=5)
    items = [DistillItem(task="bitext", prompt=r.text, kind="hard", teacher_output=r.reference) for r in rows]
    out = tmp_path / "lora" / "smollm2"
    settings = LoraSettings(max_steps=6, batch_size=2, max_target_tokens=24, lr=2e-3, epochs=3)

    report = train_lora(items, artifacts / "smollm2", out, settings=settings, progress=False)

    assert report.steps == 6
    assert report.loss_after < report.loss_before - 0.05, (report.loss_before, report.loss_after)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (out / "adapter_model.safetensors").is_file()            # the PEFT format vLLM loads
    assert config["base_model_name_or_path"] == HUB_BASE_MODEL and config["r"] == 8
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    # what vLLM's PEFTHelper refuses: rank above --max-lora-rank (16 by default), bias, DoRA, modules_to_save
    assert config["r"] <= 16 and config["bias"] == "none" and not config.get("use_dora")
    assert config.get("modules_to_save") is None
    assert all(oct(path.stat().st_mode)[-3:] == "644" for path in out.iterdir())
    # loads back with peft: the same loss on the distillation set
    assert adapter_loss(items, artifacts / "smollm2", out, 24) == pytest.approx(report.loss_after, abs=1e-3)

    # and the T2 stand-in serves it (merged at load) to a deployment whose model_info names the iteration
    tier = registry.smollm2(StandinDirs(artifacts, tmp_path))
    assert Path(tier.adapter_dir).resolve() == out.resolve()
    tier.load()
    peft_model, tokenizer = load_student(artifacts / "smollm2", out, trainable=False)
    ids = torch.tensor([tokenizer("I want a refund for order 123")["input_ids"]])
    with torch.no_grad():
        merged = tier._model(input_ids=ids).logits
        reference = peft_model.eval()(input_ids=ids).logits
    assert torch.allclose(merged, reference, atol=1e-3)
    answer = tier.answer([{"role": "user", "content": rows[0].text}], "bitext", 4)
    assert answer.completion_tokens >= 1
    assert registry.smollm2(StandinDirs(artifacts)).adapter_dir is None   # naming none: the base model
