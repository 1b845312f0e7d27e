"""LiteLLM request tags that split LiteLLM's own spend views by tier, task and escalation.

Why tags: LiteLLM copies ``metadata.tags`` of a call into its spend-log row (``LiteLLM_SpendLogs.request_tags``)
and adds the call's cost to ``LiteLLM_DailyTagSpend`` per tag, which ``/spend/tags``, ``/tag/daily/activity``
and the admin UI's tag views read.  A tag per tier / task / escalation therefore makes the operator's
existing spend reports show what the router did, with no report of ours in between.

When and where the tags are written matters (verified in litellm 1.106.2):

* ``litellm_core_utils/litellm_logging.py`` ``StandardLoggingPayloadSetup.get_request_tags`` reads
  ``litellm_params["metadata"]["tags"]`` when the success (or failure) event is logged, i.e. after the call;
  ``proxy/spend_tracking/spend_tracking_utils.py`` ``get_logging_payload`` stores that list as the row's
  ``request_tags``.  ``litellm_params["metadata"]`` is the request's own metadata dict (the same object
  the Router's hooks see, not a copy), so tags assigned before the call reach the row.
* Not in ``async_filter_deployments``: ``router.py`` runs LiteLLM's tag routing (``get_deployments_for_tag``)
  *after* the callbacks' filters, so with ``router_settings.enable_tag_filtering`` our tags would count as
  routing tags and an untagged deployment list would be refused ("Not allowed to access model due to tags
  configuration").  The plugin tags in ``async_pre_call_deployment_hook`` instead (``utils.py``: run once
  per deployment call, after the deployment is chosen, before it is called; a retry runs it again), where
  ``metadata["model_info"]`` names the deployment actually called, so the tier tag is the served tier.
  The pre-call hook is too early (no tier yet).  ``tests/test_spend_tags.py`` checks the whole chain
  with LiteLLM's own row builder, tag filtering on and off.

A client cannot spoof these tags: the pre-call hook drops every ``routenlp-*`` tag a client sent
(``request_fields.strip_client_plugin_fields``) and :func:`with_routing_tags` rebuilds the plugin's part
of the list from the plugin's own decision every time it runs (a retry on another tier re-tags).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

from .request_fields import RequestError, resolve_task
from .routing import RoutingDecision

TAG_PREFIX = "routenlp-"
TIER_TAG = TAG_PREFIX + "tier:"
TASK_TAG = TAG_PREFIX + "task:"
ESCALATED_TAG = TAG_PREFIX + "escalated"
DEGRADED_TAG = TAG_PREFIX + "degraded"
AUDIT_TAG = TAG_PREFIX + "audit"  # a shadow-audit call (shadow_audit.py): not the client's spend, not an escalation
UNKNOWN_TASK = "unknown"


def is_plugin_tag(tag: Any) -> bool:
    """A tag only the plugin may write (case and surrounding blanks do not hide one)."""
    return isinstance(tag, str) and tag.strip().lower().startswith(TAG_PREFIX)


def task_label(task: Optional[str], task_status: Optional[str], configured: Iterable[str]) -> str:
    """The task name a tag or metric label may carry: a configured task, else ``unknown``.

    Bounded on purpose: a free-form client string would open one tag (and one Prometheus series)
    per distinct value a client cares to send."""
    if task_status == "known" and task and task in set(configured):
        return task
    return UNKNOWN_TASK


def routing_tags(tier_name: str, task: str, escalated: bool = False, degraded: bool = False) -> list[str]:
    """The plugin's tags for one call, in a fixed order."""
    tags = [TIER_TAG + tier_name, TASK_TAG + task]
    if escalated:
        tags.append(ESCALATED_TAG)
    if degraded:
        tags.append(DEGRADED_TAG)
    return tags


def with_routing_tags(existing: Any, ours: list[str]) -> list[str]:
    """The client's own tags (kept in order, any ``routenlp-*`` one dropped) followed by ``ours``.

    Always a new list: the caller assigns it, so a list shared with another request's metadata (an
    escalation inherits its parent's) is never changed in place."""
    kept = [tag for tag in existing if not is_plugin_tag(tag)] if isinstance(existing, list) else []
    return kept + [tag for tag in ours if tag not in kept]


def tag_call(metadata: dict[str, Any], tier_name: str, task: str, escalated: bool = False,
             degraded: bool = False) -> None:
    """Set ``metadata["tags"]`` for one call the plugin makes or steers."""
    metadata["tags"] = with_routing_tags(metadata.get("tags"),
                                         routing_tags(tier_name, task, escalated=escalated, degraded=degraded))


def call_metadata(kwargs: Mapping[str, Any], alias: str) -> Optional[dict[str, Any]]:
    """The metadata dict of a deployment call to ``alias`` (``metadata`` or ``litellm_metadata``), else None."""
    for holder in ("metadata", "litellm_metadata"):
        metadata = kwargs.get(holder)
        if isinstance(metadata, dict) and metadata.get("model_group") == alias:
            return metadata
    return None


def tag_routed_call(metadata: dict[str, Any], decision: Optional[RoutingDecision], escalated: bool,
                    tier_names: Mapping[int, str], settings: Any) -> None:
    """Tag a call whose deployment LiteLLM has chosen: its tier (from the deployment), task, and whether it
    is one of the plugin's escalations or served below/above the tier the router wanted (degraded).

    ``decision`` is the plugin's routing decision of the request (request_state.py) (None on an escalation call,
    whose task is re-resolved from the whitelisted ``task`` field the same way the door resolves it)."""
    tier = (metadata.get("model_info") or {}).get("routenlp_tier")
    if not isinstance(tier, int) or isinstance(tier, bool):
        return
    if decision is not None:
        task = task_label(decision.task, decision.task_status, settings.tasks)
    else:
        try:
            name, status = resolve_task(metadata, settings)
        except RequestError:
            name, status = None, "missing"
        task = task_label(name, status, settings.tasks)
    wanted = decision.wanted_tier if decision is not None else None
    degraded = not escalated and isinstance(wanted, int) and wanted != tier
    tag_call(metadata, tier_names.get(tier, f"T{tier}"), task, escalated=escalated, degraded=degraded)


def tag_audit_call(metadata: dict[str, Any], tier_names: Mapping[int, str], task: str) -> None:
    """Tags of a shadow-audit call: ``routenlp-audit``, its tier and task, no escalation or degraded tag."""
    tier = (metadata.get("model_info") or {}).get("routenlp_tier")
    ours = [AUDIT_TAG] + ([TIER_TAG + tier_names.get(tier, f"T{tier}")] if isinstance(tier, int) else []) + \
        [TASK_TAG + task]
    metadata["tags"] = with_routing_tags(metadata.get("tags"), ours)
