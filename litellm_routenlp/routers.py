"""The router interface the proxy serves, and the registry of router kinds.

A router turns (query text, task) into what the decision policy reads: per-tier route probabilities
p_k = P(the cheapest acceptable tier is k) and, for policies that use them, per-tier acceptance
estimates P(tier k acceptable).  The proxy asks for them through :class:`Router` only, so any
implementation -- the trained encoder + head of ``router_artifact`` (kind ``encoder_head``, the
default), or a benchmark system wrapped to this interface -- is served the same way.  Which one is
chosen by ``routenlp_settings.router: {kind: ..., module: ..., options: {...}}``; ``module`` is
imported first so that a kind living outside this package can register itself with
:func:`register_router`.

A factory receives the validated settings and ``router.options`` and returns a :class:`Router`; it
raises ``RouterArtifactError`` when its artifact is unusable (the proxy then fails closed or open as
``fail_open`` says) and ``ValueError`` for bad options (the proxy refuses to start, naming the field).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np
from pydantic import ValidationError

from .config import RouterSettings, load_settings

DEFAULT_KIND = "encoder_head"


class RouterEstimates(NamedTuple):
    """(n, K) route probabilities and (n, K) acceptance estimates (None: the router has none)."""

    route: np.ndarray
    acceptance: Optional[np.ndarray]


@runtime_checkable
class Router(Protocol):
    """What the proxy needs from a router."""

    tiers: Sequence[str]          # tier names, cheapest first (must match the alias's deployments)
    tasks: Sequence[str]          # tasks it was fitted on (others use its task-agnostic input)

    @property
    def artifact_dir(self) -> Optional[Path]:
        """Directory whose files are hashed into the policy file's ``fitted_under.router_sha256``."""

    @property
    def max_chars(self) -> Optional[int]:
        """Characters of a query the router reads (the proxy cuts the query there); None: all."""

    @property
    def blocking(self) -> bool:
        """True when one prediction costs enough to be worth a worker thread (a transformer encoder)."""

    def predict(self, texts: Sequence[str], tasks: Sequence[Optional[str]]) -> RouterEstimates:
        """Estimates for each (text, task) pair."""


RouterFactory = Callable[[Any, Mapping[str, Any]], Router]
ROUTERS: dict[str, RouterFactory] = {}


def register_router(kind: str) -> Callable[[RouterFactory], RouterFactory]:
    """Decorator: make ``kind`` a value of ``routenlp_settings.router.kind``."""

    def add(factory: RouterFactory) -> RouterFactory:
        if kind in ROUTERS and ROUTERS[kind] is not factory:
            raise ValueError(f"router kind {kind!r} is already registered")
        ROUTERS[kind] = factory
        return factory

    return add


