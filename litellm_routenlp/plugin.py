"""The RouteNLP callback inside the LiteLLM proxy: task -> route -> answer -> uncertainty -> escalate -> log.

Hook order for a request to the alias (``routenlp`` by default):

1. ``async_pre_call_hook`` (proxy only): resolve the task from the request metadata, reject bad input
   with a 400, run the difficulty router, force ``logprobs`` so the cascade can measure uncertainty.
2. ``async_filter_deployments`` (proxy and ``litellm.Router``): keep only the deployments of the
   cheapest healthy tier predicted to meet the task's threshold (cooldown has already removed unhealthy
   ones).  Escalation calls carry their target tier and are pinned to it.
3. ``async_post_call_success_hook``: u = mean(1 - p(token)); while u > delta[tier][task] re-ask the next
   tier through ``llm_router.acompletion``; the client receives the last answer.
4. ``async_post_call_response_headers_hook``: ``x-routenlp-*`` headers.  For streaming requests this is
   where the tier's stream is buffered (policy ``buffer``) and the cascade runs, because headers must be
   known before the first byte; ``async_post_call_streaming_iterator_hook`` then replays the answer.
5. One durable decision record per request (``DecisionLog``), written before the answer is returned.

Nothing the client sends is read back as plugin state.  At the door (``async_pre_call_hook``) every
``routenlp*`` metadata key and ``routenlp-*`` tag the client sent is removed (:func:`strip_client_plugin_fields`).
The plugin's own per-request state is a Python object (``request_state.RequestState``), which no
JSON body can make.  The tier pin of its escalation calls (and the shadow audit's marker) carries a
seal, an HMAC with a secret drawn once per process (``secrets.token_bytes``), over the plugin's
request id (a fresh uuid4) and the tier: a body cannot produce a valid seal, so a client-set
``routenlp_escalation_tier`` (or a forged state) is ignored even on a path that skipped the door.
The record's ``request_id`` is that uuid4; the client's ``x-litellm-call-id`` is kept apart as
``client_call_id``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
import uuid
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncGenerator, Optional, Sequence

from litellm.integrations.custom_logger import CustomLogger
from routenlp_core.decision_record import DecisionRecord, PolicyRecord, RouteRecord, tier_map

from .cascade import Attempt, CascadeResult, TierAnswer, run_cascade
from .config import RouteNLPSettings, SettingsError, load_settings
from .decision_log import DecisionLog
from . import online_adaptation
from . import latency_budget
from . import prometheus_metrics
from .pricing import call_cost
from .request_fields import (RequestError, forwarded_params, query_text, resolve_task, strip_client_plugin_fields,
                             validate_request, write_back_task)
from .router_model import RouterArtifactError
from .routers import Router, RouterSettingError, build_router
from .policy import ConformalThresholds, PolicyError, StartState, check_fitted_under, policy_from_document, \
    read_policy_document, router_sha256
from .request_state import STATE_KEY, RequestState, state_of
from .router_process import RouterProcess
from .routing import RoutingDecision, healthy_fallback
from .shadow_audit import AuditBudget, ShadowAudit
from .spend_tags import call_metadata, tag_audit_call, tag_routed_call, task_label
from .streaming import chunks_from_response, collect_stream
from .thresholds import Thresholds, ThresholdsError
from .uncertainty import response_margin, response_uncertainty
from .verdicts import VerdictError, VerdictRecord, VerdictStore

logger = logging.getLogger("litellm_routenlp")

ESCALATION_KEY = "routenlp_escalation_tier"  # pins an escalation call to one tier (sealed marker)
REQUEST_ID_KEY = "routenlp_request_id"      # the plugin's id of a request, in its spend_logs_metadata
PARENT_REQUEST_KEY = "routenlp_parent_request_id"  # on an escalation call: the plugin id of its request
AUDIT_KEY = "routenlp_audit"                # marks a shadow-audit call (sealed); shadow_audit.py
# Only these parent metadata keys travel with an escalation call (never auth objects or budgets).
ESCALATION_METADATA_WHITELIST = ("user_api_key", "user_api_key_alias", "user_api_key_hash",
                                 "user_api_key_team_id", "user_api_key_user_id", "user_api_key_org_id",
                                 "user_api_key_end_user_id", "requester_metadata", "tags", "task")


class TierTable:
    """Tier numbers of the alias's deployments, read from ``model_info.routenlp_tier``."""

    def __init__(self, model_list: Sequence[dict[str, Any]], alias: str, source: str) -> None:
        self.alias = alias
        self.tasks_by_tier: dict[int, Optional[set[str]]] = {}
        for index, deployment in enumerate(model_list or []):
            if not isinstance(deployment, dict) or deployment.get("model_name") != alias:
                continue
            info = deployment.get("model_info") or {}
            tier = info.get("routenlp_tier")
            where = f"{source}: model_list[{index}].model_info.routenlp_tier"
            if not isinstance(tier, int) or isinstance(tier, bool) or tier < 1:
                raise SettingsError(f"{where}: every `{alias}` deployment needs an integer tier >= 1, got {tier!r}")
            tasks = info.get("routenlp_tasks")
            if tasks is not None and not (isinstance(tasks, list) and all(isinstance(t, str) for t in tasks)):
                raise SettingsError(f"{source}: model_list[{index}].model_info.routenlp_tasks must be a list of task names")
            previous = self.tasks_by_tier.get(tier)
            merged = None if (tasks is None or (tier in self.tasks_by_tier and previous is None)) else \
                set(tasks) | (previous or set())
            self.tasks_by_tier[tier] = merged
        if not self.tasks_by_tier:
            raise SettingsError(f"{source}: model_list has no deployment named `{alias}` (routenlp_settings.model_alias)")
        tiers = sorted(self.tasks_by_tier)
        if tiers != list(range(1, len(tiers) + 1)):
            raise SettingsError(f"{source}: `{alias}` tiers must be numbered 1..K without gaps, got {tiers}")
        self.count = len(tiers)

    def eligible(self, tier: int, task: Optional[str]) -> bool:
        tasks = self.tasks_by_tier.get(tier)
        return tasks is None or (task is not None and task in tasks)

    @staticmethod
    def tier_of(deployment: dict[str, Any]) -> Optional[int]:
        tier = (deployment.get("model_info") or {}).get("routenlp_tier")
        return tier if isinstance(tier, int) else None


