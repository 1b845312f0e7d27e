"""Online adaptation of the active policy's knob by adaptive conformal inference, shared through Redis
(issue 13 item 6).

ACI (Gibbs & Candes, "Adaptive Conformal Inference Under Distribution Shift", NeurIPS 2021): with a
target miscoverage alpha and err_t = 1 when verdict t says the answer was unacceptable, the level
moves as ``a_{t+1} = a_t + gamma * (alpha - err_t)``; for any sequence the long-run error rate is
within ``(max(a) - min(a) + gamma) / (gamma * T)`` of alpha (their Proposition 4.1), so audited
quality returns to target after a shift.  Here ``a`` is one scale per task, ``s`` in
``[0, max_scale]``, applied to the knob of whichever policy is active (:func:`adapted_policy`):

* ``conformal_thresholds``: every delta of the task times ``s`` (s = 0: any uncertainty escalates);
* ``cascade_routing``: lambda times ``s`` (s = 0: no cost penalty, the best expected answer);
* ``posterior_threshold``: the threshold ``1 - s * (1 - t)`` (s = 0: t = 1, the top tier).

s = 1 is the calibrated policy; s = 0 is the top tier's quality end (the floor: the knob never goes
past "ask the top tier"); ``max_scale`` (default 1) bounds the other end, so adaptation never makes
a task cheaper than calibration certified.  The step ``gamma`` bounds each move.

State.  One Redis hash (``<prefix>:scale``, field = task) updated by a Lua script (atomic: two
instances applying verdicts at once both count), the way LiteLLM shares its router state
(``router_settings.redis_host`` / ``redis_port`` / ``redis_password``, or this block's own).  Every
instance reads it at most every ``refresh_s`` seconds before a decision; a Redis error keeps the
last state it read (never blocks longer than ``timeout_s``), logs a warning once, and sets
``routenlp_adaptation_redis_up`` to 0 until Redis answers again.  Every change is a durable record
(``log_path``, the decision log's fsync'd writer): task, scale before and after, and its cause (the
verdict: request id, source, acceptable).

Library: ``redis`` (redis-py, its asyncio client), the maintained client LiteLLM itself uses.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, Mapping, Optional

from . import prometheus_metrics
from .decision_log import DecisionLog

logger = logging.getLogger("litellm_routenlp")

# KEYS[1] scale hash; ARGV: task, gamma, alpha, err, max_scale, default -> {before, after}
_UPDATE = """
local before = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or ARGV[6])
local after = before + tonumber(ARGV[2]) * (tonumber(ARGV[3]) - tonumber(ARGV[4]))
if after < 0 then after = 0 end
if after > tonumber(ARGV[5]) then after = tonumber(ARGV[5]) end
redis.call('HSET', KEYS[1], ARGV[1], string.format('%.10f', after))
return {string.format('%.10f', before), string.format('%.10f', after)}
"""


def aci_step(scale: float, acceptable: bool, alpha: float, gamma: float, max_scale: float) -> float:
    """One ACI move of the scale, clipped to [0, max_scale] (the same arithmetic as the Lua script)."""
    after = scale + gamma * (alpha - (0.0 if acceptable else 1.0))
    return min(max(after, 0.0), max_scale)


class _ScaledThresholds:
    """A :class:`thresholds.Thresholds` whose deltas of one task are multiplied by ``scale``."""

    def __init__(self, base: Any, task: str, scale: float) -> None:
        self._base, self._task, self._scale = base, task, scale

    def delta(self, tier: str, task: str) -> Optional[float]:
        value = self._base.delta(tier, task)
        return value * self._scale if (value is not None and task == self._task) else value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)


def adapted_policy(policy: Any, task: str, scale: float) -> Any:
    """``policy`` with the task's knob moved to ``scale`` (module docstring); the policy itself is untouched."""
    if scale == 1.0:
        return policy
    out = copy.copy(policy)
    if getattr(policy, "thresholds", None) is not None and not hasattr(policy, "tasks"):  # conformal_thresholds
        out.thresholds = _ScaledThresholds(policy.thresholds, task, scale)
        return out
    tasks = getattr(policy, "tasks", None)
    spec = tasks.get(task) if isinstance(tasks, Mapping) else None
    if spec is None:
        return policy
    if getattr(policy, "name", "") == "posterior_threshold" and spec.threshold is not None:
        spec = replace(spec, threshold=1.0 - scale * (1.0 - spec.threshold))
    elif spec.lam is not None:
        spec = replace(spec, lam=spec.lam * scale)
    out.tasks = {**tasks, task: spec}
    return out


def task_targets(document: Mapping[str, Any], tasks: Any) -> dict[str, float]:
    """Per task, the miscoverage ACI aims at: 1 - the policy file's certified target
    (``tasks.<t>.certificate.target``), else the file's ``alpha`` (the paper rule's guarantee)."""
    out = {}
    alpha = document.get("alpha") if isinstance(document, Mapping) else None
    entries = document.get("tasks") if isinstance(document, Mapping) else None
    for task in tasks:
        entry = entries.get(task) if isinstance(entries, Mapping) else None
        certificate = entry.get("certificate") if isinstance(entry, Mapping) else None
        target = certificate.get("target") if isinstance(certificate, Mapping) else None
        if isinstance(target, (int, float)):
            out[task] = 1.0 - float(target)
        elif isinstance(alpha, (int, float)):
            out[task] = float(alpha)
    return out