class RouterSettingError(ValueError):
    """``routenlp_settings.router`` names no usable router; ``field`` is the offending setting."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"routenlp_settings.router.{field}: {message}")
        self.field = field


def build_router(settings: Any) -> Router:
    """The router ``settings.router`` describes (import its module, look up its kind, build it)."""
    spec = settings.router
    if spec.module:
        try:
            importlib.import_module(spec.module)
        except Exception as error:  # any import failure is a configuration error at start-up
            raise RouterSettingError("module", f"cannot import {spec.module!r} ({type(error).__name__}: {error})") \
                from None
    factory = ROUTERS.get(spec.kind)
    if factory is None:
        raise RouterSettingError("kind", f"unknown router kind {spec.kind!r} (registered: {', '.join(sorted(ROUTERS))})")
    try:
        router = factory(settings, dict(spec.options))
    except ValueError as error:
        if isinstance(error, RouterSettingError):
            raise
        raise RouterSettingError("options", str(error)) from None
    if not isinstance(router, Router):
        raise RouterSettingError("kind", f"router kind {spec.kind!r} built a {type(router).__name__}, which lacks "
                                         "tiers / tasks / artifact_dir / max_chars / blocking / predict")
    try:  # what a policy file calibrated on this router records (policy.fitted_under "router")
        router.router_spec = spec_record(spec)
    except AttributeError:  # a router object that takes no new attributes: its files record no kind
        pass
    return router


def spec_record(spec: Any) -> dict[str, Any]:
    """``{kind, options}`` of a ``routenlp_settings.router`` value (a RouterSettings, a mapping, or None:
    the default kind)."""
    get = spec.get if isinstance(spec, Mapping) else (lambda key: getattr(spec, key, None))
    return {"kind": get("kind") or DEFAULT_KIND, "options": dict(get("options") or {})}


@register_router(DEFAULT_KIND)
def _encoder_head(settings: Any, options: Mapping[str, Any]) -> Router:
    """The trained router of ``router_artifact``: static or MiniLM encoder + the head (router_model.py)."""
    from .router_model import RouterModel

    if options:
        raise ValueError(f"kind {DEFAULT_KIND!r} takes no options (its settings are router_artifact, encoder_dir, "
                         f"router_quantized); got {', '.join(sorted(options))}")
    return RouterModel.load(settings.router_artifact, encoder_dir=settings.encoder_dir,
                            quantized=settings.router_quantized)


@dataclass(frozen=True)
class OfflineRouterSettings:
    """The part of ``routenlp_settings`` a router factory reads, for steps that have no proxy config.

    Calibration replay and ``coopt evaluate`` build their router with :func:`load_router` from these
    four settings (the same names and meaning as in the proxy's settings), so a kind the proxy can
    serve can be calibrated and evaluated.  A factory that needs more of the proxy's settings is
    built from the proxy config itself (:func:`router_from_config`)."""

    router_artifact: Optional[Path]
    router: RouterSettings
    encoder_dir: Optional[Path] = None
    router_quantized: bool = True


def load_router(router_artifact: Optional[Union[str, os.PathLike[str]]],
                router: Union[RouterSettings, Mapping[str, Any], None] = None, *,
                encoder_dir: Optional[Union[str, os.PathLike[str]]] = None, router_quantized: bool = True) -> Router:
    """The router an offline step replays, built by the proxy's registry (:func:`build_router`).

    ``router`` has the shape of ``routenlp_settings.router`` (``{kind, module, options}``; default
    kind ``encoder_head``, which loads ``router_artifact`` as the proxy does).  A bad ``router``
    raises :class:`RouterSettingError` naming the field."""
    try:
        spec = router if isinstance(router, RouterSettings) else RouterSettings.model_validate(dict(router or {}))
    except ValidationError as error:
        item = error.errors()[0]
        raise RouterSettingError(".".join(str(part) for part in item["loc"]) or "kind", item["msg"]) from None
    return build_router(OfflineRouterSettings(
        router_artifact=None if router_artifact is None else Path(router_artifact), router=spec,
        encoder_dir=None if encoder_dir is None else Path(encoder_dir), router_quantized=router_quantized))


def router_from_config(config_path: Union[str, os.PathLike[str]]) -> tuple[Router, Any]:
    """(router, settings) from a proxy config: exactly the router the proxy would serve with it."""
    settings, _ = load_settings(config_path)
    return build_router(settings), settings


def predict_served(router: Router, texts: Sequence[str], tasks: Sequence[Optional[str]]) -> RouterEstimates:
    """``router.predict`` on the texts the proxy would give it: each cut at ``router.max_chars``.

    The proxy cuts the query there before asking the router (plugin.py ``decide``); an offline
    replay that did not would score a router on inputs it is never served."""
    cut = router.max_chars
    return router.predict([text if cut is None else text[:cut] for text in texts], list(tasks))


__all__ = ["DEFAULT_KIND", "ROUTERS", "OfflineRouterSettings", "Router", "RouterEstimates", "RouterSettingError",
           "build_router", "load_router", "predict_served", "register_router", "router_from_config"]
