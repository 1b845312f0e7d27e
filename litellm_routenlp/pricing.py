"""Price a call from its token usage and the deployment's per-token prices.

LiteLLM prices non-streaming calls itself (``_hidden_params["response_cost"]``), and that figure is
used whenever it exists.  A stream that the plugin buffers reaches the cascade before LiteLLM's
logging has priced it, so its cost is computed here from the usage in the stream's last chunk and the
deployment's ``input_cost_per_token`` / ``output_cost_per_token`` (the prices in proxy_config.yaml).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional


def _field(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def price_usage(litellm_params: Mapping[str, Any], usage: Any) -> Optional[float]:
    """USD for ``usage`` at the deployment's per-token prices; None when either is unknown."""
    if usage is None:
        return None
    input_price = litellm_params.get("input_cost_per_token")
    output_price = litellm_params.get("output_cost_per_token")
    if input_price is None and output_price is None:
        return None
    prompt_tokens = _field(usage, "prompt_tokens") or 0
    completion_tokens = _field(usage, "completion_tokens") or 0
    return float(prompt_tokens) * float(input_price or 0.0) + float(completion_tokens) * float(output_price or 0.0)
