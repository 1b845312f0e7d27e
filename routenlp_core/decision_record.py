"""The decision record: what was decided for one request, every tier tried, and how it ended.

One frozen, versioned type for every place that writes or reads a decision: the proxy's decision
log (``litellm_routenlp.decision_log``, written by the plugin), its readers (``coopt.logs``,
``coopt.ops_report``), ``coopt evaluate``'s replayed outcomes and the bench's ``decisions.jsonl``.
It lives in the foundation because the serving package writes it and offline packages read it.

JSON keys are the ones the plugin wrote before this type existed (so ``routenlp report`` / ``check``
and anything reading old logs keep working), plus ``record_version`` and ``outcome``.  Versions:

- 1: every record written before this module (no ``record_version`` key).  Read leniently: missing
  keys are None, a failure record's ``router.probabilities`` list becomes a mapping keyed ``T1..``,
  ``outcome`` is inferred (attempts -> ``answered``, none -> ``failed``).
- 2: this module.  ``outcome`` is always written; keys this reader does not model are kept in
  ``extra`` and written back, so a field added by a newer writer survives a read/write round trip.

Frozen dataclasses (stdlib) rather than pydantic: the record is built once per request on the hot
path, and every field is written by the plugin itself, so validation would only cost time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping, Optional, Sequence

RECORD_VERSION = 2
OUTCOMES = ("answered", "failed", "failed_after_answer")


@dataclass(frozen=True)
class Attempt:
    """One tier tried for a request (``tier`` 1-based; ``error`` set when the call failed)."""

    tier: Optional[int]
    tier_name: Optional[str]
    model_id: Optional[str] = None
    uncertainty: Optional[float] = None
    threshold: Optional[float] = None
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    escalated: bool = False
    error: Optional[str] = None
    estimates: Optional[tuple[float, ...]] = None  # cascade_routing: per-tier estimates after this answer
    reason: Optional[str] = None                   # the policy's reason for its decision after this answer
    call_id: Optional[str] = None                  # LiteLLM call id of this tier's call (links spend rows)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["estimates"] = None if self.estimates is None else list(self.estimates)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Attempt":
        tier = raw.get("tier")
        tier = tier if isinstance(tier, int) and not isinstance(tier, bool) else None
        name = raw.get("tier_name") or (f"T{tier}" if tier else None)
        estimates = raw.get("estimates")
        return cls(tier=tier, tier_name=name, model_id=raw.get("model_id"), uncertainty=number_or_none(raw.get("uncertainty")),
                   threshold=number_or_none(raw.get("threshold")), cost_usd=number_or_none(raw.get("cost_usd")) or 0.0,
                   latency_ms=number_or_none(raw.get("latency_ms")) or 0.0, escalated=bool(raw.get("escalated")),
                   error=raw.get("error"), reason=raw.get("reason"), call_id=raw.get("call_id"),
                   estimates=tuple(float(v) for v in estimates) if isinstance(estimates, list) else None)


@dataclass(frozen=True)
class RouteRecord:
    """The router's part: its estimates (keyed by tier name) and the start tier it led to."""

    probabilities: Optional[Mapping[str, float]] = None
    routed_tier: Optional[str] = None
    wanted_tier: Optional[str] = None
    reason: Optional[str] = None
    healthy_tiers: tuple[Optional[str], ...] = ()
    router_ms: Optional[float] = None
    acceptance: Optional[Mapping[str, float]] = None

    def to_dict(self) -> dict[str, Any]:
        return {"probabilities": None if self.probabilities is None else dict(self.probabilities),
                "routed_tier": self.routed_tier, "wanted_tier": self.wanted_tier, "reason": self.reason,
                "healthy_tiers": list(self.healthy_tiers), "router_ms": self.router_ms,
                "acceptance": None if self.acceptance is None else dict(self.acceptance)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "RouteRecord":
        return cls(probabilities=_by_tier(raw.get("probabilities")), routed_tier=raw.get("routed_tier"),
                   wanted_tier=raw.get("wanted_tier"), reason=raw.get("reason"),
                   healthy_tiers=tuple(raw.get("healthy_tiers") or ()), router_ms=number_or_none(raw.get("router_ms")),
                   acceptance=_by_tier(raw.get("acceptance")))


@dataclass(frozen=True)
class PolicyRecord:
    """The decision policy's part: its name, certified lambda, start estimates and why it stopped."""

    name: Optional[str] = None
    lam: Optional[float] = None
    threshold: Optional[float] = None   # posterior_threshold: the task's certified threshold
    start_estimates: Optional[tuple[float, ...]] = None
    stop_reason: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "lambda": self.lam, "threshold": self.threshold,
                "start_estimates": None if self.start_estimates is None else list(self.start_estimates),
                "stop_reason": self.stop_reason}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "PolicyRecord":
        estimates = raw.get("start_estimates")
        return cls(name=raw.get("name"), lam=number_or_none(raw.get("lambda")), threshold=number_or_none(raw.get("threshold")),
                   stop_reason=raw.get("stop_reason"),
                   start_estimates=tuple(float(v) for v in estimates) if isinstance(estimates, list) else None)


# JSON keys in the order the plugin has always written them; ``prompt`` and ``error`` only when set
_KEYS = ("record_version", "request_id", "client_call_id", "ts", "outcome", "task", "task_status", "router", "policy",
         "attempts", "final_tier", "total_cost_usd", "total_latency_ms", "escalation_error", "escalation_skipped",
         "stream", "key_alias", "prompt", "error")
