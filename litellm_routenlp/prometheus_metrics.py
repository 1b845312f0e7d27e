"""Live RouteNLP metrics for Prometheus, next to LiteLLM's own.

Library: ``prometheus-client``, the one LiteLLM's Prometheus integration uses, so our metrics live in
the same default ``REGISTRY`` and LiteLLM's own ``/metrics`` serves them (litellm 1.106.2:
``integrations/prometheus.py`` ``PrometheusLogger._mount_metrics_endpoint`` mounts
``make_metrics_asgi_app(REGISTRY)`` when ``prometheus`` is among ``litellm_settings.callbacks`` /
``success_callback``; no premium check on that path, but ``proxy/middleware/prometheus_auth_middleware.py``
asks for a LiteLLM key unless ``litellm_settings.require_auth_for_metrics_endpoint: false``).  Without that
callback, ``routenlp_settings.metrics_port`` starts prometheus-client's own HTTP server, bound to
``metrics_host`` (127.0.0.1 by default: that server has no authentication).

Names follow LiteLLM's: a product prefix (``routenlp_`` as LiteLLM's ``litellm_``), snake_case label names,
``_total`` counters, ``_seconds`` for durations.  Label values are bounded: tasks are configured task
names or ``unknown`` (:func:`spend_tags.task_label`), tiers are the configured tier names.

Several proxy workers: we follow LiteLLM's choice, prometheus-client's multiprocess mode.  With
``PROMETHEUS_MULTIPROC_DIR`` set (LiteLLM's documented multi-worker setup; it must exist and be empty
at start), prometheus-client writes every worker's values to files in that directory and LiteLLM's
``/metrics`` (or our port, below) aggregates them with ``MultiProcessCollector``: the counters are the
sum over workers whichever worker is scraped.  Without it, each proxy instance is its own scrape target.
Only counters and histograms are used (they aggregate by sum; gauges would need a multiprocess mode).

Hot-path cost: one ``labels(...).inc()`` / ``observe()`` per figure, a few microseconds, all after the
answer is known; prometheus-client's per-metric lock is never held across an ``await``.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from typing import Any, Iterable, Optional

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .routing import RoutingDecision

logger = logging.getLogger("litellm_routenlp")

UNCERTAINTY_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 20)) + (1.0,)
ROUTER_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
HOP_BUCKETS = (0, 1, 2, 3, 4, 5, 10)

REQUESTS = Counter("routenlp_requests_total", "Requests answered, by task and the tier whose answer the client got",
                   ["task", "tier"])
ESCALATIONS = Counter("routenlp_escalations_total", "Cascade escalations, by task and tier pair",
                      ["task", "from_tier", "to_tier"])
CASCADE_HOPS = Histogram("routenlp_cascade_hops", "Escalations per answered request", ["task"],
                         buckets=HOP_BUCKETS)
UNCERTAINTY = Histogram("routenlp_uncertainty", "Uncertainty u = mean(1 - p(token)) of each tier's answer",
                        ["task", "tier"], buckets=UNCERTAINTY_BUCKETS)
ROUTER_LATENCY = Histogram("routenlp_router_latency_seconds", "Time the difficulty router took per request",
                           ["task"], buckets=ROUTER_LATENCY_BUCKETS)
DEGRADED = Counter("routenlp_degraded_total", "Requests served by another tier than the router wanted (outage)",
                   ["task", "wanted_tier", "served_tier"])
FALLBACKS = Counter("routenlp_fallback_total",
                    "Fail-open and fallback events: router_unavailable (fail_open start, top tier for all), "
                    "escalation_failed (previous answer returned), escalation_skipped (e.g. key budget), "
                    "request_failed (no answer)", ["task", "event"])
# verdicts.VerdictStore counts here: the shadow audit (source=audit) and clients' verdicts (source=client)
AUDIT_VERDICTS = Counter("routenlp_audit_verdicts_total",
                         "Quality verdicts stored, by task, verdict (acceptable/unacceptable) and source (audit/client)",
                         ["task", "verdict", "source"])

# online_adaptation.py.  Gauges, with the multiprocess mode that aggregates them sensibly: Redis is "up"
# only when every live worker reaches it (livemin); the scale is the live workers' latest read (livemax:
# they all read one Redis hash).
ADAPTATION_REDIS_UP = Gauge("routenlp_adaptation_redis_up",
                            "1 when this instance reaches the adaptation state in Redis, 0 when it serves on its "
                            "last state", multiprocess_mode="livemin")
ADAPTATION_SCALE = Gauge("routenlp_adaptation_scale",
                         "Online adaptation: the task's knob scale (1 = calibrated policy, 0 = top-tier quality end)",
                         ["task"], multiprocess_mode="livemax")

_server_lock = threading.Lock()
_servers: dict[tuple[str, int], Any] = {}


def observe_answer(task: str, decision: RoutingDecision, outcome: dict[str, Any], tier_names: dict[int, str],
                   router_available: bool = True) -> None:
    """Count one answered request: its tier, escalations, hops, uncertainties, router time, degradation.

    ``decision`` is the routing decision, ``outcome`` the plugin's ``RequestState.result`` (``path`` and ``uncertainties`` aligned, tiers as numbers).  Never raises: the
    request is answered and recorded by now, and a metric must not turn it into an error."""
    try:
        _observe_answer(task, decision, outcome, tier_names, router_available)
    except Exception:
        logger.exception("RouteNLP: updating Prometheus metrics failed")


def _observe_answer(task: str, decision: RoutingDecision, outcome: dict[str, Any], tier_names: dict[int, str],
                    router_available: bool) -> None:
    name = lambda tier: tier_names.get(tier, f"T{tier}")  # noqa: E731
    path = [tier for tier in outcome.get("path") or [] if isinstance(tier, int)]
    final = outcome.get("final_tier")
    REQUESTS.labels(task=task, tier=name(final)).inc()
    for low, high in zip(path, path[1:]):
        ESCALATIONS.labels(task=task, from_tier=name(low), to_tier=name(high)).inc()
    CASCADE_HOPS.labels(task=task).observe(max(len(path) - 1, 0))
    for tier, uncertainty in zip(path, outcome.get("uncertainties") or []):
        if uncertainty is not None:
            UNCERTAINTY.labels(task=task, tier=name(tier)).observe(float(uncertainty))
    router_ms = decision.router_ms
    if isinstance(router_ms, (int, float)):
        ROUTER_LATENCY.labels(task=task).observe(router_ms / 1000.0)
    wanted, served = decision.wanted_tier, decision.tier
    if wanted and served and wanted != served:
        DEGRADED.labels(task=task, wanted_tier=name(wanted), served_tier=name(served)).inc()
    if not router_available:
        FALLBACKS.labels(task=task, event="router_unavailable").inc()
    if outcome.get("escalation_error"):
        FALLBACKS.labels(task=task, event="escalation_failed").inc()
    if outcome.get("escalation_skipped"):
        FALLBACKS.labels(task=task, event="escalation_skipped").inc()


def observe_failure(task: str) -> None:
    """A request of ours that ended without an answer."""
    try:
        FALLBACKS.labels(task=task, event="request_failed").inc()
    except Exception:
        logger.exception("RouteNLP: updating Prometheus metrics failed")


def observe_verdict(task: str, acceptable: bool, source: str) -> None:
    """One stored verdict (:mod:`verdicts`)."""
    try:
        AUDIT_VERDICTS.labels(task=task, verdict="acceptable" if acceptable else "unacceptable", source=source).inc()
    except Exception:
        logger.exception("RouteNLP: updating Prometheus metrics failed")


def observe_adaptation_redis(up: bool) -> None:
    ADAPTATION_REDIS_UP.set(1.0 if up else 0.0)


def observe_adaptation_scale(task: str, scale: float) -> None:
    try:
        ADAPTATION_SCALE.labels(task=task).set(scale)
    except Exception:
        logger.exception("RouteNLP: updating Prometheus metrics failed")


def _scrape_registry() -> CollectorRegistry:
    """The default registry, or, in multiprocess mode, one that aggregates every worker's files."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