class RouteNLPCallback(CustomLogger):
    """LiteLLM callback that routes requests for ``settings.model_alias`` across cost tiers."""

    def __init__(self, settings: RouteNLPSettings, tier_table: TierTable, router: Optional[Router],
                 thresholds: Optional[Thresholds], decision_log: DecisionLog,
                 llm_router: Any = None, policy: Any = None) -> None:
        super().__init__()
        self.settings = settings
        self.tiers = tier_table
        self.router = router
        self.thresholds = thresholds
        # the one decision policy (litellm_routenlp.policy): start tier and every escalation
        if policy is None:  # no policy file: the paper's rule over whatever thresholds were given
            policy = ConformalThresholds(thresholds, route_confidence=settings.route_confidence,
                                         max_hops=settings.max_hops, no_logprobs_policy=settings.no_logprobs_policy)
        self.policy = policy
        self.decision_log = decision_log
        self._llm_router = llm_router  # set for SDK use; the proxy's router is looked up lazily
        self._router_offload = router is not None and router.blocking
        # router_execution: process (router_process.py); set by from_config, which knows the config path
        self.router_process: Optional[RouterProcess] = None
        self.tier_names = {k: (router.tiers[k - 1] if router else f"T{k}") for k in range(1, tier_table.count + 1)}
        self._secret = secrets.token_bytes(32)  # seals escalation pins and audit markers; never leaves the process
        # SLA-aware routing (latency_budget.py): None when no task declares latency_budget_ms
        self.sla = latency_budget.SlaGuard.from_settings(settings)
        # quality feedback (issue 13 item 4): verdict records joined to the decision log, shadow audit
        self.verdicts = VerdictStore(settings.verdicts_path, settings.decision_log_path)
        self.audit = ShadowAudit(AuditBudget(settings.shadow_audit.fraction, settings.shadow_audit.max_per_hour),
                                 self._ask_top_for_audit, self._store_audit_verdict)
        self.adaptation: Optional[online_adaptation.OnlineAdaptation] = None  # set by from_config

    # ------------------------------------------------------------------ seals
    def _seal(self, *parts: Any) -> str:
        message = "|".join(str(part) for part in parts).encode("utf-8", "surrogatepass")
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def _sealed(self, value: Any, *parts: Any) -> bool:
        return isinstance(value, str) and hmac.compare_digest(value, self._seal(*parts))

    def _new_state(self, decision: RoutingDecision, data: dict, **extra: Any) -> RequestState:
        return RequestState(decision=decision, client_call_id=data.get("litellm_call_id"), **extra)

    def _pinned_tier(self, metadata: dict[str, Any]) -> Optional[int]:
        """The tier of one of the plugin's own escalation calls; None for anything else."""
        marker = metadata.get(ESCALATION_KEY)
        if not isinstance(marker, dict):
            return None
        tier, parent = marker.get("tier"), marker.get("request_id")
        if isinstance(tier, int) and not isinstance(tier, bool) and \
                self._sealed(marker.get("seal"), "escalation", parent, tier):
            return tier
        return None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config_path: str | Path, llm_router: Any = None) -> "RouteNLPCallback":
        """Load and validate settings, router artifact, thresholds and decision log; raise SettingsError."""
        settings, document = load_settings(config_path)
        source = str(Path(config_path).resolve())
        tier_table = TierTable(document.get("model_list") or [], settings.model_alias, source)
        router: Optional[Router] = None
        try:
            router = build_router(settings)  # routenlp_settings.router.kind (routers.py registry)
        except RouterSettingError as error:  # a configuration error, whatever fail_open says
            raise SettingsError(str(error)) from None
        except RouterArtifactError as error:
            if not settings.fail_open:
                raise SettingsError(f"routenlp_settings.router_artifact: {error}") from None
            logger.warning("RouteNLP: router artifact unusable (%s); fail_open=true, routing EVERYTHING to "
                           "the top tier", error)
        if router is not None and len(router.tiers) != tier_table.count:
            raise SettingsError(
                f"routenlp_settings.router_artifact: the router predicts {len(router.tiers)} tiers "
                f"({router.tiers}) but `{settings.model_alias}` has {tier_table.count} in model_list")
        thresholds, policy = None, None
        if settings.thresholds_path is not None:
            try:
                thresholds, policy = load_serving_policy(settings, router)
            except (ThresholdsError, PolicyError) as error:
                if not settings.fail_open:
                    raise SettingsError(f"routenlp_settings.thresholds_path: {error}") from None
                # without a trustworthy policy the cheap tiers' answers cannot be checked: top tier only
                logger.warning("RouteNLP: policy file unusable (%s); fail_open=true, routing EVERYTHING to "
                               "the top tier", error)
                router = None
        if router is not None:
            unknown = sorted(set(settings.tasks) - set(router.tasks))
            if unknown:
                logger.warning("RouteNLP: tasks %s are not known to the router; they use its task-agnostic "
                               "embedding", unknown)
        prometheus_metrics.start_metrics_server(settings.metrics_port, settings.metrics_host)
        decision_log = DecisionLog(settings.decision_log_path, durability=settings.decision_log_durability)
        callback = cls(settings, tier_table, router, thresholds, decision_log, llm_router=llm_router, policy=policy)
        if router is not None and settings.router_execution == "process":
            callback.router_process = RouterProcess(config_path, tiers=tier_table.count)
        try:
            callback.adaptation = online_adaptation.build(settings, document)
        except ValueError as error:
            raise SettingsError(str(error)) from None
        return callback

    # ------------------------------------------------------------------ helpers
    @property
    def llm_router(self) -> Any:
        if self._llm_router is not None:
            return self._llm_router
        from litellm.proxy import proxy_server

        return proxy_server.llm_router

    def _is_ours(self, model: Any) -> bool:
        return model == self.settings.model_alias

    def decide(self, messages: Any, metadata: dict[str, Any]) -> RoutingDecision:
        """Resolve the task and run the router here (no health information yet)."""
        task, status, text = self._router_query(messages, metadata)
        started = time.perf_counter()
        estimates = None if text is None else self._predict_here(text, task)
        return self._decision(task, status, estimates, started)

    async def decide_async(self, messages: Any, metadata: dict[str, Any]) -> RoutingDecision:
        """:meth:`decide` as the pre-call hook runs it: in the router process when there is one (the
        router here answers whenever it cannot), in a worker thread for a blocking router, else inline."""
        if self.router_process is None:
            if self._router_offload:
                # a transformer encoder takes milliseconds and ONNX Runtime releases the GIL: off the
                # event loop, the router overlaps other requests
                return await asyncio.to_thread(self.decide, messages, metadata)
            return self.decide(messages, metadata)  # a static encoder's lookup costs less than a thread hop
        task, status, text = self._router_query(messages, metadata)
        started = time.perf_counter()
        estimates = None if text is None else await self.router_process.predict(text, task or "")
        if estimates is None and text is not None:  # the process could not answer: the router here does
            estimates = (await asyncio.to_thread(self._predict_here, text, task) if self._router_offload
                         else self._predict_here(text, task))
        return self._decision(task, status, estimates, started)

    def _router_query(self, messages: Any, metadata: dict[str, Any]) -> tuple[Optional[str], str, Optional[str]]:
        """(task, task status, the text the router reads or None when the router is not asked).

        The text is cut at the router's ``max_chars`` (the same cut its encoder makes), so a 5 MB prompt
        costs what a 4 KB one does here and no 5 MB string goes further."""
        task, status = resolve_task(metadata, self.settings)
        if self.router is None or (status != "known" and self.settings.unknown_task_policy == "top_tier"):
            return task, status, None
        text = query_text(messages)
        cut = self.router.max_chars
        return task, status, text if cut is None else text[:cut]

    def _predict_here(self, text: str, task: Optional[str]) -> tuple[list[float], Optional[list[float]]]:
        assert self.router is not None
        estimates = self.router.predict([text], [task or ""])  # one head run, both outputs
        acceptance = None if estimates.acceptance is None else [float(p) for p in estimates.acceptance[0]]
        return [float(p) for p in estimates.route[0]], acceptance

    def _decision(self, task: Optional[str], status: str, estimates: Optional[tuple[list[float], Optional[list[float]]]],
                  started: float) -> RoutingDecision:
        if estimates is None:  # no router, or an unknown task sent to the top tier
            probabilities, acceptance = [0.0] * (self.tiers.count - 1) + [1.0], None
        else:
            probabilities, acceptance = estimates
        return RoutingDecision(task=task, task_status=status, probabilities=probabilities, acceptance=acceptance,
                               router_ms=(time.perf_counter() - started) * 1000.0)

    @staticmethod
    def _state(data: Optional[dict]) -> Optional[RequestState]:
        """This request's state (request_state.py), if the plugin made it; else None."""
        if not isinstance(data, dict):
            return None
        for holder in ("metadata", "litellm_metadata"):
            state = state_of(data.get(holder))
            if state is not None:
                return state
        return None

    async def _healthy_tiers(self, task: Optional[str]) -> list[int]:
        """Tiers with at least one deployment not in cooldown, eligible for the task."""
        router = self.llm_router
        deployments = router.get_model_list(model_name=self.settings.model_alias) or []
        cooling: set[str] = set()
        try:
            from litellm.router_utils.cooldown_handlers import async_get_cooldown_deployments

            cooling = set(await async_get_cooldown_deployments(router, parent_otel_span=None))
        except Exception as error:  # cooldown lookup is best-effort; a dead tier then fails on call
            logger.debug("RouteNLP: cooldown lookup failed: %s", error)
        tiers = set()
        for deployment in deployments:
            tier = TierTable.tier_of(deployment)
            model_id = (deployment.get("model_info") or {}).get("id")
            if tier is not None and model_id not in cooling and self.tiers.eligible(tier, task):
                tiers.add(tier)
        return sorted(tiers)

    # ------------------------------------------------------------------ 1. pre-call (proxy)
    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict, call_type: Any) -> Any:
        if not isinstance(data, dict):
            return data
        # every request, whatever its model: a routenlp* key or routenlp-* tag is the plugin's to write
        removed = strip_client_plugin_fields(data)
        if removed:
            logger.info("RouteNLP: dropped client-sent plugin fields %s", removed[:10])
        if not self._is_ours(data.get("model")):
            return data
        try:
            validate_request(data)
            metadata = data.setdefault("metadata", {})
            decision = await self.decide_async(data.get("messages"), metadata)
        except RequestError as error:
            from litellm.proxy._types import ProxyException

            # ProxyException maps 1:1 to the OpenAI error body, `param` included
            raise ProxyException(message=str(error), type="invalid_request_error", param=error.param, code=400)
        if decision.task_status == "known" and decision.task:
            write_back_task(data, decision.task)  # the tiers read the one normalised name
        state = self._new_state(decision, data, client_logprobs=data.get("logprobs") is True,
                                budget_remaining_usd=remaining_budget(user_api_key_dict))
        metadata[STATE_KEY] = state
        spend = metadata.get("spend_logs_metadata")
        metadata["spend_logs_metadata"] = {**(spend if isinstance(spend, dict) else {}),
                                           REQUEST_ID_KEY: state.request_id}
        data["logprobs"] = True
        return data

    # ------------------------------------------------------------------ 2. filter deployments
    async def async_filter_deployments(self, model: str, healthy_deployments: list, messages: Any,
                                       request_kwargs: Optional[dict] = None, parent_otel_span: Any = None) -> list:
        if not self._is_ours(model) or not healthy_deployments:
            return healthy_deployments
        kwargs = request_kwargs or {}
        metadata = kwargs.get("metadata")
        if not isinstance(metadata, dict):
            metadata = kwargs.get("litellm_metadata") if isinstance(kwargs.get("litellm_metadata"), dict) else {}
        # A retry of this request must not land on a deployment that already failed it: LiteLLM retries
        # 5xx on the same deployment until cooldown kicks in, which an outage of one tier makes certain.
        failed = failed_deployment_ids(metadata)
        if failed:
            healthy_deployments = [d for d in healthy_deployments
                                   if (d.get("model_info") or {}).get("id") not in failed]
        pinned = self._pinned_tier(metadata)
        if pinned is not None:
            return [d for d in healthy_deployments if TierTable.tier_of(d) == pinned]
        state = state_of(metadata)
        if state is not None:
            decision = state.decision
        else:  # litellm.Router used directly (no proxy pre-call hook): whatever state it carries is not ours
            decision = await self.decide_async(messages, metadata)
            state = self._new_state(decision, kwargs)
            metadata[STATE_KEY] = state
        by_tier: dict[int, list] = {}
        for deployment in healthy_deployments:
            tier = TierTable.tier_of(deployment)
            if tier is not None and self.tiers.eligible(tier, decision.task):
                by_tier.setdefault(tier, []).append(deployment)
        if not by_tier:
            return healthy_deployments if decision.task is None else []
        configured = [t for t in range(1, self.tiers.count + 1) if self.tiers.eligible(t, decision.task)]
        start = (await self._policy_for(decision)).start(StartState(
            task=decision.task if decision.task_status == "known" else None, available_tiers=tuple(configured),
            route_probabilities=tuple(decision.probabilities),
            acceptance=None if decision.acceptance is None else tuple(decision.acceptance)))
        wanted, reason = start.tier, start.reason
        decision.start_estimates = None if start.estimates is None else [round(v, 6) for v in start.estimates]
        decision.lam = start.lam
        decision.threshold = start.threshold
        tier = healthy_fallback(wanted, list(by_tier), self._fallback_direction(decision))
        if tier != wanted:
            reason += f"; T{wanted} unavailable, served by T{tier}"
        budget = self.sla.budget(decision.task if decision.task_status == "known" else None) if self.sla else None
        if budget is not None:  # the task's latency budget vetoes a start tier expected to break it
            healthy_tier = tier
            tier, note = latency_budget.choose_start(budget, self.sla.latencies, tier, sorted(by_tier))
            state.sla = [note]
            if tier != healthy_tier:
                reason += f"; latency budget {latency_budget.budget_text(note)}: T{tier} instead of T{healthy_tier}"
        decision.tier, decision.wanted_tier, decision.reason = tier, wanted, reason
        decision.healthy_tiers = sorted(by_tier)
        return by_tier[tier]

    async def async_pre_call_deployment_hook(self, kwargs: dict, call_type: Any) -> Optional[dict]:
        """Spend tags of the call about to be made: after deployment choice and LiteLLM's tag routing."""
        metadata = call_metadata(kwargs, self.settings.model_alias)
        audit = metadata.get(AUDIT_KEY) if metadata is not None else None
        if isinstance(audit, dict) and self._sealed(audit.get("seal"), "audit", audit.get("request_id")):
            tag_audit_call(metadata, self.tier_names, str(audit.get("task") or "unknown"))
        elif metadata is not None:
            state = state_of(metadata)
            tag_routed_call(metadata, state.decision if state else None, self._pinned_tier(metadata) is not None,
                            self.tier_names, self.settings)
        return None

    def _task_label(self, decision: RoutingDecision) -> str:
        return task_label(decision.task, decision.task_status, self.settings.tasks)

    def _fallback_direction(self, decision: RoutingDecision) -> str:
        """Outage policy: structured tasks fall back down (T1 + cascade), generation goes up."""
        task_settings = self.settings.tasks.get(decision.task or "")
        return "down" if task_settings is not None and task_settings.kind == "structured" else "up"

    # ------------------------------------------------------------------ 3. cascade
    def _deployment_part(self, model_id: str, part: str) -> dict[str, Any]:
        """``model_info`` or ``litellm_params`` of a deployment, as a plain dict ({} if unknown); read only.

        LiteLLM's ``get_deployment`` builds a pydantic ``Deployment`` from its model-list entry on every
        call (and the part was then dumped back to a dict): twice per answer, that showed in the
        proxy's profile.  The entry itself is read through LiteLLM's id index when it is a dict."""
        router = self.llm_router
        try:
            index = getattr(router, "model_id_to_deployment_index_map", None) or {}
            entry = router.model_list[index[model_id]] if model_id in index else None
            deployment = entry if isinstance(entry, dict) else router.get_deployment(model_id=model_id)
        except Exception:
            return {}
        if deployment is None:
            return {}
        value = getattr(deployment, part, None) if not isinstance(deployment, dict) else deployment.get(part)
        if value is None:
            return {}
        if isinstance(value, dict):
            return value
        return value.model_dump() if hasattr(value, "model_dump") else dict(value)

    def _litellm_params(self, model_id: str) -> dict[str, Any]:
        return self._deployment_part(model_id, "litellm_params")

    def _tier_of_response(self, response: Any) -> tuple[Optional[int], Optional[str]]:
        hidden = getattr(response, "_hidden_params", None) or {}
        model_id = hidden.get("model_id")
        if model_id is None:
            return None, None
        tier = self._deployment_part(model_id, "model_info").get("routenlp_tier")
        return (tier if isinstance(tier, int) else None), model_id

    def _cost_of(self, response: Any, model_id: Optional[str], usage: Any = None) -> float:
        """LiteLLM's price of the call, or (stream: it says 0.0) the price of its usage."""
        hidden = getattr(response, "_hidden_params", None) or {}
        usage = usage if usage is not None else getattr(response, "usage", None)
        params = self._litellm_params(model_id) if model_id is not None else {}
        return call_cost(hidden.get("response_cost"), usage, params)

    def _answer(self, response: Any, latency_ms: float, fallback_tier: Optional[int],
                usage: Any = None) -> TierAnswer:
        tier, model_id = self._tier_of_response(response)
        return TierAnswer(tier=tier or fallback_tier or self.tiers.count, response=response,
                          uncertainty=response_uncertainty(response), cost_usd=self._cost_of(response, model_id, usage),
                          latency_ms=latency_ms, model_id=model_id, margin=response_margin(response),
                          text=answer_text(response))

    async def _escalate(self, data: dict, state: RequestState, tier: int, previous: TierAnswer) -> TierAnswer:
        """Re-ask the same question at ``tier`` through the proxy's router, linked to the parent call."""
        parent = data.get("metadata") or {}
        metadata = {key: parent[key] for key in ESCALATION_METADATA_WHITELIST if key in parent}
        request_id = state.request_id
        metadata[ESCALATION_KEY] = {"tier": tier, "request_id": request_id,
                                    "seal": self._seal("escalation", request_id, tier)}
        # the call id of this escalation is chosen here and listed in the decision record: coopt.logs
        # trusts a spend row's parent link only when the record lists the row's call id
        call_id = str(uuid.uuid4())
        state.escalation_call_ids[tier] = call_id
        inherited = parent.get("spend_logs_metadata")
        metadata["spend_logs_metadata"] = {
            **{k: v for k, v in (inherited if isinstance(inherited, dict) else {}).items()
               if not str(k).startswith("routenlp")},
            "routenlp_parent_call_id": data.get("litellm_call_id"),
            PARENT_REQUEST_KEY: request_id,
            "routenlp_tier": self.tier_names.get(tier, f"T{tier}"),
            "routenlp_previous_uncertainty": previous.uncertainty,
        }
        started = time.perf_counter()
        response = await self.llm_router.acompletion(
            model=self.settings.model_alias, messages=data["messages"], metadata=metadata,
            litellm_call_id=call_id, **forwarded_params(data), logprobs=True, stream=False)
        return self._answer(response, (time.perf_counter() - started) * 1000.0, tier)

    async def _cascade(self, data: dict, state: RequestState, first: TierAnswer) -> CascadeResult:
        decision = state.decision
        remaining = state.budget_remaining_usd
        policy = await self._policy_for(decision)
        budget = self.sla.budget(decision.task if decision.task_status == "known" else None) if self.sla else None
        notes: list[latency_budget.SlaNote] = []
        if budget is not None:  # each escalation is checked against the time the request has taken
            policy = latency_budget.BudgetedSteps(self.policy, budget, self.sla.latencies,
                                                  started=state.started, notes=notes)
        result = await run_cascade(
            first=first, task=decision.task if decision.task_status == "known" else None,
            thresholds=self.thresholds, tier_names=self.tier_names,
            available_tiers=lambda: self._healthy_tiers(decision.task),
            ask=lambda tier: self._escalate(data, state, tier, first),
            max_hops=self.settings.max_hops, no_logprobs_policy=self.settings.no_logprobs_policy,
            budget_usd=remaining, policy=policy, acceptance=decision.acceptance)
        state.sla.extend(notes)
        return result

    async def _finish(self, data: dict, state: RequestState, result: CascadeResult, streamed: bool,
                      cost_known: bool = True) -> None:
        """Remember the outcome for the headers hook and write the durable decision record.

        The record is on disk (fsync'd by the log's writer process) before the answer leaves, or, with
        ``decision_log_durability: handed_off``, in that process's pipe (decision_log.py says what that
        gives up); the event loop keeps serving other requests meanwhile.  Every string field is capped by
        the log (``decision_log.FIELD_LIMIT``, with a cut marker)."""
        decision = state.decision
        logging_off = _message_logging_off(data)
        if logging_off:  # provider errors may quote the prompt: keep only the exception type
            result.attempts = [replace(attempt, error=redact_error(attempt.error)) for attempt in result.attempts]
            result.escalation_error = redact_error(result.escalation_error)
        state.result = {
            "final_tier": result.final.tier,
            "path": result.path,
            "uncertainties": [a.uncertainty for a in result.attempts if a.error is None],
            "total_cost_usd": result.total_cost_usd if cost_known else None,
            "escalation_error": result.escalation_error,
            "escalation_skipped": result.escalation_skipped,
        }
        # each tier's call id: the links coopt.logs trusts
        attempts = tuple(replace(attempt, call_id=state.client_call_id if index == 0
                                 else state.escalation_call_ids.get(attempt.tier))
                         for index, attempt in enumerate(result.attempts))
        names = self.tier_names
        record = DecisionRecord(
            request_id=state.request_id,
            client_call_id=state.client_call_id,
            ts=datetime.now(timezone.utc).isoformat(),
            outcome="answered",
            task=decision.task,
            task_status=decision.task_status,
            router=RouteRecord(
                probabilities=tier_map(names, decision.probabilities),
                routed_tier=names.get(decision.tier or 0),
                wanted_tier=names.get(decision.wanted_tier or 0),
                reason=decision.reason,
                healthy_tiers=tuple(names.get(t) for t in decision.healthy_tiers),
                router_ms=decision.router_ms,
                acceptance=tier_map(names, decision.acceptance)),
            policy=PolicyRecord(name=self.policy.name, lam=decision.lam, threshold=decision.threshold,
                                start_estimates=decision.start_estimates, stop_reason=result.stop_reason),
            attempts=attempts,
            final_tier=names.get(result.final.tier),
            total_cost_usd=result.total_cost_usd,
            total_latency_ms=(time.time() - state.started) * 1000.0,
            escalation_error=result.escalation_error,
            escalation_skipped=result.escalation_skipped,
            stream=streamed,
            key_alias=(data.get("metadata") or {}).get("user_api_key_alias"),
            prompt=None if logging_off else query_text(data.get("messages")),
            # budget, expected latency, forced, chosen_instead_of (latency_budget.summarise)
            extra={"sla": latency_budget.summarise(state.sla)} if state.sla else {},
        )
        await self.decision_log.append_async(record)
        state.recorded = True
        prometheus_metrics.observe_answer(self._task_label(decision), decision, state.result, self.tier_names,
                                          router_available=self.router is not None)
        task = decision.task if decision.task_status == "known" else None
        if task in self.settings.tasks and self.tiers.eligible(self.tiers.count, task):
            self.audit.maybe_audit(data, state, result.final.text, result.final.tier, self.tiers.count, task,
                                   self.settings.tasks[task].tau, self.tier_names[self.tiers.count])

    # ------------------------------------------------------------------ quality feedback (verdicts.py)
    async def _ask_top_for_audit(self, data: dict, state: RequestState) -> TierAnswer:
        """The shadow audit's call: the top tier, none of the client's key metadata, tagged routenlp-audit
        (shadow_audit.py says why it is never the client's spend or an escalation)."""
        top, request_id = self.tiers.count, state.request_id
        task = self._task_label(state.decision)
        metadata = {ESCALATION_KEY: {"tier": top, "request_id": request_id,
                                     "seal": self._seal("escalation", request_id, top)},
                    AUDIT_KEY: {"request_id": request_id, "task": task, "seal": self._seal("audit", request_id)},
                    "spend_logs_metadata": {"routenlp_audit_of": request_id}}
        if task != "unknown":
            metadata["task"] = task
        started = time.perf_counter()
        response = await self.llm_router.acompletion(
            model=self.settings.model_alias, messages=data["messages"], metadata=metadata,
            **forwarded_params(data), logprobs=True, stream=False)
        return self._answer(response, (time.perf_counter() - started) * 1000.0, top)

    async def _store_audit_verdict(self, request_id: str, acceptable: bool, **audit: Any) -> VerdictRecord:
        # the join reads the decision log's new lines: off the event loop
        record = await asyncio.to_thread(self.verdicts.prepare, request_id, acceptable, "audit", **audit)
        return await self.store_verdict(record)

    def prepare_client_verdict(self, item: Any, where: str) -> VerdictRecord:
        """A client's ``{request_id, acceptable, note?}``, checked and joined (VerdictError otherwise)."""
        if not isinstance(item, dict):
            raise VerdictError(f"{where}: expected an object {{request_id, acceptable, note?}}")
        unknown = sorted(set(item) - {"request_id", "acceptable", "note"})
        if unknown:
            raise VerdictError(f"{where}: unknown field(s) {unknown}; a verdict has request_id, acceptable, note")
        return self.verdicts.prepare(item.get("request_id"), item.get("acceptable"), "client", item.get("note"),
                                     where=where)

    async def store_verdict(self, record: VerdictRecord) -> VerdictRecord:
        """Durably store one verdict (fsync'd) and count it."""
        stored = await self.verdicts.store_async(record, self.settings.tasks)
        if self.adaptation is not None:  # ACI moves the task's knob (online_adaptation.py)
            await self.adaptation.observe(stored)
        return stored

    async def _policy_for(self, decision: RoutingDecision) -> Any:
        """The active policy, with the task's online-adapted knob when adaptation is on."""
        if self.adaptation is None or decision.task_status != "known":
            return self.policy
        return await self.adaptation.policy_for(self.policy, decision.task)

    async def async_post_call_success_hook(self, data: dict, user_api_key_dict: Any, response: Any) -> Any:
        state = self._state(data)
        if state is None or not self._is_ours(data.get("model")) or data.get("stream"):
            return None
        latency = (time.time() - state.started) * 1000.0
        first = self._answer(response, latency, state.decision.tier)
        result = await self._cascade(data, state, first)
        await self._finish(data, state, result, streamed=False)
        final = result.final.response
        if not state.client_logprobs:
            for choice in getattr(final, "choices", None) or []:
                if hasattr(choice, "logprobs"):
                    choice.logprobs = None
        return final

    # ------------------------------------------------------------------ 4. headers (+ buffered streaming)
    async def async_post_call_response_headers_hook(self, data: dict, user_api_key_dict: Any, response: Any,
                                                    request_headers: Optional[dict] = None,
                                                    litellm_call_info: Optional[dict] = None) -> Optional[dict]:
        state = self._state(data)
        if state is None or not self._is_ours(data.get("model")) or response is None:
            return None
        if data.get("stream") and state.result is None:
            await self._buffer_stream(data, state, response)
        outcome = state.result
        if not outcome:
            return None
        try:
            return self._headers(state, outcome)
        except Exception:  # a header must never turn an answered (and recorded) request into a 500
            logger.exception("RouteNLP: building response headers failed")
            return {"x-routenlp-request-id": state.request_id}

    def _headers(self, state: RequestState, outcome: dict) -> dict[str, str]:
        """``x-routenlp-*`` headers; every value is printable latin-1 (:func:`header_value`)."""
        decision = state.decision
        names = [self.tier_names.get(t, f"T{t}") for t in outcome["path"]]
        # only a configured task name goes into a header (config.py checks they are header-safe)
        task = decision.task if decision.task_status == "known" else None
        headers = {
            "x-routenlp-request-id": state.request_id,
            "x-routenlp-tier": self.tier_names.get(outcome["final_tier"], str(outcome["final_tier"])),
            "x-routenlp-path": ",".join(names),
            "x-routenlp-uncertainty": ",".join("-" if u is None else f"{u:.4f}" for u in outcome["uncertainties"]),
            "x-routenlp-task": task if task in self.settings.tasks else "-",
        }
        if outcome.get("total_cost_usd") is not None:  # a passthrough stream's cost is known at its end
            headers["x-routenlp-total-cost"] = f"{outcome['total_cost_usd']:.8f}"
        wanted, served = decision.wanted_tier, decision.tier
        notes = state.sla
        sla = latency_budget.header_text(notes, self.tier_names)
        if sla:
            headers["x-routenlp-sla"] = sla
        # degraded means health moved the start; a move by the budget alone is x-routenlp-sla's to say
        healthy = notes[0].chosen_instead_of if notes and notes[0].stage == "start" and notes[0].chosen_instead_of \
            else served
        if wanted and served and wanted != healthy:
            headers["x-routenlp-degraded"] = (f"{self.tier_names.get(wanted, wanted)} unavailable; "
                                              f"served by {self.tier_names.get(served, served)}")
        if outcome.get("escalation_skipped"):
            headers["x-routenlp-escalation"] = f"skipped: {outcome['escalation_skipped']}"
        if outcome.get("escalation_error"):
            headers["x-routenlp-escalation"] = f"failed; previous answer returned ({outcome['escalation_error']})"
        if outcome.get("streaming_cascade") == "off":
            headers["x-routenlp-cascade"] = "off (streaming)"
        return {name: header_value(value) for name, value in headers.items()}

    async def _buffer_stream(self, data: dict, state: RequestState, stream: Any) -> None:
        decision = state.decision
        task = decision.task if decision.task_status == "known" else None
        task_settings = self.settings.tasks.get(task) if task else None
        policy = task_settings.cascade_streaming if task_settings else "off"
        if policy == "off":
            # passthrough: the stream goes out as it comes; its record (with the cost of its usage) is
            # written when it ends, in async_post_call_streaming_iterator_hook
            routed = decision.tier or self.tiers.count
            state.passthrough = True
            state.result = {"final_tier": routed, "path": [routed], "uncertainties": [None],
                            "total_cost_usd": None, "escalation_error": None, "escalation_skipped": None,
                            "streaming_cascade": "off"}
            return
        started = time.perf_counter()
        buffered = await collect_stream(stream)
        first = self._answer(buffered.response, (time.perf_counter() - started) * 1000.0, decision.tier,
                             usage=buffered.usage)
        result = await self._cascade(data, state, first)
        await self._finish(data, state, result, streamed=True)
        if result.final is first:
            state.replay = buffered.chunks
        else:
            state.replay = chunks_from_response(result.final.response)
        if not state.client_logprobs:
            for chunk in state.replay:
                strip_logprobs(chunk)

    async def async_post_call_streaming_iterator_hook(self, user_api_key_dict: Any, response: Any,
                                                      request_data: dict) -> AsyncGenerator[Any, None]:
        state = self._state(request_data)
        if state is not None and state.replay is not None:
            for chunk in state.replay:
                yield chunk
            return
        if state is None or not state.passthrough:
            async for chunk in response:
                yield chunk
            return
        async for chunk in self._passthrough(request_data, state, response):
            yield chunk

    async def _passthrough(self, data: dict, state: RequestState, stream: Any) -> AsyncGenerator[Any, None]:
        """A stream that is not cascaded: logprobs the client did not ask for are removed, and the
        record (priced from the stream's usage) is written before the last chunk leaves."""
        started = time.perf_counter()
        usage, held = None, None
        hidden: dict[str, Any] = {}
        try:
            async for chunk in stream:
                if getattr(chunk, "usage", None) is not None:
                    usage = chunk.usage
                hidden.update(getattr(chunk, "_hidden_params", None) or {})
                if not state.client_logprobs:
                    strip_logprobs(chunk)
                if held is not None:
                    yield held
                held = chunk
        except Exception as error:  # the tier failed mid-stream: the client got part of an answer at most
            if not state.recorded:
                await self.async_post_call_failure_hook(data, error, None)
            raise
        hidden.update(getattr(stream, "_hidden_params", None) or {})
        routed = state.decision.tier or self.tiers.count
        holder = type("Streamed", (), {})()
        holder._hidden_params = hidden
        tier, model_id = self._tier_of_response(holder)
        tier = tier or routed
        cost = self._cost_of(holder, model_id, usage)
        first = TierAnswer(tier=tier, response=None, uncertainty=None, cost_usd=cost,
                           latency_ms=(time.perf_counter() - started) * 1000.0, model_id=model_id)
        result = CascadeResult(final=first)
        result.attempts.append(Attempt(tier=tier, tier_name=self.tier_names.get(tier, f"T{tier}"), model_id=model_id,
                                       uncertainty=None, threshold=None, cost_usd=cost,
                                       latency_ms=first.latency_ms))
        await self._finish(data, state, result, streamed=True)
        state.result["streaming_cascade"] = "off"
        if held is not None:
            yield held

    # ------------------------------------------------------------------ tier latency (SLA-aware routing)
    async def async_log_success_event(self, kwargs: dict, response_obj: Any, start_time: Any, end_time: Any) -> None:
        """Every call to a tier of the alias (first call or escalation) feeds that tier's latency window."""
        if self.sla is not None:
            self._observe_latency(kwargs, start_time, end_time)

    async def async_log_failure_event(self, kwargs: dict, response_obj: Any, start_time: Any, end_time: Any) -> None:
        """A timed-out call counts with the time it took (a tier that hangs is a slow tier); other
        failures are the cooldown's business, not latency."""
        import litellm

        if self.sla is not None and isinstance(kwargs.get("exception"), litellm.Timeout):
            self._observe_latency(kwargs, start_time, end_time)

    def _observe_latency(self, kwargs: dict, start_time: Any, end_time: Any) -> None:
        try:
            params = kwargs.get("litellm_params") or {}
            metadata = params.get("metadata") or params.get("litellm_metadata") or {}
            if metadata.get("model_group") != self.settings.model_alias:
                return
            tier = TierTable.tier_of({"model_info": params.get("model_info") or {}})
            elapsed = end_time - start_time
            seconds = elapsed.total_seconds() if hasattr(elapsed, "total_seconds") else float(elapsed)
            if tier is not None and seconds >= 0:
                self.sla.latencies.observe(tier, seconds * 1000.0)
        except Exception as error:  # a latency figure is never worth a failed log event
            logger.debug("RouteNLP: latency observation failed: %s", error)

    # ------------------------------------------------------------------ 5. failures are logged too
    async def async_post_call_failure_hook(self, request_data: dict, original_exception: Exception,
                                           user_api_key_dict: Any, traceback_str: Optional[str] = None) -> Any:
        state = self._state(request_data)
        if state is None:
            return None
        error = (type(original_exception).__name__ if _message_logging_off(request_data)
                 else f"{type(original_exception).__name__}: {str(original_exception)[:300]}")
        if state.recorded:
            # the answer was recorded, then the request failed on its way out: the client did not get it,
            # so a second record retracts the first (coopt.logs drops a request retracted so)
            await self.decision_log.append_async(DecisionRecord(
                request_id=state.request_id, client_call_id=state.client_call_id,
                ts=datetime.now(timezone.utc).isoformat(), outcome="failed_after_answer", error=error))
            return None
        decision = state.decision
        await self.decision_log.append_async(DecisionRecord(
            request_id=state.request_id, client_call_id=state.client_call_id,
            ts=datetime.now(timezone.utc).isoformat(), outcome="failed", task=decision.task,
            task_status=decision.task_status,
            router=RouteRecord(probabilities=tier_map(self.tier_names, decision.probabilities),
                               routed_tier=self.tier_names.get(decision.tier or 0),
                               router_ms=decision.router_ms),
            error=error))
        state.recorded = True
        prometheus_metrics.observe_failure(self._task_label(decision))
        return None


