"""What every stand-in tier returns: the answer text, its tokens with log-probabilities, and counts.

The handler turns a :class:`TierAnswer` into an OpenAI-format response (non-streaming) or a chunk
stream; keeping the tiers free of LiteLLM types lets them be tested, and reused by the offline
all-pairs runner, without a router.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class UnsupportedTaskError(ValueError):
    """The task cannot be served by this tier (e.g. a generation task sent to the classifier)."""


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text (pieces concatenate to the answer), ln p, and its UTF-8 bytes."""

    token: str
    logprob: float
    bytes: list[int]

    @classmethod
    def of_text(cls, token: str, logprob: float) -> "TokenLogprob":
        return cls(token=token, logprob=float(logprob), bytes=list(token.encode("utf-8")))

    def as_openai(self) -> dict[str, Any]:
        """The OpenAI ``logprobs.content[i]`` entry; no alternatives are reported (top_logprobs=[])."""
        return {"token": self.token, "logprob": self.logprob, "bytes": self.bytes, "top_logprobs": []}


@dataclass
class TierAnswer:
    """A tier's full answer.  ``details`` ends up in the response's ``_hidden_params['routenlp_standin']``."""

    text: str
    tokens: list[TokenLogprob]
    prompt_tokens: int
    finish_reason: str = "stop"
    system_fingerprint: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


def uniform_pieces(pieces: list[str], logprob: float) -> list[TokenLogprob]:
    """Give every piece the same log-probability: how the non-generative tiers report one confidence."""
    return [TokenLogprob.of_text(piece, logprob) for piece in pieces]
