"""What the plugin reads from a chat request: its task, its text, and the parameters an escalation repeats.

Bad input is turned into :class:`RequestError` (the proxy answers HTTP 400 with its message) instead of
failing deeper inside a tier.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from .config import RouteNLPSettings

# Sampling/format parameters an escalation must repeat so the next tier answers the same request.
FORWARDED_PARAMS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed",
                    "presence_penalty", "frequency_penalty", "response_format", "user")


# Parameters whose meaning differs across tiers or that the cascade cannot judge: refused with a 400.
UNSUPPORTED_PARAMS = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "logit_bias",
                      "audio", "modalities", "prediction", "web_search_options")


class RequestError(ValueError):
    """A client error; ``param`` names the offending request field."""

    def __init__(self, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.param = param


# Holders of request metadata a client can fill (directly, or through LiteLLM's copies of it).
METADATA_HOLDERS = ("metadata", "litellm_metadata")
NESTED_HOLDERS = ("requester_metadata", "spend_logs_metadata")
PLUGIN_PREFIX = "routenlp"       # the plugin's namespace for metadata keys and ("routenlp-") tags


def _task_value(metadata: Mapping[str, Any]) -> Any:
    if "task" in metadata:
        return metadata["task"]
    requester = metadata.get("requester_metadata")
    if isinstance(requester, Mapping) and "task" in requester:
        return requester["task"]
    return None


def normalise_task_name(value: str) -> str:
    """THE one normalisation of a client's task name: surrounding whitespace (and CR/LF/tabs) removed.

    Nothing else is folded: ``"bank\u200bing77"`` is not ``banking77``.  Applied once, at the door
    (:func:`resolve_task`); the plugin writes the result back into the request so the tiers see the
    same name."""
    return value.strip()


def resolve_task(metadata: Mapping[str, Any], settings: RouteNLPSettings) -> tuple[Optional[str], str]:
    """Return (task, status) with status known/unknown/missing, applying the configured policy.

    The normalised name is matched against the configured tasks before it goes anywhere.  Any other
    name -- whatever characters it holds (non-latin-1, control characters, CR/LF/NUL, bidi or
    zero-width marks) -- is an *unknown* task: routed with the task-agnostic embedding, never put in a
    response header (``x-routenlp-task: -``), or refused with a 400 naming ``metadata.task`` under
    ``unknown_task_policy: reject`` / ``require_task``."""
    value = _task_value(metadata or {})
    if value is None:
        if settings.require_task or settings.unknown_task_policy == "reject":
            raise RequestError("metadata.task is required: one of " + ", ".join(sorted(settings.tasks)),
                               param="metadata.task")
        return None, "missing"
    if not isinstance(value, str) or not value.strip():
        raise RequestError("metadata.task must be a non-empty string", param="metadata.task")
    task = normalise_task_name(value)
    if task in settings.tasks:
        return task, "known"
    if settings.require_task or settings.unknown_task_policy == "reject":
        shown = ascii(task[:80])  # ascii(): control and bidi characters are shown escaped, not rendered
        raise RequestError(f"unknown task {shown}; configured tasks: " + ", ".join(sorted(settings.tasks)),
                           param="metadata.task")
    return task, "unknown"


def write_back_task(data: dict[str, Any], task: str) -> None:
    """Put the normalised configured name wherever the client's task was, so every tier reads it."""
    for holder_name in METADATA_HOLDERS:
        holder = data.get(holder_name)
        if not isinstance(holder, dict):
            continue
        for target in (holder, holder.get("requester_metadata")):
            if isinstance(target, dict) and isinstance(target.get("task"), str):
                target["task"] = task


