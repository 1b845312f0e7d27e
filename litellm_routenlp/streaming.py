"""Buffering a streamed tier answer so the cascade can judge it before the client sees a byte."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from litellm.types.utils import ChatCompletionTokenLogprob, ChoiceLogprobs, ModelResponse, ModelResponseStream


@dataclass
class BufferedStream:
    chunks: list[Any] = field(default_factory=list)
    response: Any = None               # the chunks assembled into one ModelResponse
    cost_usd: Optional[float] = None
    usage: Any = None                  # token usage from the stream's last chunk that carried one


def _logprob_items(choice: Any) -> list[Any]:
    logprobs = getattr(choice, "logprobs", None)
    if logprobs is None:
        return []
    content = logprobs.get("content") if isinstance(logprobs, dict) else getattr(logprobs, "content", None)
    return list(content or [])


async def collect_stream(stream: Any) -> BufferedStream:
    """Consume ``stream``; keep the chunks for replay and assemble text + logprobs for the cascade."""
    buffered = BufferedStream()
    text: list[str] = []
    logprob_items: list[Any] = []
    finish_reason = None
    hidden: dict[str, Any] = dict(getattr(stream, "_hidden_params", None) or {})
    async for chunk in stream:
        buffered.chunks.append(chunk)
        for choice in getattr(chunk, "choices", None) or []:
            delta = getattr(choice, "delta", None)
            if delta is not None and getattr(delta, "content", None):
                text.append(delta.content)
            logprob_items.extend(_logprob_items(choice))
            finish_reason = getattr(choice, "finish_reason", None) or finish_reason
        hidden.update(getattr(chunk, "_hidden_params", None) or {})
        if getattr(chunk, "usage", None) is not None:
            buffered.usage = chunk.usage
    hidden.update(getattr(stream, "_hidden_params", None) or {})
    response = ModelResponse(choices=[{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                                       "finish_reason": finish_reason or "stop"}])
    items = [item if isinstance(item, dict) else item.model_dump() for item in logprob_items]
    response.choices[0].logprobs = ChoiceLogprobs(content=[ChatCompletionTokenLogprob(**item) for item in items]) \
        if items else None
    response._hidden_params = hidden
    buffered.response = response
    cost = hidden.get("response_cost")
    buffered.cost_usd = float(cost) if isinstance(cost, (int, float)) else None
    return buffered


def chunks_from_response(response: Any) -> list[ModelResponseStream]:
    """A complete (escalated) answer replayed as a stream: one content chunk and a finish chunk."""
    choice = response.choices[0]
    content = getattr(choice.message, "content", None) or ""
    base = {"id": getattr(response, "id", None), "model": getattr(response, "model", None),
            "created": getattr(response, "created", None)}
    base = {key: value for key, value in base.items() if value is not None}
    body = ModelResponseStream(choices=[{"index": 0, "delta": {"role": "assistant", "content": content}}], **base)
    if getattr(choice, "logprobs", None) is not None:
        body.choices[0].logprobs = choice.logprobs
    tail = ModelResponseStream(choices=[{"index": 0, "delta": {}, "finish_reason": choice.finish_reason or "stop"}],
                               **base)
    return [body, tail]
