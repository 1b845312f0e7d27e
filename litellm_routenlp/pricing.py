"""Price a call from its token usage and the deployment's per-token prices.

LiteLLM prices non-streaming calls itself (``_hidden_params["response_cost"]``), and that figure is
used whenever it is a real price.  A stream reaches the plugin before LiteLLM's logging has priced
it, and LiteLLM 1.106.2 leaves the stream's ``response_cost`` at ``0.0`` (with or without
``include_usage``), so a reported 0.0 for a call that used tokens is treated as *unpriced*: its cost
is computed here from the usage in the stream's last chunk and the deployment's
``input_cost_per_token`` / ``output_cost_per_token`` (the prices in proxy_config.yaml) -- the same
formula LiteLLM applies to the non-streamed call, so a stream costs what the same request costs
without streaming.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional


def _field(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def usage_tokens(usage: Any) -> tuple[int, int]:
    """(prompt_tokens, completion_tokens) of a usage object or dict (0 when absent)."""
    def number(name: str) -> int:
        value = _field(usage, name)
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0
    return number("prompt_tokens"), number("completion_tokens")


def price_usage(litellm_params: Mapping[str, Any], usage: Any) -> Optional[float]:
    """USD for ``usage`` at the deployment's per-token prices; None when either is unknown."""
    if usage is None:
        return None
    input_price = litellm_params.get("input_cost_per_token")
    output_price = litellm_params.get("output_cost_per_token")
    if input_price is None and output_price is None:
        return None
    prompt_tokens, completion_tokens = usage_tokens(usage)
    return float(prompt_tokens) * float(input_price or 0.0) + float(completion_tokens) * float(output_price or 0.0)


def call_cost(reported: Any, usage: Any, litellm_params: Mapping[str, Any]) -> float:
    """The cost of one call: LiteLLM's figure when it is a real price, else priced from ``usage``.

    ``reported`` of None, non-numeric, NaN, negative, or 0.0 while ``usage`` shows tokens counts as
    unpriced; when the usage cannot be priced either, the reported figure (or 0.0) stays."""
    try:
        value = float(reported) if reported is not None and not isinstance(reported, bool) else None
    except (TypeError, ValueError):
        value = None
    if value is not None and (math.isnan(value) or value < 0):
        value = None
    if value is not None and (value > 0 or sum(usage_tokens(usage)) == 0):
        return value
    priced = price_usage(litellm_params, usage)
    return priced if priced is not None else (value or 0.0)
