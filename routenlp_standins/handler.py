"""LiteLLM custom provider ``routenlp-local``: the four offline stand-in tiers, served in-process.

Proxy config::

    litellm_settings:
      custom_provider_map:
        - {provider: routenlp-local, custom_handler: routenlp_standins.handler.local_tiers}
    model_list:
      - model_name: routenlp
        litellm_params: {model: routenlp-local/classifier, input_cost_per_token: ..., output_cost_per_token: ...}

``routenlp-local/<tier>`` selects ``classifier`` (T1), ``smollm2`` (T2), ``retrieval`` (T3) or
``replay`` (T4); each module's docstring says what the tier stands in for.  A deployment's
``model_info`` may name the directories it serves (``routenlp_artifacts_dir``, ``routenlp_coopt_dir``:
see :class:`~routenlp_standins.artifacts.StandinDirs`); the handler reads them per call from the
``model_info`` LiteLLM's router attaches, which a client cannot override.  Every answer carries
OpenAI-format per-token logprobs (always, because the cascade needs them; the RouteNLP plugin strips
them for clients that did not ask) and ``usage`` counted with the tier's own tokenizer, so LiteLLM
prices the call with the deployment's ``input/output_cost_per_token``.

The task comes from request metadata: ``metadata.task`` (``router.acompletion(..., metadata=...)``),
or ``metadata.requester_metadata.task`` (the proxy's copy of the client's metadata), or the same under
``litellm_metadata`` (assistants/threads routes).  A tier that needs a task and gets none, or gets
one it cannot serve, answers HTTP 400; a missing artifact answers 500 naming the file and the build
command.  All model work runs in worker threads (SmolLM2 in its own one-thread pool, see
:mod:`routenlp_standins.tiers`), never on the event loop.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Mapping, Optional, Sequence

from litellm.llms.custom_llm import CustomLLM, CustomLLMError
from litellm.types.utils import (ChatCompletionTokenLogprob, ChoiceLogprobs, Delta, ModelResponse,
                                 ModelResponseStream, StreamingChoices, Usage)

from litellm_routenlp.config import SettingsError, find_config_path, read_yaml
from routenlp_core.tasks import UnknownTaskError, get_task
from routenlp_standins import tiers as tier_registry
from routenlp_standins.answer import TierAnswer, TokenLogprob, UnsupportedTaskError
from routenlp_standins.artifacts import (PROVIDER, TIER_NAMES, MissingArtifactError, StandinConfigError, StandinDirs,
                                         is_standin)
from routenlp_standins.minilm import MiniLM, shared_minilm
from routenlp_standins.smollm import (GeneratedToken, PromptTooLongError, SmolLM2Tier, clamp_max_tokens,
                                      message_text)

TASK_TIERS = ("classifier", "retrieval", "replay")  # tiers that cannot answer without knowing the task


def request_task(litellm_params: Optional[Mapping[str, Any]]) -> Optional[str]:
    """The task named in the request metadata, wherever LiteLLM put it (see module docstring)."""
    for key in ("metadata", "litellm_metadata"):
        metadata = (litellm_params or {}).get(key)
        if not isinstance(metadata, Mapping):
            continue
        for source in (metadata, metadata.get("requester_metadata")):
            if isinstance(source, Mapping) and source.get("task"):
                return str(source["task"])
    return None


def last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The query the non-generative tiers read: the last user message (earlier turns are context they
    cannot use)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(dict(message))
    raise CustomLLMError(status_code=400, message="routenlp-local: the request has no user message")


def _openai_logprobs(tokens: Sequence[TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[ChatCompletionTokenLogprob(**token.as_openai()) for token in tokens])


def _truncate(answer: TierAnswer, max_tokens: Optional[int]) -> TierAnswer:
    """Honour an explicit ``max_tokens`` for the non-generative tiers the way an LLM API would."""
    if max_tokens is None or len(answer.tokens) <= max_tokens:
        return answer
    kept = answer.tokens[:max(1, int(max_tokens))]
    answer.tokens = kept
    answer.text = "".join(token.token for token in kept)
    answer.finish_reason = "length"
    return answer


class _ChunkFormatter:
    """Turns stream items into OpenAI chunks: one per token with its logprob entry, a text-only chunk
    for text released without a new token, then a usage chunk and a last chunk with the finish_reason
    and the usage."""

    def __init__(self, tier: str) -> None:
        self.tier = tier
        self.response_id = f"chatcmpl-{PROVIDER}-{time.time_ns()}"
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.fingerprint: Optional[str] = None
        self.role_sent = False

    def chunk(self, text: Optional[str], tokens: Sequence[TokenLogprob] = (), finish_reason: Optional[str] = None,
              usage: Optional[Usage] = None) -> ModelResponseStream:
        role = None if self.role_sent else "assistant"  # as OpenAI: the role only in the first chunk
        self.role_sent = True
        choice = StreamingChoices(index=0, delta=Delta(content=text, role=role), finish_reason=finish_reason,
                                  logprobs=_openai_logprobs(tokens) if tokens else None)
        kwargs: dict[str, Any] = {"usage": usage} if usage is not None else {}
        return ModelResponseStream(id=self.response_id, choices=[choice], model=f"{PROVIDER}/{self.tier}",
                                   system_fingerprint=self.fingerprint, **kwargs)

    def feed(self, item: Any) -> list[ModelResponseStream]:
        if isinstance(item, tuple):  # ("prompt", prompt_tokens, system_fingerprint)
            _, self.prompt_tokens, self.fingerprint = item
            return []
        out = []
        if item.logprob is not None:
            self.completion_tokens += 1
            out.append(self.chunk(item.text_delta, [item.logprob]))
        elif item.text_delta:
            out.append(self.chunk(item.text_delta))
        if item.finish_reason is not None:
            usage = Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                          total_tokens=self.prompt_tokens + self.completion_tokens)
            # LiteLLM drops a custom provider's content-less finish chunk (streaming_handler.py,
            # _dispatch_provider_chunk), usage and all; a usage-only chunk *before* it is kept for
            # cost tracking (and never shown to the client as an empty chunk).
            out.append(self.chunk(None, usage=usage))
            out.append(self.chunk(None, finish_reason=item.finish_reason, usage=usage))
        return out


class LocalTiers(CustomLLM):
    """The ``routenlp-local`` provider.  Loads each tier (and each task's artifact) on first use, into the
    process-wide registry :mod:`routenlp_standins.tiers`."""

    def __init__(self, artifacts_dir: Optional[str | Path] = None) -> None:
        super().__init__()
        self._artifacts_dir = Path(artifacts_dir) if artifacts_dir is not None else None

    # -- set-up ------------------------------------------------------------------------------------

    @property
    def default_dirs(self) -> StandinDirs:
        """What a deployment naming no directories serves: this handler's root, else the default root."""
        return StandinDirs(self._artifacts_dir) if self._artifacts_dir is not None else StandinDirs.default()

    def dirs_of(self, litellm_params: Optional[Mapping[str, Any]]) -> StandinDirs:
        """The directories the called deployment names in its ``model_info`` (500 when misconfigured)."""
        info = (litellm_params or {}).get("model_info")
        try:
            return StandinDirs.from_model_info(info if isinstance(info, Mapping) else None,
                                               default_artifacts=self._artifacts_dir)
        except StandinConfigError as error:
            raise CustomLLMError(status_code=500, message=f"{PROVIDER}: deployment {error}") from error

    def minilm(self, dirs: Optional[StandinDirs] = None) -> MiniLM:
        return shared_minilm((dirs or self.default_dirs).artifacts)

    def smollm(self, dirs: Optional[StandinDirs] = None) -> SmolLM2Tier:
        return tier_registry.smollm2(dirs or self.default_dirs)

    def warmup(self, tasks: Sequence[str] = ("banking77", "clinc150", "bitext"),
               tiers: Sequence[str] = TIER_NAMES, dirs: Optional[StandinDirs] = None) -> dict[str, Any]:
        """Load what the proxy will serve so the first requests do not pay for it; returns timings.

        Tasks a tier cannot serve (e.g. bitext on the classifier) are skipped; missing artifacts raise.
        """
        dirs = dirs or self.default_dirs
        report: dict[str, Any] = {}
        if any(tier in TASK_TIERS for tier in tiers):
            started = time.perf_counter()
            self.minilm(dirs).encode(["warm-up"])
            report["minilm_seconds"] = round(time.perf_counter() - started, 2)
        if "smollm2" in tiers:
            report["smollm2"] = self.smollm(dirs).warmup(tasks)
        for tier in TASK_TIERS:
            if tier not in tiers:
                continue
            for task in tasks:
                started = time.perf_counter()
                try:
                    self._task_tier(tier, task, dirs)
                except CustomLLMError as error:
                    if error.status_code == 400:
                        continue
                    raise
                report[f"{tier}/{task}_seconds"] = round(time.perf_counter() - started, 2)
        return report

    def _task_tier(self, tier: str, task: str, dirs: Optional[StandinDirs] = None) -> Any:
        """The loaded ``tier`` object for ``task``; unsupported -> 400, missing artifact -> 500."""
        try:
            return tier_registry.task_tier(dirs or self.default_dirs, tier, task)
        except UnsupportedTaskError as error:
            raise CustomLLMError(status_code=400, message=f"{PROVIDER}/{tier}: {error}") from error
        except MissingArtifactError as error:
            raise CustomLLMError(status_code=500, message=f"{PROVIDER}/{tier}: {error}") from error

    # -- request handling --------------------------------------------------------------------------

    @staticmethod
    def _tier_of(model: str) -> str:
        tier = model.split("/")[-1]
        if tier not in TIER_NAMES:
            raise CustomLLMError(status_code=400, message=f"{PROVIDER}: unknown tier {model!r}; "
                                                          f"use {PROVIDER}/<{'|'.join(TIER_NAMES)}>")
        return tier

    @staticmethod
    def _checked_task(tier: str, litellm_params: Optional[Mapping[str, Any]]) -> Optional[str]:
        """The request's task; only the classifier refuses a missing or unknown one (it cannot generate).

        Other tiers treat an unknown task like no task: see :meth:`_serving_tier`."""
        task = request_task(litellm_params)
        if task is None:
            if tier == "classifier":
                raise CustomLLMError(status_code=400, message=(
                    f"{PROVIDER}/{tier} needs the task: send metadata={{\"task\": \"<name>\"}} "
                    "(e.g. banking77, clinc150)"))
            return None
        try:
            get_task(task)
        except UnknownTaskError as error:
            if tier == "classifier":
                raise CustomLLMError(status_code=400, message=f"{PROVIDER}/{tier}: {error}") from error
            return None
        return task

    def _serving_tier(self, tier: str, task: Optional[str], dirs: StandinDirs) -> str:
        """Which stand-in actually answers.

        The T3/T4 stand-ins can only answer tasks whose data they hold (retrieval index, recorded
        references).  A real 7B or frontier model answers anything, so for any other task, or none,
        they answer with SmolLM2's generation instead of failing (an offline limitation, documented in
        the README); prices and tier numbers stay those of the deployment that was called."""
        if tier not in ("retrieval", "replay"):
            return tier
        if task is None:
            return "smollm2"
        try:
            self._task_tier(tier, task, dirs)
        except CustomLLMError as error:
            if error.status_code == 400:
                return "smollm2"
            raise
        return tier

    @staticmethod
    def _max_tokens(optional_params: Optional[Mapping[str, Any]]) -> Optional[int]:
        params = optional_params or {}
        value = params.get("max_tokens") or params.get("max_completion_tokens")
        return int(value) if value is not None else None

    def _answer(self, tier: str, task: Optional[str], messages: Sequence[Mapping[str, Any]],
                max_tokens: Optional[int], dirs: StandinDirs) -> TierAnswer:
        """Blocking: the whole answer of ``tier`` (runs in a worker thread for async calls)."""
        tier = self._serving_tier(tier, task, dirs)
        if tier == "smollm2":
            try:
                return self.smollm(dirs).answer([dict(m) for m in messages], task, max_tokens)
            except MissingArtifactError as error:
                raise CustomLLMError(status_code=500, message=f"{PROVIDER}/{tier}: {error}") from error
            except PromptTooLongError as error:
                raise CustomLLMError(status_code=400, message=f"{PROVIDER}/{tier}: {error}") from error
        assert task is not None  # _checked_task guarantees it for these tiers
        query = last_user_text(messages)
        try:
            answer = self._task_tier(tier, task, dirs).answer(query, self.minilm(dirs))
        except MissingArtifactError as error:
            raise CustomLLMError(status_code=500, message=f"{PROVIDER}/{tier}: {error}") from error
        except UnsupportedTaskError as error:  # a replay miss on a task retrieval cannot serve
            raise CustomLLMError(status_code=400,
                                 message=f"{PROVIDER}/{tier}: no recorded answer, and {error}") from error
        return _truncate(answer, max_tokens)

    @staticmethod
    def _fill(model_response: ModelResponse, tier: str, answer: TierAnswer) -> ModelResponse:
        """Write ``answer`` into LiteLLM's response object (content, logprobs, usage, model)."""
        choice = model_response.choices[0]
        choice.message.content = answer.text  # type: ignore[union-attr]
        choice.finish_reason = answer.finish_reason
        choice.logprobs = _openai_logprobs(answer.tokens)  # type: ignore[union-attr]
        model_response.model = f"{PROVIDER}/{tier}"
        model_response.created = int(time.time())
        model_response.system_fingerprint = answer.system_fingerprint
        setattr(model_response, "usage", Usage(prompt_tokens=answer.prompt_tokens,
                                               completion_tokens=answer.completion_tokens,
                                               total_tokens=answer.prompt_tokens + answer.completion_tokens))
        hidden = dict(getattr(model_response, "_hidden_params", None) or {})
        hidden["routenlp_standin"] = answer.details
        if answer.system_fingerprint:
            hidden["routenlp_replay"] = answer.system_fingerprint
        model_response._hidden_params = hidden
        return model_response

    def completion(self, model: str, messages: list, api_base: str, custom_prompt_dict: dict,
                   model_response: ModelResponse, print_verbose: Callable, encoding: Any, api_key: Any,
                   logging_obj: Any, optional_params: dict, acompletion: Any = None, litellm_params: Any = None,
                   logger_fn: Any = None, headers: Any = None, timeout: Any = None, client: Any = None
                   ) -> ModelResponse:
        tier = self._tier_of(model)
        task = self._checked_task(tier, litellm_params)
        answer = self._answer(tier, task, messages, self._max_tokens(optional_params), self.dirs_of(litellm_params))
        return self._fill(model_response, tier, answer)

    async def acompletion(self, model: str, messages: list, api_base: str, custom_prompt_dict: dict,
                          model_response: ModelResponse, print_verbose: Callable, encoding: Any, api_key: Any,
                          logging_obj: Any, optional_params: dict, acompletion: Any = None,
                          litellm_params: Any = None, logger_fn: Any = None, headers: Any = None,
                          timeout: Any = None, client: Any = None) -> ModelResponse:
        tier = self._tier_of(model)
        task = self._checked_task(tier, litellm_params)
        loop = asyncio.get_running_loop()
        answer = await loop.run_in_executor(tier_registry.executor(tier), self._answer, tier, task, messages,
                                            self._max_tokens(optional_params), self.dirs_of(litellm_params))
        return self._fill(model_response, tier, answer)

    # -- streaming ---------------------------------------------------------------------------------

    def _stream_items(self, tier: str, task: Optional[str], messages: Sequence[Mapping[str, Any]],
                      max_tokens: Optional[int], cancelled: threading.Event, dirs: StandinDirs) -> Iterator[Any]:
        """Blocking generator: ``("prompt", n)``, then ``GeneratedToken``s (live for SmolLM2; the pieces
        of the finished answer for the other tiers), ending with a terminal item."""
        tier = self._serving_tier(tier, task, dirs)
        if tier == "smollm2":
            smollm = self.smollm(dirs)
            try:
                prompt, prefix_len = smollm.encode_prompt([dict(m) for m in messages], task)
                smollm.check_fits(len(prompt), clamp_max_tokens(max_tokens))
            except MissingArtifactError as error:
                raise CustomLLMError(status_code=500, message=f"{PROVIDER}/{tier}: {error}") from error
            except PromptTooLongError as error:
                raise CustomLLMError(status_code=400, message=f"{PROVIDER}/{tier}: {error}") from error
            yield ("prompt", len(prompt), None)
            yield from smollm.stream_tokens(prompt, clamp_max_tokens(max_tokens), cancelled, prefix_len)
            return
        answer = self._answer(tier, task, messages, max_tokens, dirs)
        yield ("prompt", answer.prompt_tokens, answer.system_fingerprint)
        for token in answer.tokens:
            yield GeneratedToken(0, token, token.token)
        yield GeneratedToken(-1, None, "", answer.finish_reason)

    def streaming(self, model: str, messages: list, api_base: str, custom_prompt_dict: dict,
                  model_response: ModelResponse, print_verbose: Callable, encoding: Any, api_key: Any,
                  logging_obj: Any, optional_params: dict, acompletion: Any = None, litellm_params: Any = None,
                  logger_fn: Any = None, headers: Any = None, timeout: Any = None, client: Any = None
                  ) -> Iterator[ModelResponseStream]:  # type: ignore[override]
        tier = self._tier_of(model)
        task = self._checked_task(tier, litellm_params)
        dirs = self.dirs_of(litellm_params)
        cancelled = threading.Event()
        try:
            formatter = _ChunkFormatter(tier)
            for item in self._stream_items(tier, task, messages, self._max_tokens(optional_params), cancelled, dirs):
                yield from formatter.feed(item)
        finally:
            cancelled.set()

    async def astreaming(self, model: str, messages: list, api_base: str, custom_prompt_dict: dict,
                         model_response: ModelResponse, print_verbose: Callable, encoding: Any, api_key: Any,
                         logging_obj: Any, optional_params: dict, acompletion: Any = None,
                         litellm_params: Any = None, logger_fn: Any = None, headers: Any = None,
                         timeout: Any = None, client: Any = None
                         ) -> AsyncIterator[ModelResponseStream]:  # type: ignore[override]
        tier = self._tier_of(model)
        task = self._checked_task(tier, litellm_params)
        dirs = self.dirs_of(litellm_params)
        items = _threaded(tier_registry.executor(tier),
                          lambda cancelled: self._stream_items(tier, task, messages,
                                                              self._max_tokens(optional_params), cancelled, dirs))
        formatter = _ChunkFormatter(tier)
        async for item in items:
            for chunk in formatter.feed(item):
                yield chunk


_DONE = object()


async def _threaded(pool: Executor, produce: Callable[[threading.Event], Iterator[Any]]) -> AsyncIterator[Any]:
    """Run a blocking generator in ``pool`` and hand its items to the event loop as they come.

    If the consumer stops early (client gone), ``cancelled`` is set and the generator stops at its
    next step, releasing the model lock.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    cancelled = threading.Event()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # event loop already closed: nobody is listening any more
            cancelled.set()

    def run() -> None:
        try:
            for item in produce(cancelled):
                if cancelled.is_set():
                    break
                put(item)
        except BaseException as error:  # re-raised on the event loop side
            put(error)
        finally:
            put(_DONE)

    worker = loop.run_in_executor(pool, run)
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancelled.set()
        await asyncio.shield(worker)


local_tiers = LocalTiers()
"""Module-level instance named in the proxy config (``routenlp_standins.handler.local_tiers``)."""


def configured_standins(document: Mapping[str, Any], source: str = "config") -> dict[StandinDirs, list[str]]:
    """The stand-in tiers a proxy config deploys, grouped by the directories they serve (a bad
    ``model_info`` raises :class:`StandinConfigError` naming ``source`` and the deployment)."""
    out: dict[StandinDirs, list[str]] = {}
    for index, deployment in enumerate(document.get("model_list") or []):
        if not isinstance(deployment, Mapping) or not is_standin(deployment):
            continue
        dirs = StandinDirs.from_model_info(deployment.get("model_info"), f"{source}: model_list[{index}].model_info")
        tier = str(deployment["litellm_params"]["model"]).split("/")[-1]
        if tier in TIER_NAMES and tier not in out.setdefault(dirs, []):
            out[dirs].append(tier)
    return out


def _warm_up_inside_proxy() -> None:
    """Inside ``litellm --config``: load every tier the config deploys now (with the directories each
    deployment names), so the proxy reports healthy only when the first request will not pay for model
    loading (SmolLM2 takes seconds).  A missing artifact or a bad ``model_info`` stops the proxy with
    one line naming it.  ``ROUTENLP_STANDINS_WARMUP=0`` turns this off."""
    if "litellm.proxy.proxy_server" not in sys.modules or os.environ.get("ROUTENLP_STANDINS_WARMUP", "1") == "0":
        return
    try:
        try:
            path = find_config_path()
            groups = configured_standins(read_yaml(path), str(path))
        except SettingsError:  # no readable config: warm the defaults, as a config naming no directories
            groups = {local_tiers.default_dirs: list(TIER_NAMES)}
        for dirs, tiers in groups.items():
            local_tiers.warmup(tiers=tiers, dirs=dirs)
    except StandinConfigError as error:
        sys.stderr.write(f"\nRouteNLP stand-in tiers: {error}\n\n")
        raise SystemExit(3) from None
    except (CustomLLMError, MissingArtifactError) as error:
        sys.stderr.write(f"\nRouteNLP stand-in tiers: cannot load: {error}\n(run `make artifacts`)\n\n")
        raise SystemExit(3) from None


_warm_up_inside_proxy()
