"""Step 4b: sequence-level knowledge distillation (SeqKD) with LoRA into a generative tier.

The student (here SmolLM2-135M-Instruct, the T2 stand-in, on CPU; on a GPU machine any causal LM of
a vLLM tier) is trained to produce the teacher's answer, token by token, for each distillation query:
cross-entropy on the answer tokens only, with the prompt built exactly as the tier builds it at serving
time (the chat template with the task's system prompt, ``routenlp_standins.smollm.task_messages``).
Only LoRA matrices on the attention projections are trained (peft); the base weights stay untouched.

The adapter is saved in the PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``) that
vLLM loads at run time (``vllm serve <base> --enable-lora --lora-modules name=<dir>``, or
``POST /v1/load_lora_adapter {"lora_name": ..., "lora_path": <dir>}`` with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``); ``base_model_name_or_path`` names the hub model the
adapter belongs to, and ``routenlp_adapter.json`` beside it records the run (data, steps, losses).
The local T2 tier merges it at load when its deployment's ``model_info.routenlp_coopt_dir`` names the
iteration holding it.

A teacher answer longer than ``max_target_tokens`` is cut there and then gets no end-of-turn token,
so the student is not taught to stop mid-sentence.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from tqdm.auto import tqdm

from routenlp_standins.smollm import task_messages

# torch, peft and transformers are imported inside the functions that train: importing this module
# (the loop does, for LoraSettings) must not cost seconds or need the train extra's heavy half.

HUB_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
IGNORE = -100


@dataclass(frozen=True)
class LoraSettings:
    """LoRA and optimiser settings; the defaults are the short CPU run of the demo."""

    rank: int = 8                    # vLLM's default --max-lora-rank is 16
    alpha: int = 16
    dropout: float = 0.05
    lr: float = 5e-4
    epochs: int = 3
    max_steps: Optional[int] = None  # caps the steps over all epochs
    batch_size: int = 4
    max_target_tokens: int = 64
    seed: int = 0
    # One thread: on a shared 2-core machine two torch threads spin against other processes and a step
    # took 4-10x longer than with one (measured: 8 s vs 35-85 s per step of 4 x 115 tokens).
    threads: int = 1


@dataclass
class LoraReport:
    out_dir: str
    n_examples: int
    steps: int
    loss_before: float               # mean token loss on the distillation set, before training
    loss_after: float                # the same after training (eval mode, no dropout)
    step_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def encode_example(tokenizer: Any, task: Optional[str], prompt: str, target: str,
                   max_target_tokens: int) -> tuple[list[int], list[int]]:
    """(input ids, labels): the served prompt followed by the teacher's answer; labels only on the answer."""
    chat = task_messages([{"role": "user", "content": prompt}], task)
    prompt_ids = list(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"])
    answer_ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])
    cut = len(answer_ids) > max_target_tokens
    answer_ids = answer_ids[:max_target_tokens] + ([] if cut else [int(tokenizer.eos_token_id)])
    return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids


def _batch(examples: Sequence[tuple[list[int], list[int]]], pad_id: int):
    import torch

    length = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (input_ids, target) in enumerate(examples):
        ids[row, :len(input_ids)] = torch.tensor(input_ids)
        labels[row, :len(target)] = torch.tensor(target)
        mask[row, :len(input_ids)] = 1
    return ids, labels, mask


def token_loss(model: Any, examples: Sequence[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 8) -> float:
    """Mean cross-entropy per answer token over ``examples`` (no gradient, eval mode)."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            ids, labels, mask = _batch(examples[start:start + batch_size], pad_id)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            shifted = labels[:, 1:]
            losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shifted.reshape(-1),
                                     ignore_index=IGNORE, reduction="sum")
            total += float(losses)
            count += int((shifted != IGNORE).sum())
    model.train(was_training)
    return total / max(count, 1)


def load_student(base_model_dir: str | Path, adapter_dir: Optional[str | Path] = None, trainable: bool = True,
                 settings: LoraSettings = LoraSettings()) -> tuple[Any, Any]:
    """(peft model, tokenizer): a fresh LoRA on the base model, or an existing adapter to continue."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=torch.float32)
    if adapter_dir is not None:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable), tokenizer
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none",
                        target_modules=list(TARGET_MODULES), task_type="CAUSAL_LM")
    return get_peft_model(model, config), tokenizer


