"""Token-level uncertainty: the one signal the cascade, calibration and benchmarks compare with delta.

RouteNLP escalates when ``u = mean(1 - p(token))`` over the generated tokens exceeds the calibrated
threshold delta[tier][task].  A classifier tier reports a single "token" (its label) whose probability
is the top class probability, so the same formula gives ``u = 1 - p(top class)``.  Every caller
(proxy, calibration, benchmarks, co-optimisation) goes through :func:`token_uncertainty` so that a
threshold fitted offline means exactly the same thing online.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Sequence


def token_uncertainty(token_logprobs: Sequence[float]) -> Optional[float]:
    """Mean of ``1 - exp(logprob)`` over tokens; ``None`` when there are no tokens to judge."""
    if len(token_logprobs) == 0:
        return None
    total = 0.0
    for logprob in token_logprobs:
        value = float(logprob)
        if math.isnan(value):
            raise ValueError("token logprob is NaN")
        # Providers occasionally return tiny positive values from rounding; p is capped at 1.
        total += 1.0 - math.exp(min(value, 0.0))
    return total / len(token_logprobs)


def classifier_uncertainty(top_class_probability: float) -> float:
    """A classifier's answer is one token whose probability is the top class probability."""
    p = float(top_class_probability)
    if not 0.0 <= p <= 1.0 or math.isnan(p):
        raise ValueError(f"class probability must lie in [0, 1], got {p!r}")
    return token_uncertainty([math.log(p) if p > 0 else -math.inf])  # type: ignore[return-value]


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def logprobs_of_choice(choice: Any) -> list[float]:
    """Extract per-token logprobs from an OpenAI-format choice (object or dict); [] when absent."""
    logprobs = _get(choice, "logprobs")
    content: Optional[Iterable[Any]] = _get(logprobs, "content")
    if not content:
        return []
    values = []
    for item in content:
        value = _get(item, "logprob")
        if value is not None:
            values.append(float(value))
    return values


def response_uncertainty(response: Any) -> Optional[float]:
    """Uncertainty of the first choice of an OpenAI-format chat completion; ``None`` without logprobs."""
    choices = _get(response, "choices") or []
    if not choices:
        return None
    return token_uncertainty(logprobs_of_choice(choices[0]))


def token_margin(top_logprobs: Sequence[Sequence[float]]) -> Optional[float]:
    """Mean over tokens of ``p(top token) - p(runner-up)``; ``None`` when no token has alternatives.

    ``top_logprobs`` holds, per generated token, the log-probabilities of its top alternatives
    (OpenAI ``top_logprobs``; any order).  A token with a single alternative has margin p(top).
    The one margin function: the post-answer quality estimator (``quality_estimates``) reads it
    online and its calibration rows offline.
    """
    margins = []
    for alternatives in top_logprobs:
        probabilities = sorted((math.exp(min(float(value), 0.0)) for value in alternatives), reverse=True)
        if any(math.isnan(p) for p in probabilities):
            raise ValueError("top logprob is NaN")
        if probabilities:
            margins.append(probabilities[0] - (probabilities[1] if len(probabilities) > 1 else 0.0))
    return sum(margins) / len(margins) if margins else None


def response_margin(response: Any) -> Optional[float]:
    """Top-token margin of the first choice of an OpenAI-format completion; ``None`` without top_logprobs."""
    choices = _get(response, "choices") or []
    content = _get(_get(choices[0], "logprobs"), "content") if choices else None
    if not content:
        return None
    per_token = []
    for item in content:
        alternatives = _get(item, "top_logprobs") or []
        values = [float(_get(alt, "logprob")) for alt in alternatives if _get(alt, "logprob") is not None]
        if values:
            per_token.append(values)
    return token_margin(per_token)
