"""RouteNLP plugin settings: one validated place, read once at proxy start-up.

The settings live in the proxy's own ``proxy_config.yaml`` under a top-level ``routenlp_settings:``
key (LiteLLM ignores keys it does not know), or in a separate YAML file named by the environment
variable ``ROUTENLP_CONFIG``.  Relative paths are resolved against the directory of the file they
come from, so a config can be moved together with its artifacts.  A bad value raises
:class:`SettingsError` whose message names the setting, and the proxy refuses to start.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SETTINGS_KEY = "routenlp_settings"
CONFIG_ENV = "ROUTENLP_CONFIG"


class SettingsError(ValueError):
    """A RouteNLP setting is missing or invalid; the message names it."""


class TaskSettings(BaseModel):
    """How one task is served: its quality bar and how streaming interacts with the cascade."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["structured", "generation"] = Field(
        description="structured: labels/extraction; generation: free text. Used by outage fallbacks.")
    tau: float = Field(gt=0.0, le=1.0, description="the task's quality threshold (paper Table 1)")
    cascade_streaming: Literal["buffer", "off"] = Field(
        default="buffer",
        description="buffer: hold a streamed answer until its uncertainty is known, then replay it or "
                    "the escalated answer (first token arrives later); off: stream at once, no cascade.")
    latency_budget_ms: Optional[float] = Field(
        default=None, gt=0.0, allow_inf_nan=False,
        description="SLA-aware routing (latency_budget.py): a start tier or escalation whose expected latency "
                    "(the tiers' rolling figures) would exceed this is not chosen; unset: no budget")
    latency_budget_quantile: Optional[Literal["p50", "p99"]] = Field(
        default=None, description="the quantile the budget bounds (default p99); needs latency_budget_ms")

    @model_validator(mode="after")
    def _budget_quantile(self) -> "TaskSettings":
        if self.latency_budget_quantile is not None and self.latency_budget_ms is None:
            raise ValueError("latency_budget_quantile is set but latency_budget_ms is not")
        if self.latency_budget_ms is not None and self.latency_budget_quantile is None:
            self.latency_budget_quantile = "p99"
        return self