def load_serving_policy(settings: RouteNLPSettings, router: Optional[Router]) -> tuple[Optional[Thresholds], Any]:
    """The policy file named by ``thresholds_path``: its thresholds (paper rule) and the policy object.

    The file records what it was fitted under (router sha256, quantisation, max_hops,
    no_logprobs_policy, route_confidence, task specs); serving under anything else would void what
    calibration measured, so a mismatch is refused, naming the fields."""
    path = Path(settings.thresholds_path)
    document = read_policy_document(path)
    # the paper's rule needs its thresholds mapping (Thresholds validates it, naming the field)
    paper_rule = document.get("policy", "conformal_thresholds") == "conformal_thresholds"
    thresholds = Thresholds.load(path) if paper_rule or document.get("thresholds") else None
    policy = policy_from_document(document, settings, where=str(path), base=path.parent)
    # a kind without an artifact (a wrapped bench system) has no sha256 to check; the rest still is
    sha = router_sha256(router.artifact_dir) if router is not None and router.artifact_dir is not None else None
    mismatched = check_fitted_under(document, settings, sha)
    if mismatched:
        fitted = document.get("fitted_under") or {}
        raise PolicyError(f"{path}: fitted under other settings than these: {', '.join(mismatched)} "
                          f"(fitted under: router_sha256={fitted.get('router_sha256')}, router={fitted.get('router')}, "
                          f"router_quantized={fitted.get('router_quantized')}, max_hops={fitted.get('max_hops')}, "
                          f"no_logprobs_policy={fitted.get('no_logprobs_policy')}, "
                          f"route_confidence={fitted.get('route_confidence')}); re-run `routenlp calibrate` "
                          "under the serving settings")
    return thresholds, policy


