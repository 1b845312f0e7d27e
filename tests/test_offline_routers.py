"""Calibration and ``coopt evaluate`` get their router from the proxy's registry (litellm_routenlp/routers.py).

A router kind the proxy can serve (``routenlp_settings.router: {kind, module, options}``) must be
calibratable and evaluable the same way; the default kind (``encoder_head``) must give exactly what
loading the trained router directly gave.  Real data: 36 held-out demo queries answered at test time
by the real tiers of proxy_config.yaml (the `demo` fixture), and the shipped router.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from calibration.calibrate import calibrate, calibrate_cascade_routing, router_start_tiers
from coopt.evaluate import evaluate
from litellm_routenlp.router_model import RouterModel
from litellm_routenlp.routers import ROUTERS, RouterEstimates, RouterSettingError, load_router, register_router
from litellm_routenlp.thresholds import Thresholds
from routenlp_core.allpairs import load_portfolio, read_allpairs
from routenlp_core.paths import project_root

ROOT = project_root()
ARTIFACTS = ROOT / "artifacts"
KIND = "fixed_start_offline_test"

# One router kind, importable by module name (``router.module``) in a subprocess too: every query
# starts at one tier (a one-hot route, no acceptance estimates), as a bench baseline served would.
KIND_MODULE = textwrap.dedent(f'''
    import numpy as np
    from litellm_routenlp.routers import RouterEstimates, register_router

    class FixedStart:
        artifact_dir, max_chars, blocking = None, None, False

        def __init__(self, tiers, tier):
            self.tiers, self.tasks, self.tier = list(tiers), (), tier

        def predict(self, texts, tasks):
            route = np.zeros((len(texts), len(self.tiers)))
            route[:, self.tier - 1] = 1.0
            return RouterEstimates(route=route, acceptance=None)

    @register_router("{KIND}")
    def fixed_start(settings, options):
        if set(options) != {{"tier"}}:
            raise ValueError("needs exactly `tier`")
        return FixedStart(["T1", "T2", "T3", "T4"], int(options["tier"]))
''')


# Queries per demo task, labelled at test time by the real tiers of proxy_config.yaml: calibration-split
# test queries (the ones `make router` calibrates on, never trained on). Labels are not shipped in git
# (they would copy ../shared/data into the repo); bitext's SmolLM2 answers make this the slow part (~1 min).
PER_TASK = 12


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(records, portfolio): real all-pairs rows of the demo tasks, answered by every demo tier."""
    import asyncio

    from coopt.demo_router import DEMO_TASKS, MAX_TOKENS, is_calibration_id
    from coopt.label import iter_examples, label_examples
    from conftest import require_artifacts, require_data

    require_data("banking77", "clinc150", "bitext_customer_support")
    require_artifacts("tiers", "router/router.json", "portfolio.yaml")
    chosen = []
    for task in DEMO_TASKS:
        held_out = [e for e in iter_examples([task], "test", 250, seed=0) if is_calibration_id(e.id)]
        chosen.extend(held_out[:PER_TASK])
    out = tmp_path_factory.mktemp("labels") / "demo_calibration.jsonl"
    asyncio.run(label_examples(ROOT / "proxy_config.yaml", chosen, out, concurrency=2, max_tokens=MAX_TOKENS,
                               progress=False))
    portfolio = load_portfolio(ARTIFACTS / "portfolio.yaml")
    records = read_allpairs(out, portfolio)
    assert len(records) == len(chosen) == PER_TASK * len(DEMO_TASKS)
    return records, portfolio, out