def start_metrics_server(port: Optional[int], host: str = "127.0.0.1") -> bool:
    """Serve ``/metrics`` on ``host:port`` (prometheus-client's server, a daemon thread); once per process.

    Returns True when this process serves it.  With several workers in multiprocess mode the first one
    to bind serves the aggregate of all; the others find the port taken, which is then expected and
    logged at INFO.  Without multiprocess mode a taken port is an error worth a warning: that target
    would show one worker's counters only."""
    if port is None:
        return False
    with _server_lock:
        if (host, port) in _servers:
            return True
        try:
            _servers[(host, port)] = start_http_server(port, addr=host, registry=_scrape_registry())
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                logger.info("RouteNLP: metrics port %s:%s is served by another worker", host, port)
            else:
                logger.warning("RouteNLP: metrics port %s:%s already in use; with several workers set "
                               "PROMETHEUS_MULTIPROC_DIR so one endpoint aggregates them", host, port)
            return False
    logger.info("RouteNLP: Prometheus metrics on http://%s:%s/metrics", host, port)
    return True


def sample(name: str, labels: dict[str, str], registry: Any = REGISTRY) -> float:
    """A metric's current value (0.0 when the series does not exist yet); for tests and `routenlp` tools."""
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


def metric_names() -> Iterable[str]:
    """Every metric family this module registers (for the README and a test)."""
    return [metric._name for metric in (REQUESTS, ESCALATIONS, CASCADE_HOPS, UNCERTAINTY, ROUTER_LATENCY,
                                         DEGRADED, FALLBACKS, AUDIT_VERDICTS, ADAPTATION_REDIS_UP,
                                         ADAPTATION_SCALE)]