class RouterSettings(BaseModel):
    """Which :class:`~litellm_routenlp.routers.Router` the proxy serves (``routers.py`` registry)."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(default="encoder_head", min_length=1,
                      description="a registered router kind; encoder_head: the trained router of router_artifact")
    module: Optional[str] = Field(default=None, min_length=1,
                                  description="module imported before `kind` is looked up (it registers the kind)")
    options: dict[str, Any] = Field(default_factory=dict, description="passed to the kind's factory")


class ShadowAuditSettings(BaseModel):
    """Shadow audit (shadow_audit.py): re-ask the top tier for a sample of cheaper answers."""

    model_config = ConfigDict(extra="forbid")

    fraction: float = Field(default=0.02, ge=0.0, le=1.0,
                            description="share of answers below the top tier that are audited (0: off)")
    max_per_hour: int = Field(default=60, ge=0, description="at most this many audits in any rolling hour")


class AdaptationSettings(BaseModel):
    """Online adaptation (online_adaptation.py): ACI moves each task's policy knob with the verdicts;
    the state is shared by every proxy instance through Redis."""

    model_config = ConfigDict(extra="forbid")

    step: float = Field(default=0.05, gt=0.0, le=1.0, description="ACI step size gamma: the most one verdict moves "
                                                                  "a task's scale")
    max_scale: float = Field(default=1.0, gt=0.0, le=10.0,
                             description="upper bound of the scale (1 = never cheaper than the calibrated policy); "
                                         "the lower bound 0 is the top tier's quality end")
    target_miscoverage: dict[str, float] = Field(
        default_factory=dict, description="per-task alpha ACI aims at; default: 1 - the policy file's certified target "
                                          "(else its alpha)")
    redis_host: Optional[str] = Field(default=None, min_length=1,
                                      description="default: router_settings.redis_host (LiteLLM's shared router state)")
    redis_port: Optional[int] = Field(default=None, ge=1, le=65535, description="default: router_settings.redis_port")
    redis_password: Optional[str] = Field(default=None, description="default: router_settings.redis_password")
    key_prefix: str = Field(default="routenlp", min_length=1, description="Redis key prefix (one per deployment)")
    refresh_s: float = Field(default=1.0, ge=0.0, description="re-read the shared state at most this often")
    timeout_s: float = Field(default=0.05, gt=0.0, le=5.0,
                             description="Redis socket timeout; past it the instance serves on its last state")
    log_path: Path = Field(default=Path("logs/routenlp_adaptation.jsonl"),
                           description="durable record of every change of a scale, with its cause")

    @field_validator("target_miscoverage")
    @classmethod
    def _alphas(cls, value: dict[str, float]) -> dict[str, float]:
        for task, alpha in value.items():
            if not 0.0 < alpha < 1.0:
                raise ValueError(f"target_miscoverage.{task} must be in (0, 1), got {alpha}")
        return value


class RouteNLPSettings(BaseModel):
    """Everything the plugin needs; defaults are what a first deployment should use."""

    model_config = ConfigDict(extra="forbid")

    model_alias: str = Field(default="routenlp", min_length=1,
                             description="the model group name clients call; its deployments are the tiers")
    router_artifact: Path = Field(description="directory written by `routenlp train`")
    router: RouterSettings = Field(default_factory=RouterSettings,
                                   description="the router served (kind encoder_head reads router_artifact)")
    encoder_dir: Optional[Path] = Field(
        default=None, description="encoder ONNX directory; default: the one router.json names")
    router_quantized: bool = Field(default=True, description="serve the int8 graphs (faster, >=98% agreement)")
    router_execution: Literal["in_proxy", "process"] = Field(
        default="in_proxy",
        description="in_proxy: the router runs on the proxy's event loop (a worker thread for a transformer "
                    "encoder); process: in its own process, the loop only writes the query to a pipe and reads "
                    "the estimates (the router in the proxy answers while that process starts or if it fails). "
                    "README: 'The proxy with the plugin vs the plain LiteLLM proxy'")
    thresholds_path: Optional[Path] = Field(
        default=None, description="JSON written by `routenlp calibrate`; without it the cascade never fires")
    decision_log_path: Path = Field(default=Path("logs/routenlp_decisions.jsonl"))
    decision_log_durability: Literal["on_disk", "handed_off"] = Field(
        default="on_disk",
        description="on_disk: an answer leaves only after its record is written and fsync'd; handed_off: once "
                    "the record is in the log writer's pipe (committed milliseconds later; survives a proxy "
                    "crash, not a power loss or a kill of the writer itself). README: 'The decision log'")
    verdicts_path: Path = Field(
        default=Path("logs/routenlp_verdicts.jsonl"),
        description="durable verdict records (shadow audit, POST /routenlp/verdicts, `routenlp verdicts`)")
    shadow_audit: ShadowAuditSettings = Field(default_factory=ShadowAuditSettings)
    adaptation: Optional[AdaptationSettings] = Field(
        default=None, description="online adaptation shared through Redis (off when unset)")
    tasks: dict[str, TaskSettings] = Field(min_length=1)
    require_task: bool = Field(default=False, description="reject requests without metadata.task (HTTP 400)")
    unknown_task_policy: Literal["reject", "router", "top_tier"] = Field(
        default="router",
        description="missing/unknown task when not required: route with the task-agnostic embedding "
                    "(router), send to the most expensive tier (top_tier), or answer 400 (reject)")
    route_confidence: float = Field(
        default=0.5, gt=0.0, lt=1.0,
        description="pick the cheapest tier whose predicted P(acceptable) reaches this value")
    max_hops: int = Field(default=3, ge=0, le=10, description="maximum escalations per request")
    no_logprobs_policy: Literal["trust_router", "escalate"] = Field(
        default="trust_router",
        description="a tier that returns no logprobs: keep its answer (trust_router) or escalate")
    fail_open: bool = Field(
        default=False,
        description="router artifact or thresholds file unusable at start-up: refuse to start (false) or "
                    "route everything to the top tier with a loud warning (true)")
    metrics_port: Optional[int] = Field(
        default=None, ge=1, le=65535,
        description="serve the routenlp_* Prometheus metrics on this port (prometheus-client's server); off when "
                    "unset. Not needed when LiteLLM's `prometheus` callback is on: its /metrics shows them too")
    latency_window: int = Field(
        default=20, ge=1, le=10000,
        description="SLA-aware routing: calls per tier in the rolling latency window (p99 of 20 = the slowest)")
    latency_max_age_s: float = Field(
        default=300.0, gt=0.0,
        description="SLA-aware routing: a tier's latency figure expires this long after its last call")
    metrics_host: str = Field(
        default="127.0.0.1", min_length=1,
        description="address the metrics port binds to; loopback by default (the endpoint has no authentication)")

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, tasks: dict[str, TaskSettings]) -> dict[str, TaskSettings]:
        for name in tasks:
            if not name or name.startswith("__"):
                raise ValueError(f"task name {name!r} is reserved or empty")
            # the name is echoed in the x-routenlp-task header: printable ASCII, no spaces
            if not all("!" <= ch <= "~" for ch in name):
                raise ValueError(f"task name {name!r} must be printable ASCII without spaces "
                                 "(it is sent in the x-routenlp-task response header)")
        return tasks

    def resolve_paths(self, base_dir: Path) -> "RouteNLPSettings":
        """Return a copy with relative paths made absolute against ``base_dir``."""

        def fix(path: Optional[Path]) -> Optional[Path]:
            if path is None:
                return None
            path = Path(os.path.expanduser(str(path)))
            return path if path.is_absolute() else (base_dir / path).resolve()

        return self.model_copy(update={
            "router_artifact": fix(self.router_artifact),
            "encoder_dir": fix(self.encoder_dir),
            "thresholds_path": fix(self.thresholds_path),
            "decision_log_path": fix(self.decision_log_path),
            "verdicts_path": fix(self.verdicts_path),
            "adaptation": None if self.adaptation is None else
            self.adaptation.model_copy(update={"log_path": fix(self.adaptation.log_path)}),
        })


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        lines.append(f"{SETTINGS_KEY}.{where}: {item['msg']}")
    return f"invalid RouteNLP settings in {source}:\n  " + "\n  ".join(lines)


def settings_from_mapping(raw: Any, source: str, base_dir: Path) -> RouteNLPSettings:
    if not isinstance(raw, Mapping):
        raise SettingsError(f"{source}: `{SETTINGS_KEY}` must be a mapping, got {type(raw).__name__}")
    try:
        settings = RouteNLPSettings.model_validate(dict(raw))
    except ValidationError as error:
        raise SettingsError(_format_validation_error(error, source)) from None
    return settings.resolve_paths(base_dir)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SettingsError(f"config file not found: {path}") from None
    except yaml.YAMLError as error:
        raise SettingsError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(loaded, dict):
        raise SettingsError(f"{path}: expected a YAML mapping at the top level")
    return loaded


def load_settings(config_path: str | os.PathLike[str]) -> tuple[RouteNLPSettings, dict[str, Any]]:
    """Read ``routenlp_settings`` (and return the whole YAML, whose model_list names the tiers)."""
    path = Path(config_path).resolve()
    document = read_yaml(path)
    if SETTINGS_KEY in document:
        raw = document[SETTINGS_KEY]
    elif "router_artifact" in document:  # a standalone settings file
        raw = document
    else:
        raise SettingsError(f"{path}: no `{SETTINGS_KEY}` section")
    return settings_from_mapping(raw, str(path), path.parent), document


def find_config_path() -> Path:
    """ROUTENLP_CONFIG wins; otherwise the config file the running LiteLLM proxy was started with."""
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        return Path(explicit)
    import sys

    proxy_server = sys.modules.get("litellm.proxy.proxy_server")
    proxy_path = getattr(proxy_server, "user_config_file_path", None) if proxy_server else None
    proxy_path = proxy_path or os.environ.get("CONFIG_FILE_PATH")
    if not proxy_path:
        raise SettingsError(
            f"cannot find the RouteNLP settings: start the proxy with `litellm --config FILE` or set {CONFIG_ENV}")
    return Path(proxy_path)
