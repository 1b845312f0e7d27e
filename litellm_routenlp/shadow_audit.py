"""Shadow audit (issue 13 item 4a): some answers below the top tier are re-asked at the top tier, in
the background, and the task's metric of the client's answer against the top tier's is the verdict.

Why the top tier as the reference: at serving time there is no gold answer, and the top tier is what
every cheaper answer is certified against (calibration labels an answer acceptable by the task's
metric against the reference; the stand-ins' top tier replays the references).  The audit is the
online version of that label.

Which requests: an answered, non-passthrough request whose final tier is below the top tier, sampled
with probability ``fraction`` (default 2%), at most ``max_per_hour`` audits in any rolling hour (the
budget: the top tier is the expensive one).  The call starts after the decision record is written and
runs as its own task; the client's answer does not wait for it.

Never the client's spend or escalation: the audit call carries none of the client's key metadata
(LiteLLM attributes a call's spend through ``user_api_key_*``), its spend-log metadata names the
request as ``routenlp_audit_of`` (never ``routenlp_parent_request_id``, the escalation link
``coopt.logs`` follows), and its only plugin tags are ``routenlp-audit`` and its tier/task
(:func:`spend_tags.tag_audit_call`), never ``routenlp-escalated``; it goes through the LiteLLM router,
not the proxy's request hooks, so no decision record and no ``routenlp_requests_total`` count.

Metric per task (``routenlp_core.tasks`` names it; nothing here imports torch):
accuracy -> the normalised label matches; rouge_l -> ROUGE-L >= tau; entity_f1 / clause_f1 -> F1 of
the parsed entity / clause sets >= tau; bertscore_f1 needs torch, so ROUGE-L stands in and the
verdict record says ``metric: "rouge_l (for bertscore_f1)"``.  A task the core registry does not know
compares normalised text.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Optional

if TYPE_CHECKING:
    from .request_state import RequestState

logger = logging.getLogger("litellm_routenlp")


class AuditBudget:
    """Sampling at ``fraction`` with at most ``max_per_hour`` audits in any rolling 3600 s."""

    def __init__(self, fraction: float, max_per_hour: int, clock: Callable[[], float] = time.monotonic,
                 rng: Optional[random.Random] = None) -> None:
        self.fraction = fraction
        self.max_per_hour = max_per_hour
        self.clock = clock
        self.rng = rng or random.Random(secrets.randbits(64))
        self.started: deque[float] = deque()
        self.skipped_for_budget = 0

    def take(self) -> bool:
        """Should this request be audited?  Counts it against the budget when yes."""
        if self.fraction <= 0.0 or self.rng.random() >= self.fraction:
            return False
        now = self.clock()
        while self.started and now - self.started[0] >= 3600.0:
            self.started.popleft()
        if len(self.started) >= self.max_per_hour:
            self.skipped_for_budget += 1
            return False
        self.started.append(now)
        return True


def audit_score(task: Optional[str], answer: str, reference: str, tau: float) -> tuple[bool, float, str]:
    """(acceptable, score, metric name) of ``answer`` against the top tier's ``reference``."""
    from routenlp_core import metrics
    from routenlp_core.tasks import UnknownTaskError, get_task

    try:
        spec = get_task(task or "")
        metric = spec.metric
    except UnknownTaskError:
        metric = "exact"
    if metric in ("accuracy", "exact"):
        score = metrics.label_accuracy(answer, reference)
        return score >= 1.0, score, metric
    if metric == "entity_f1":
        score = metrics.set_f1(set(metrics.parse_entities(answer)), set(metrics.parse_entities(reference)))
    elif metric == "clause_f1":
        score = metrics.set_f1(metrics.parse_label_list(answer), metrics.parse_label_list(reference))
    else:  # rouge_l, and bertscore_f1's torch-free stand-in
        score = metrics.rouge_l(answer, reference)
        metric = "rouge_l" if metric == "rouge_l" else f"rouge_l (for {metric})"
    return score >= tau, float(score), metric


class ShadowAudit:
    """Schedules audits and turns the top tier's answer into a stored verdict."""

    def __init__(self, budget: AuditBudget, ask_top: Callable[[dict, dict], Awaitable[Any]],
                 store: Callable[..., Awaitable[Any]]) -> None:
        self.budget = budget
        self._ask_top = ask_top        # (data, state) -> TierAnswer of the top tier
        self._store = store            # (request_id, acceptable, **audit fields) -> stored record
        self.tasks: set[asyncio.Task] = set()  # strong references: a bare create_task may be collected

    def maybe_audit(self, data: dict, state: "RequestState", answer_text: Optional[str], final_tier: int, top_tier: int,
                    task: Optional[str], tau: Optional[float], top_name: str) -> bool:
        if answer_text is None or final_tier >= top_tier or tau is None or not self.budget.take():
            return False
        job = asyncio.get_running_loop().create_task(self._run(data, state, answer_text, task, tau, top_name))
        self.tasks.add(job)
        job.add_done_callback(self.tasks.discard)
        return True

    async def _run(self, data: dict, state: "RequestState", answer_text: str, task: Optional[str], tau: float,
                   top_name: str) -> None:
        await asyncio.sleep(0)  # let the request that scheduled this finish first
        try:
            top = await self._ask_top(data, state)
            if top.text is None:
                logger.info("RouteNLP: audit of %s: the top tier returned no text", state.request_id)
                return
            acceptable, score, metric = audit_score(task, answer_text, top.text, tau)
            await self._store(state.request_id, acceptable, score=round(score, 6), metric=metric,
                              reference_tier=top_name)
        except Exception as error:  # an audit is never worth an error anywhere else
            logger.warning("RouteNLP: audit of %s failed: %s", state.request_id, type(error).__name__)
