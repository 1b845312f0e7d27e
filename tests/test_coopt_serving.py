"""A real proxy started on an iteration's generated config serves that iteration's distilled tiers.

The directories reach the stand-ins only through the config (``model_info`` of each stand-in
deployment, written by ``coopt.versions.derive_proxy_config``): the proxy runs from another working
directory with ``ROUTENLP_ARTIFACTS_DIR`` pointing nowhere, so neither the environment nor the
working directory can be what makes it work.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from openai import OpenAI

from coopt.versions import derive_proxy_config
from litellm_routenlp.config import read_yaml
from litellm_routenlp.proxy_process import ProxyProcess
from routenlp_core.paths import project_root
from routenlp_standins.artifacts import write_tensors_and_meta

ROOT = project_root()
ARTIFACTS = ROOT / "artifacts"
pytestmark = [pytest.mark.proxy,
              pytest.mark.needs(data=["banking77"], artifacts=["tiers", "encoder/model.onnx", "smollm2", "router"])]


def _iteration(tmp_path: Path) -> Path:
    """An iteration directory: the shipped router and thresholds, and a banking77 head that always
    answers ``card_linking`` (the base head answers ``card_arrival`` to the query below)."""
    out = tmp_path / "run" / "iter-1"
    shutil.copytree(ARTIFACTS / "router", out / "router")
    shutil.copy2(ARTIFACTS / "thresholds.json", out / "thresholds.json")
    write_tensors_and_meta(out / "tiers" / "classifier" / "banking77.safetensors",
                           {"coef": np.zeros((2, 384), np.float32), "intercept": np.array([0.0, 9.0], np.float32)},
                           {"tier": "classifier", "task": "banking77", "labels": ["card_arrival", "card_linking"]})
    return out


def test_a_proxy_on_the_generated_config_serves_the_iterations_distilled_head(tmp_path: Path) -> None:
    out = _iteration(tmp_path)
    config = derive_proxy_config(ROOT / "proxy_config.yaml", out, ARTIFACTS)
    document = read_yaml(config)
    t1 = next(d for d in document["model_list"] if d["litellm_params"]["model"] == "routenlp-local/classifier")
    base_t1 = {"litellm_params": dict(t1["litellm_params"]),
               "model_info": {key: value for key, value in t1["model_info"].items() if key != "routenlp_coopt_dir"}}
    # two plain model groups beside the alias: the iteration's T1 and the base T1, called directly
    document["model_list"] += [{"model_name": "iteration-t1", "litellm_params": dict(t1["litellm_params"]),
                                "model_info": {**t1["model_info"], "id": "iteration-t1"}},
                               {"model_name": "base-t1", "litellm_params": base_t1["litellm_params"],
                                "model_info": {**base_t1["model_info"], "id": "base-t1"}}]
    config.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()

    with ProxyProcess(config, log_path=tmp_path / "proxy.log", cwd=elsewhere,
                      env={"ROUTENLP_ARTIFACTS_DIR": str(tmp_path / "nowhere")}) as proxy:
        client = OpenAI(base_url=proxy.base_url, api_key=proxy.master_key, max_retries=0)

        def ask(model: str, **extra) -> str:
            response = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "my card still has not arrived"}],
                extra_body={"metadata": {"task": "banking77"}, **extra})
            return response.choices[0].message.content

        assert ask("iteration-t1") == "card_linking"
        assert ask("base-t1") == "card_arrival"
        # a client naming other directories in its body changes nothing
        assert ask("iteration-t1", routenlp_coopt_dir=str(tmp_path / "nowhere"),
                   model_info={"routenlp_coopt_dir": str(tmp_path / "nowhere")}) == "card_linking"
    assert not (out / "logs").exists()  # the proxy's logs stay where the base config puts them


def test_a_relative_directory_in_a_standins_model_info_stops_the_proxy_naming_the_field(tmp_path: Path) -> None:
    from conftest import write_proxy_config

    def mutate(document: dict) -> None:
        document["model_list"][2]["model_info"]["routenlp_coopt_dir"] = "artifacts/coopt/demo/active"

    config = write_proxy_config(tmp_path, mutate)
    proxy = ProxyProcess(config, log_path=tmp_path / "proxy.log", cwd=ROOT)
    with pytest.raises(RuntimeError):
        proxy.start(timeout=120)
    proxy.stop()
    assert ("model_list[2].model_info.routenlp_coopt_dir must be an absolute path, got "
            "'artifacts/coopt/demo/active'") in (tmp_path / "proxy.log").read_text()