_OMITTED_WHEN_NONE = ("prompt", "error")


@dataclass(frozen=True)
class DecisionRecord:
    """One request: routing decision, attempts in the order they were made, and the outcome."""

    request_id: str
    outcome: str = "answered"                # OUTCOMES; failed_after_answer retracts an earlier record
    ts: Optional[str] = None
    client_call_id: Optional[str] = None     # the client's x-litellm-call-id (clients choose it: not unique)
    task: Optional[str] = None
    task_status: Optional[str] = None
    router: Optional[RouteRecord] = None
    policy: Optional[PolicyRecord] = None
    attempts: tuple[Attempt, ...] = ()
    final_tier: Optional[str] = None
    total_cost_usd: Optional[float] = None
    total_latency_ms: Optional[float] = None
    escalation_error: Optional[str] = None
    escalation_skipped: Optional[str] = None
    stream: Optional[bool] = None
    key_alias: Optional[str] = None
    prompt: Optional[str] = None             # absent when message logging is off
    error: Optional[str] = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # keys this version does not model, kept as read
    record_version: int = RECORD_VERSION

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"decision record {self.request_id}: outcome must be one of {OUTCOMES}, "
                             f"got {self.outcome!r}")

    @property
    def path(self) -> list[str]:
        """Tier names that answered, in order."""
        return [a.tier_name or "?" for a in self.attempts if a.error is None]

    def with_version(self) -> "DecisionRecord":
        """This record as the current version writes it (a version-1 record read back, re-written)."""
        return replace(self, record_version=RECORD_VERSION)

    def to_dict(self) -> dict[str, Any]:
        values = {"record_version": self.record_version, "request_id": self.request_id,
                  "client_call_id": self.client_call_id, "ts": self.ts, "outcome": self.outcome, "task": self.task,
                  "task_status": self.task_status, "router": None if self.router is None else self.router.to_dict(),
                  "policy": None if self.policy is None else self.policy.to_dict(),
                  "attempts": [a.to_dict() for a in self.attempts], "final_tier": self.final_tier,
                  "total_cost_usd": self.total_cost_usd, "total_latency_ms": self.total_latency_ms,
                  "escalation_error": self.escalation_error, "escalation_skipped": self.escalation_skipped,
                  "stream": self.stream, "key_alias": self.key_alias, "prompt": self.prompt, "error": self.error}
        out = {key: values[key] for key in _KEYS if not (key in _OMITTED_WHEN_NONE and values[key] is None)}
        out.update({key: value for key, value in self.extra.items() if key not in out})
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"), default=str)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "DecisionRecord":
        """Read a record of any version (module docstring); ValueError names what is wrong."""
        version = raw.get("record_version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= RECORD_VERSION:
            raise ValueError(f"decision record {raw.get('request_id')!r}: record_version {version!r} is not one "
                             f"this reader knows (1..{RECORD_VERSION})")
        if not raw.get("request_id"):
            raise ValueError("decision record without request_id")
        attempts = tuple(Attempt.from_dict(a) for a in raw.get("attempts") or [] if isinstance(a, Mapping))
        outcome = raw.get("outcome") or ("answered" if attempts else "failed")
        router, policy = raw.get("router"), raw.get("policy")
        return cls(
            request_id=str(raw["request_id"]), outcome=outcome, ts=raw.get("ts"), client_call_id=raw.get("client_call_id"),
            task=raw.get("task"), task_status=raw.get("task_status"),
            router=RouteRecord.from_dict(router) if isinstance(router, Mapping) else None,
            policy=PolicyRecord.from_dict(policy) if isinstance(policy, Mapping) else None,
            attempts=attempts, final_tier=raw.get("final_tier"), total_cost_usd=number_or_none(raw.get("total_cost_usd")),
            total_latency_ms=number_or_none(raw.get("total_latency_ms")), escalation_error=raw.get("escalation_error"),
            escalation_skipped=raw.get("escalation_skipped"),
            stream=raw.get("stream") if isinstance(raw.get("stream"), bool) else None,
            key_alias=raw.get("key_alias"), prompt=raw.get("prompt"), error=raw.get("error"),
            extra={k: v for k, v in raw.items() if k not in _KEYS}, record_version=version)

    @classmethod
    def from_json(cls, text: str | bytes) -> "DecisionRecord":
        raw = json.loads(text)
        if not isinstance(raw, Mapping):
            raise ValueError("decision record: expected a JSON object")
        return cls.from_dict(raw)


def number_or_none(value: Any) -> Optional[float]:
    """``value`` as a float; None for None, a bool or anything not numeric (logs are read leniently)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _by_tier(value: Any) -> Optional[dict[str, float]]:
    """A per-tier mapping; version-1 failure records wrote a list (tier 1 first)."""
    if isinstance(value, Mapping):
        return {str(k): float(v) for k, v in value.items() if number_or_none(v) is not None}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return {f"T{k}": float(v) for k, v in enumerate(value, start=1) if number_or_none(v) is not None}
    return None


def tier_map(tier_names: Mapping[int, str], values: Optional[Sequence[float]]) -> Optional[dict[str, float]]:
    """``[p_1, .., p_K]`` -> ``{"T1": p_1, ..}`` with the deployment's tier names (None stays None)."""
    return None if values is None else dict(zip(tier_names.values(), values))


__all__ = ["Attempt", "DecisionRecord", "OUTCOMES", "number_or_none", "PolicyRecord", "RECORD_VERSION", "RouteRecord", "tier_map"]