class OnlineAdaptation:
    """Per-task scales in Redis, moved by verdicts, read before decisions."""

    def __init__(self, settings: Any, redis_params: Mapping[str, Any], alphas: Mapping[str, float],
                 log_path: str | os.PathLike[str]) -> None:
        import redis.asyncio as aioredis

        self.settings = settings
        self.alphas = dict(alphas)
        self.key = f"{settings.key_prefix}:scale"
        self.client = aioredis.Redis(host=redis_params["host"], port=int(redis_params["port"]),
                                     password=redis_params.get("password"), socket_timeout=settings.timeout_s,
                                     socket_connect_timeout=settings.timeout_s, decode_responses=True)
        self._update = self.client.register_script(_UPDATE)
        self.scales: dict[str, float] = {}
        self._read_at = float("-inf")
        self.redis_up: Optional[bool] = None
        self.log = DecisionLog(log_path)
        self.instance = f"{socket.gethostname()}:{os.getpid()}"

    def _redis_state(self, up: bool, error: Optional[BaseException] = None) -> None:
        if up != self.redis_up:
            if up:
                logger.info("RouteNLP: adaptation state in Redis reachable")
            else:
                logger.warning("RouteNLP: Redis unreachable (%s); serving on the last adaptation state %s",
                               type(error).__name__ if error else "?", self.scales)
        self.redis_up = up
        prometheus_metrics.observe_adaptation_redis(up)

    async def refresh(self, force: bool = False) -> dict[str, float]:
        """The scales, re-read from Redis when older than ``refresh_s``; the last ones if Redis fails."""
        now = time.monotonic()
        if not force and now - self._read_at < self.settings.refresh_s:
            return self.scales
        self._read_at = now
        try:
            raw = await self.client.hgetall(self.key)
        except Exception as error:  # redis.exceptions.*, OSError, timeouts: keep serving
            self._redis_state(False, error)
            return self.scales
        self.scales = {task: float(value) for task, value in raw.items()}
        for task, value in self.scales.items():
            prometheus_metrics.observe_adaptation_scale(task, value)
        self._redis_state(True)
        return self.scales

    async def scale(self, task: Optional[str]) -> float:
        if task is None or task not in self.alphas:
            return 1.0
        return (await self.refresh()).get(task, 1.0)

    async def policy_for(self, policy: Any, task: Optional[str]) -> Any:
        """The active policy with the task's current scale applied."""
        scale = await self.scale(task)
        return policy if task is None else adapted_policy(policy, task, scale)

    async def observe(self, verdict: Any) -> Optional[dict[str, Any]]:
        """Move the verdict's task scale one ACI step (atomically in Redis) and log the change with its
        cause.  Returns the change record; None when the task is not adapted or Redis is down (the
        verdict itself is stored either way; this instance keeps its last state)."""
        task = verdict.task
        if task not in self.alphas:
            return None
        err = 0.0 if verdict.acceptable else 1.0
        try:
            before, after = await self._update(keys=[self.key], args=[
                task, self.settings.step, self.alphas[task], err, self.settings.max_scale, 1.0])
        except Exception as error:
            self._redis_state(False, error)
            return None
        self._redis_state(True)
        before, after = float(before), float(after)
        self.scales[task] = after
        prometheus_metrics.observe_adaptation_scale(task, after)
        record = {"kind": "adaptation", "ts": datetime.now(timezone.utc).isoformat(), "task": task,
                  "scale_before": before, "scale_after": after, "alpha": self.alphas[task],
                  "step": self.settings.step, "instance": self.instance,
                  "cause": {"verdict_request_id": verdict.request_id, "source": verdict.source,
                            "acceptable": verdict.acceptable}}
        await self.log.append_async(record)
        return record

    async def close(self) -> None:
        await self.client.aclose()
        self.log.close()


def redis_params(settings: Any, document: Mapping[str, Any]) -> dict[str, Any]:
    """Redis of the adaptation block, else LiteLLM's ``router_settings.redis_host/port/password``
    (``os.environ/NAME`` values resolved the way LiteLLM resolves them)."""
    router = document.get("router_settings") or {}

    def resolve(value: Any) -> Any:
        if isinstance(value, str) and value.startswith("os.environ/"):
            return os.environ.get(value.split("/", 1)[1])
        return value

    host = settings.redis_host or resolve(router.get("redis_host"))
    port = settings.redis_port or resolve(router.get("redis_port")) or 6379
    password = settings.redis_password or resolve(router.get("redis_password"))
    return {"host": host, "port": port, "password": password}


def build(settings: Any, document: Mapping[str, Any], serving: bool = True) -> Optional[OnlineAdaptation]:
    """The proxy's adaptation from ``routenlp_settings.adaptation`` (None when unset); ValueError naming
    the setting when it cannot work (no Redis configured, no target for any task, and when ``serving``
    no policy file: without one there is no knob to move)."""
    block = settings.adaptation
    if block is None:
        return None
    if serving and settings.thresholds_path is None:
        raise ValueError("routenlp_settings.adaptation needs routenlp_settings.thresholds_path: the policy file "
                         "whose knob it moves")
    params = redis_params(block, document)
    if not params["host"]:
        raise ValueError("routenlp_settings.adaptation: no Redis: set adaptation.redis_host or "
                         "router_settings.redis_host")
    policy_document: Mapping[str, Any] = {}
    if settings.thresholds_path is not None:
        from .policy import read_policy_document

        policy_document = read_policy_document(settings.thresholds_path)
    alphas = {**task_targets(policy_document, settings.tasks), **block.target_miscoverage}
    unknown = sorted(set(block.target_miscoverage) - set(settings.tasks))
    if unknown:
        raise ValueError(f"routenlp_settings.adaptation.target_miscoverage: tasks {unknown} are not configured")
    if not alphas:
        raise ValueError("routenlp_settings.adaptation: no task has a target (the policy file certifies none); "
                         "set adaptation.target_miscoverage")
    return OnlineAdaptation(block, params, alphas, block.log_path)