def answer_text(response: Any) -> Optional[str]:
    """The first choice's text (for agreement between tiers' answers); None when there is none."""
    choices = getattr(response, "choices", None) or []
    message = getattr(choices[0], "message", None) if choices else None
    content = getattr(message, "content", None)
    return content if isinstance(content, str) else None


def header_value(value: Any, limit: int = 500) -> str:
    """A string a response header can carry: printable latin-1 only (anything else -> ``?``), at most
    ``limit`` characters.  Starlette encodes header values as latin-1 and h11 refuses CR/LF/NUL, so an
    unchecked value turns an answered request into a 500 or a dropped connection."""
    text = str(value)[:limit]
    return "".join(ch if (" " <= ch <= "~") or ("\xa0" <= ch <= "\xff") else "?" for ch in text)


def strip_logprobs(chunk: Any) -> None:
    """Remove the logprobs the plugin forced on from a chunk or response (the client did not ask)."""
    for choice in getattr(chunk, "choices", None) or []:
        if getattr(choice, "logprobs", None) is not None:
            choice.logprobs = None


def redact_error(error: Optional[str]) -> Optional[str]:
    """``"T3: APIError: ...prompt text..."`` -> ``"T3: APIError"``: what may be logged without prompts."""
    if error is None:
        return None
    parts = error.split(": ")
    keep = parts[:2] if parts[0].startswith("T") and parts[0][1:].isdigit() else parts[:1]
    return ": ".join(keep)


def failed_deployment_ids(metadata: dict[str, Any]) -> set[str]:
    """Deployments that already failed this request (LiteLLM's retry breadcrumbs, ``previous_models``)."""
    out = set()
    for attempt in metadata.get("previous_models") or []:
        deployment_id = attempt.get("deployment_id") if isinstance(attempt, dict) else None
        if isinstance(deployment_id, str):
            out.add(deployment_id)
    return out


def remaining_budget(user_api_key_dict: Any) -> Optional[float]:
    """USD the calling key may still spend (None when it has no budget), read once per request."""
    max_budget = getattr(user_api_key_dict, "max_budget", None)
    if max_budget is None:
        return None
    spend = getattr(user_api_key_dict, "spend", None) or 0.0
    return max(float(max_budget) - float(spend), 0.0)


def _message_logging_off(data: dict) -> bool:
    """Honour LiteLLM's global and per-request message-logging switches."""
    import litellm

    if getattr(litellm, "turn_off_message_logging", False):
        return True
    metadata = data.get("metadata") or {}
    return bool(data.get("turn_off_message_logging") or metadata.get("turn_off_message_logging"))