def strip_client_plugin_fields(data: dict[str, Any]) -> list[str]:
    """Remove every ``routenlp*`` metadata key and ``routenlp-*`` tag a client sent; return what went.

    Run at the door (the pre-call hook), before the plugin writes its own: afterwards every
    ``routenlp*`` key in the request, and so in its spend-log row, was written by the plugin.  Covers
    the body's ``metadata`` / ``litellm_metadata``, LiteLLM's copies (``requester_metadata``),
    ``spend_logs_metadata`` (also filled from the ``x-litellm-spend-logs-metadata`` header) and
    ``tags`` (also filled from ``x-litellm-tags`` and key metadata)."""
    removed: list[str] = []

    def clean(holder: Any, where: str, depth: int) -> None:
        if not isinstance(holder, dict):
            return
        for key in [k for k in holder if isinstance(k, str) and k.lower().startswith(PLUGIN_PREFIX)]:
            del holder[key]
            removed.append(f"{where}.{key}")
        tags = holder.get("tags")
        if isinstance(tags, list):
            kept = [t for t in tags if not (isinstance(t, str) and t.strip().lower().startswith(PLUGIN_PREFIX + "-"))]
            if len(kept) != len(tags):
                removed.append(f"{where}.tags")
                holder["tags"] = kept
        if depth < 2:
            for nested in NESTED_HOLDERS:
                clean(holder.get(nested), f"{where}.{nested}", depth + 1)

    tags = data.get("tags")
    if isinstance(tags, list):
        data["tags"] = [t for t in tags if not (isinstance(t, str) and t.strip().lower().startswith(PLUGIN_PREFIX + "-"))]
    for name in (*METADATA_HOLDERS, *NESTED_HOLDERS):
        clean(data.get(name), name, 0)
    return removed


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "\n".join(parts)
    return ""


def query_text(messages: Any) -> str:
    """The text the router sees: the last user message (the query, without system boilerplate)."""
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, Mapping) and message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""


def validate_request(data: Mapping[str, Any]) -> None:
    """Reject what the router or the cascade cannot serve faithfully."""
    if isinstance(data, dict):  # first: every other refusal's response would echo the names too
        _refuse_unencodable_guardrails(data)
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    if not query_text(messages).strip():
        raise RequestError("the last user message must contain text", param="messages")
    n = data.get("n")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int):
            raise RequestError(f"`n` must be an integer (1), got {n!r} of type {type(n).__name__}", param="n")
        if n < 1:
            raise RequestError(f"`n` must be at least 1, got {n!r}", param="n")
        if n > 1:
            raise RequestError(f"n > 1 is not supported by the routenlp model (the cascade judges one answer), "
                               f"got {n!r}", param="n")
    metadata = data.get("metadata")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise RequestError("metadata must be an object", param="metadata")
    for param in ("max_tokens", "max_completion_tokens"):
        value = data.get(param)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RequestError(f"`{param}` must be a positive integer, got {value!r}", param=param)
    response_format = data.get("response_format")
    if response_format is not None and not (isinstance(response_format, Mapping)
                                            and isinstance(response_format.get("type"), str)):
        # LiteLLM 1.106.2 answers a non-object response_format with a 500 (APIConnectionError)
        raise RequestError("`response_format` must be an object with a string `type` (e.g. {\"type\": \"text\"}), "
                           f"got {response_format!r}", param="response_format")
    for param in UNSUPPORTED_PARAMS:
        if data.get(param) not in (None, [], {}):
            raise RequestError(f"`{param}` is not supported by the routenlp model: tiers differ in tool and "
                               "format support, and the cascade judges plain text answers", param=param)


def _refuse_unencodable_guardrails(data: dict) -> None:
    """400 for a guardrail name that cannot be a header value (not latin-1, or a control character).

    LiteLLM 1.106.2 echoes requested guardrail names in a response header, and a header must be
    latin-1 without control characters, so such a name ends in a 500, or ("\\r") in a dropped
    connection, on an error response too: this check runs before every other refusal.  Before the pre-call hook
    runs, the proxy has moved a body-level ``guardrails`` into the metadata (and its
    ``requester_metadata`` copy).  The names are removed before refusing, so that the 400 itself
    can be sent.
    """
    metadata = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    holders = [h for h in (data, metadata, data.get("litellm_metadata"), metadata.get("requester_metadata"))
               if isinstance(h, dict)]
    for holder in holders:
        guardrails = holder.get("guardrails")
        names = guardrails if isinstance(guardrails, list) else [guardrails] if isinstance(guardrails, str) else []
        bad = next((name for name in names if isinstance(name, str) and not _header_safe(name)), None)
        if bad is not None:
            for other in holders:
                other.pop("guardrails", None)
            raise RequestError(f"guardrail name {bad!r} is not a configured guardrail", param="guardrails")


def _header_safe(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return not any(ord(char) < 0x20 or ord(char) == 0x7F for char in text)


def forwarded_params(data: Mapping[str, Any]) -> dict[str, Any]:
    return {key: data[key] for key in FORWARDED_PARAMS if data.get(key) is not None}