def train_lora(items: Sequence[Any], base_model_dir: str | Path, out_dir: str | Path,
               init_adapter: Optional[str | Path] = None, settings: LoraSettings = LoraSettings(),
               progress: bool = True) -> LoraReport:
    """SeqKD: fit a LoRA adapter so the student reproduces ``items``' teacher answers; save it to ``out_dir``.

    ``items`` are :class:`coopt.selection.DistillItem` (task, prompt, teacher_output); ``init_adapter``
    continues an earlier iteration's adapter instead of starting from zero.
    """
    import torch

    usable = [item for item in items if item.teacher_output]
    if not usable:
        raise ValueError("no distillation item has a teacher answer")
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    try:
        model, tokenizer = load_student(base_model_dir, init_adapter, True, settings)
        pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        examples = [encode_example(tokenizer, item.task, item.prompt, item.teacher_output, settings.max_target_tokens)
                    for item in usable]
        loss_before = token_loss(model, examples, pad_id)
        per_epoch = math.ceil(len(examples) / settings.batch_size)
        total_steps = per_epoch * settings.epochs
        if settings.max_steps is not None:
            total_steps = min(total_steps, settings.max_steps)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr,
                                      weight_decay=0.0)
        rng = random.Random(settings.seed)
        step_losses: list[float] = []
        model.train()
        bar = tqdm(total=total_steps, desc="SeqKD LoRA steps", disable=not progress, unit="step")
        step = 0
        while step < total_steps:
            order = list(range(len(examples)))
            rng.shuffle(order)
            for start in range(0, len(order), settings.batch_size):
                if step >= total_steps:
                    break
                ids, labels, mask = _batch([examples[i] for i in order[start:start + settings.batch_size]], pad_id)
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
                optimizer.step()
                step += 1
                step_losses.append(round(float(loss.detach()), 5))
                bar.update(1)
                bar.set_postfix(loss=f"{step_losses[-1]:.3f}")
        bar.close()
        loss_after = token_loss(model, examples, pad_id)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out), save_embedding_layers=False)  # only the LoRA matrices are trained
    finally:
        torch.set_num_threads(previous_threads)
    _point_at_hub_model(out)
    for written in out.iterdir():
        written.chmod(0o644)  # safetensors creates 0600; the proxy (or vLLM) may run as another user
    report = LoraReport(out_dir=str(out), n_examples=len(examples), steps=len(step_losses),
                        loss_before=round(loss_before, 5), loss_after=round(loss_after, 5), step_losses=step_losses,
                        seconds=round(time.perf_counter() - started, 1),
                        settings={**asdict(settings),
                                  "init_adapter": None if init_adapter is None else str(init_adapter),
                                  "base_model_dir": str(base_model_dir), "hub_base_model": HUB_BASE_MODEL,
                                  "n_hard": sum(getattr(i, "kind", "") == "hard" for i in usable),
                                  "n_random": sum(getattr(i, "kind", "") == "random" for i in usable)})
    (out / "routenlp_adapter.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8")
    return report


def _point_at_hub_model(adapter_dir: Path) -> None:
    """Name the hub model in adapter_config.json (PEFT wrote the local path), so vLLM and peft resolve it anywhere."""
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = HUB_BASE_MODEL
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def adapter_loss(items: Sequence[Any], base_model_dir: str | Path, adapter_dir: Optional[str | Path],
                 max_target_tokens: int = LoraSettings.max_target_tokens) -> float:
    """Mean answer-token loss of the base model (adapter None) or base + adapter on ``items``."""
    model, tokenizer = load_student(base_model_dir, adapter_dir, trainable=False)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    examples = [encode_example(tokenizer, item.task, item.prompt, item.teacher_output, max_target_tokens)
                for item in items if item.teacher_output]
    if adapter_dir is None:
        model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return token_loss(model, examples, pad_id)