@pytest.fixture
def kind_module(tmp_path, monkeypatch):
    """The kind's module on sys.path (``router.module`` imports it); unregistered afterwards."""
    (tmp_path / "offline_kind_test.py").write_text(KIND_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "offline_kind_test"
    ROUTERS.pop(KIND, None)
    sys.modules.pop("offline_kind_test", None)


def _quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # thin (tier, task) cells warn; expected here
        return function(*args, **kwargs)


def _strip(document):
    return {key: value for key, value in document.items() if key != "created"}


def test_the_default_kind_calibrates_exactly_as_the_trained_router_loaded_directly(demo):
    records, portfolio, _ = demo
    by_registry = _quiet(calibrate, records, portfolio, router_artifact=ARTIFACTS / "router")
    direct = _quiet(calibrate, records, portfolio, router_artifact=RouterModel.load(ARTIFACTS / "router"))
    assert _strip(by_registry) == _strip(direct)
    assert by_registry["fitted_under"]["router_sha256"] is not None   # the proxy checks it against its router
    assert by_registry["thresholds"]["T1"]["banking77"]["n"] > 0


def test_calibration_replays_the_router_kind_it_is_told(demo, kind_module):
    records, portfolio, _ = demo
    spec = {"kind": KIND, "module": kind_module, "options": {"tier": 3}}
    document = _quiet(calibrate, records, portfolio, router_artifact=ARTIFACTS / "router", router=spec)
    cells = document["thresholds"]
    for task in portfolio.tasks:
        n_task = sum(r.task == task for r in records)
        reached = {tier: cells[tier][task]["n"] for tier in portfolio.tier_names if task in cells[tier]}
        # every query starts at T3: nothing reaches T1/T2, all of them reach T3
        assert reached.get("T1", 0) == 0 and reached.get("T2", 0) == 0, (task, reached)
        assert reached["T3"] == n_task, (task, reached)
    assert document["fitted_under"]["router_sha256"] is None   # this kind has no artifact to hash
    # the same kind and options through a built router give the same document
    built = load_router(ARTIFACTS / "router", spec)
    assert _strip(_quiet(calibrate, records, portfolio, router_artifact=built)) == _strip(document)


def test_bad_router_settings_are_refused_naming_the_field(demo, kind_module):
    records, portfolio, _ = demo
    for spec, field in (({"kind": "no_such_kind"}, "kind"), ({"kind": KIND, "module": kind_module}, "options"),
                        ({"kind": KIND, "modul": kind_module}, "modul"),
                        ({"module": "no_such_module_xyz"}, "module")):
        with pytest.raises(RouterSettingError, match=rf"routenlp_settings\.router\.{field}:"):
            calibrate(records, portfolio, router_artifact=ARTIFACTS / "router", router=spec)


def test_an_object_that_is_not_a_router_is_refused(demo):
    records, portfolio, _ = demo

    class OldStyle:  # the pre-protocol interface: no predict(texts, tasks) -> RouterEstimates
        tiers = portfolio.tier_names

        def predict_proba(self, texts, tasks):
            return np.full((len(texts), 4), 0.25)

    with pytest.raises(TypeError, match="not a router"):
        calibrate(records, portfolio, router_artifact=OldStyle())
    with pytest.raises(TypeError, match="not a router"):
        evaluate(records, portfolio, OldStyle(), None)


def test_certified_policies_need_a_router_with_acceptance_estimates(demo, kind_module):
    records, portfolio, _ = demo
    with pytest.raises(ValueError, match="gives no acceptance estimates"):
        calibrate_cascade_routing(records, portfolio, ARTIFACTS / "router",
                                  router={"kind": KIND, "module": kind_module, "options": {"tier": 1}})


def test_calibration_asks_the_router_with_the_proxys_character_cut(demo):
    records, portfolio, _ = demo
    seen = []

    class Cutting:
        tiers, tasks, artifact_dir, max_chars, blocking = portfolio.tier_names, (), None, 7, False

        def predict(self, texts, tasks):
            seen.extend(texts)
            return RouterEstimates(route=np.tile([1.0, 0, 0, 0], (len(texts), 1)), acceptance=None)

    assert list(router_start_tiers(records[:5], Cutting())) == [1] * 5
    assert seen == [r.prompt[:7] for r in records[:5]] and any(len(r.prompt) > 7 for r in records[:5])


def test_coopt_evaluate_serves_any_registered_kind_and_the_default_as_before(demo, kind_module):
    records, portfolio, _ = demo
    thresholds = Thresholds.load(ARTIFACTS / "thresholds.json")
    top = load_router(None, {"kind": KIND, "module": kind_module, "options": {"tier": 4}})
    figures, outcomes = evaluate(records, portfolio, top, thresholds)
    assert figures["top_share"] == 1.0 and figures["cost_ratio"] == 1.0 and figures["escalation_rate"] == 0.0
    assert {o.start_tier for o in outcomes} == {"T4"}
    by_registry, _ = evaluate(records, portfolio, load_router(ARTIFACTS / "router"), thresholds)
    direct, _ = evaluate(records, portfolio, RouterModel.load(ARTIFACTS / "router"), thresholds)
    assert by_registry == direct and 0.0 < by_registry["cost_ratio"] < 1.0


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(cwd)}
    return subprocess.run([sys.executable, "-m", "routenlp_cli.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _config(tmp_path: Path, router: dict, max_hops: int = 2) -> Path:
    settings = {"router_artifact": str(ARTIFACTS / "router"), "router": router, "max_hops": max_hops,
                "router_quantized": False,
                "tasks": {"banking77": {"kind": "structured", "tau": 0.92},
                          "clinc150": {"kind": "structured", "tau": 0.92},
                          "bitext": {"kind": "generation", "tau": 0.65}}}
    path = tmp_path / "proxy_config.yaml"
    path.write_text(json.dumps({"model_list": [], "routenlp_settings": settings}))  # JSON is YAML
    return path


def test_routenlp_calibrate_config_uses_the_router_and_settings_the_proxy_config_names(demo, tmp_path):
    (tmp_path / "offline_kind_test.py").write_text(KIND_MODULE)
    config = _config(tmp_path, {"kind": KIND, "module": "offline_kind_test", "options": {"tier": 3}})
    done = _cli("calibrate", "--data", str(demo[2]), "--portfolio", str(ARTIFACTS / "portfolio.yaml"),
                "--config", str(config), "--out", "policy.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    document = json.loads((tmp_path / "policy.json").read_text())
    assert document["fitted_under"]["max_hops"] == 2 and document["fitted_under"]["router_quantized"] is False
    assert all(cell["n"] == 0 for cell in document["thresholds"]["T1"].values())   # every query started at T3
    assert document["thresholds"]["T3"]["banking77"]["n"] == sum(r.task == "banking77" for r in demo[0])

    bad = _config(tmp_path, {"kind": "no_such_kind"})
    done = _cli("calibrate", "--data", str(demo[2]), "--portfolio", str(ARTIFACTS / "portfolio.yaml"),
                "--config", str(bad), "--out", "policy.json", cwd=tmp_path)
    assert done.returncode == 2 and "routenlp_settings.router.kind: unknown router kind 'no_such_kind'" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_policy_file_calibrated_under_a_kind_is_served_with_that_kind(demo, kind_module, tmp_path):
    """The loop closes: the proxy serving the kind loads the file calibrated under it (and decides with it)."""
    from conftest import write_proxy_config
    from litellm_routenlp.plugin import RouteNLPCallback

    records, portfolio, _ = demo
    spec = {"kind": KIND, "module": kind_module, "options": {"tier": 2}}
    path = tmp_path / "policy.json"
    _quiet(calibrate, records, portfolio, router_artifact=ARTIFACTS / "router", router=spec, out_path=path)
    callback = RouteNLPCallback.from_config(write_proxy_config(tmp_path, thresholds_path=path, router=spec))
    assert callback.thresholds.delta("T2", "bitext") is not None
    decision = callback.decide([{"role": "user", "content": "where is my card?"}], {"task": "banking77"})
    assert decision.probabilities == [0.0, 1.0, 0.0, 0.0]
    assert json.loads(path.read_text())["fitted_under"]["router"] == {"kind": KIND, "options": {"tier": 2}}


def test_a_policy_file_is_refused_by_a_proxy_serving_another_router_kind(demo, kind_module, tmp_path):
    """The kind and options the decisions were replayed with are part of what a file was fitted under."""
    from conftest import write_proxy_config
    from litellm_routenlp.config import SettingsError
    from litellm_routenlp.plugin import RouteNLPCallback

    records, portfolio, _ = demo
    path = tmp_path / "policy.json"
    _quiet(calibrate, records, portfolio, router_artifact=ARTIFACTS / "router",
           router={"kind": KIND, "module": kind_module, "options": {"tier": 2}}, out_path=path)
    for served, field in (({}, "router.kind"),   # the default kind: the trained router
                          ({"kind": KIND, "module": kind_module, "options": {"tier": 3}}, "router.options")):
        with pytest.raises(SettingsError, match=rf"fitted under other settings than these: {re.escape(field)}"):
            RouteNLPCallback.from_config(write_proxy_config(tmp_path, thresholds_path=path, router=served))
    # the shipped file, calibrated on the trained router (encoder_head), is served by the default kind
    assert json.loads((ARTIFACTS / "thresholds.json").read_text())["fitted_under"].get("router") in (
        None, {"kind": "encoder_head", "options": {}})
