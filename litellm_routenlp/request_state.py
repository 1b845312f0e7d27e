"""What the plugin knows about one request between its hooks: one typed object, never serialised.

LiteLLM hands every hook the request's ``metadata`` dict, so that is where the state travels
(under :data:`STATE_KEY`).  It travels as this Python object, not as a dict of JSON values:

* nothing converts it on the way (the routing decision was a dict turned back into a
  :class:`~litellm_routenlp.routing.RoutingDecision` in each hook); it is serialised once, as the
  decision record, when the request ends;
* a client cannot forge it: a request body is JSON, and JSON cannot make a :class:`RequestState`
  (client-sent ``routenlp*`` keys are dropped at the door anyway, request_fields.py);
* its lifetime is the request's: no registry keyed by call id to clean up when a client disconnects.

LiteLLM copies ``metadata`` shallowly on its normal path (the object is shared) and deep-copies it
only on fallback paths, as it did the dict.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from .latency_budget import SlaNote
from .routing import RoutingDecision

STATE_KEY = "routenlp"  # the key in data["metadata"]; client-sent routenlp* keys are dropped at the door


@dataclass
class RequestState:
    """One request of the alias, from the pre-call hook to its decision record."""

    decision: RoutingDecision
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    started: float = field(default_factory=time.time)   # wall clock: the record's total latency
    client_call_id: Optional[str] = None                # LiteLLM's call id of the client's own call
    client_logprobs: bool = False                       # the client asked for logprobs (else they are removed)
    budget_remaining_usd: Optional[float] = None        # the key's budget left, read once
    sla: list[SlaNote] = field(default_factory=list)    # latency-budget notes, start first
    escalation_call_ids: dict[int, str] = field(default_factory=dict)  # tier -> call id of its escalation
    # the outcome the headers hook and the metrics read (final_tier, path, uncertainties, ...)
    result: Optional[dict[str, Any]] = None
    recorded: bool = False                              # its decision record is on disk
    passthrough: bool = False                           # a stream sent on as it comes (not cascaded)
    replay: Optional[list[Any]] = None                  # a buffered stream's chunks, to send after the cascade


def state_of(metadata: Any) -> Optional[RequestState]:
    """The request's state when the plugin made it; None for anything else (a client's value included)."""
    state = metadata.get(STATE_KEY) if isinstance(metadata, dict) else None
    return state if isinstance(state, RequestState) else None
