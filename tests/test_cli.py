"""`routenlp train` and `routenlp calibrate` as a user runs them: on an all-pairs file of their own.

The file is built from a real subset (the first 300 MedMCQA queries of cascades_9llm, 4 real LLMs),
renamed so that nothing about it matches the shipped artifacts: another task name, other tier names,
written to a temporary directory, and the commands run from that directory as subprocesses.
Bad input must end with exit status 2 and one line naming the file (and line and field), never a
traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from routenlp_core.allpairs import Portfolio, TierSpec, data_sha256, write_allpairs, write_portfolio
from routenlp_core.paths import project_root

ENCODER_DIR = project_root() / "artifacts" / "encoder"
pytestmark = pytest.mark.needs(data=["cascades_9llm"], artifacts=["encoder/model.onnx"])  # missing: fail, say how

TIER_NAMES = {"T1": "small", "T2": "medium", "T3": "large", "T4": "xl"}
TASK = "med_quiz"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                "TOKENIZERS_PARALLELISM": "false"})
    return env


def routenlp(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "routenlp_cli.cli", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def user_files(tmp_path_factory) -> dict[str, Path]:
    """train.jsonl (200 queries), calib.jsonl (the other 100) and portfolio.yaml, in a temp dir."""
    from coopt.multimodel import load_cascades_9llm

    records, portfolio = load_cascades_9llm("medmcqa", limit=300)
    renamed = [dataclasses.replace(record, id=f"user-{record.id}", task=TASK,
                                   tiers={TIER_NAMES[name]: result for name, result in record.tiers.items()})
               for record in records]
    user_portfolio = Portfolio(tiers=tuple(TierSpec(TIER_NAMES[t.name], t.model) for t in portfolio.tiers),
                               tasks={TASK: portfolio.tasks["medmcqa"]})
    folder = tmp_path_factory.mktemp("user")
    return {"dir": folder,
            "train": write_allpairs(renamed[:200], folder / "train.jsonl"),
            "calib": write_allpairs(renamed[200:], folder / "calib.jsonl"),
            "portfolio": write_portfolio(user_portfolio, folder / "portfolio.yaml")}


@pytest.fixture(scope="module")
def trained(user_files) -> tuple[Path, subprocess.CompletedProcess]:
    out = user_files["dir"] / "my_router"
    result = routenlp("train", "--data", "train.jsonl", "--portfolio", "portfolio.yaml", "--out", "my_router",
                      "--encoder", str(ENCODER_DIR), cwd=user_files["dir"])
    return out, result


def test_train_writes_an_artifact_router_model_serves(trained, user_files):
    from litellm_routenlp.router_model import RouterModel

    out, result = trained
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    meta = json.loads((out / "router.json").read_text())
    assert meta["tiers"] == ["small", "medium", "large", "xl"]
    assert meta["tasks"] == ["__unknown__", TASK]
    assert meta["data_sha256"] == data_sha256(user_files["train"])
    assert meta["training"]["n_train"] + meta["training"]["n_val"] == 200
    model = RouterModel.load(out, quantized=True)  # finds the encoder through router.json's dir_hint
    assert model.tiers == ["small", "medium", "large", "xl"]
    probabilities = model.predict_proba(["Question: which nerve supplies the deltoid?", "hello"], [TASK, None])
    assert probabilities.shape == (2, 4)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_calibrate_under_that_router_writes_loadable_thresholds(trained, user_files):
    from litellm_routenlp.thresholds import Thresholds

    assert trained[1].returncode == 0, trained[1].stderr
    result = routenlp("calibrate", "--data", "calib.jsonl", "--portfolio", "portfolio.yaml",
                      "--router", "my_router", "--out", "out/thresholds.json", cwd=user_files["dir"])
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    path = user_files["dir"] / "out" / "thresholds.json"
    thresholds = Thresholds.load(path)
    assert thresholds.alpha == 0.05
    assert thresholds.meta["data_sha256"] == data_sha256(user_files["calib"])
    assert thresholds.meta["router_artifact"] is not None and thresholds.meta["route_confidence"] == 0.5
    document = json.loads(path.read_text())
    assert set(document["thresholds"]) == {"small", "medium", "large", "xl"}
    for tier in ("small", "medium", "large"):  # every tier below the top has a threshold (0.0 = escalate all)
        assert thresholds.delta(tier, TASK) is not None and thresholds.delta(tier, TASK) >= 0.0
    assert thresholds.delta("xl", TASK) is None  # the top tier never escalates
    # the replayed cascade: each of the 100 calibration queries ends at exactly one tier, and the
    # top tier's queries are those routed there plus those escalated to it
    assert 0 < document["thresholds"]["xl"][TASK]["n"] <= 100
    assert result.stdout.splitlines()[0].split()[:4] == ["tier", "task", "n", "delta"]
    assert sum(TASK in line for line in result.stdout.splitlines()) == 4


def _rewrite_line(source: Path, target: Path, line: int, change) -> Path:
    lines = source.read_text().splitlines()
    lines[line - 1] = change(lines[line - 1])
    target.write_text("\n".join(lines) + "\n")
    return target


def _set_quality(line: str) -> str:
    record = json.loads(line)
    record["tiers"]["medium"]["quality"] = 1.5
    return json.dumps(record)


def _drop_cost(line: str) -> str:
    record = json.loads(line)
    del record["tiers"]["large"]["cost_usd"]
    return json.dumps(record)


def _assert_one_line_error(result: subprocess.CompletedProcess, command: str, *fragments: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"routenlp {command}: error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.mark.parametrize("command", ["train", "calibrate"])
@pytest.mark.parametrize("change,fragments", [
    (_set_quality, ("bad.jsonl:3:", "tiers.medium", "quality", "1.5")),
    (_drop_cost, ("bad.jsonl:3:", "tiers.large", "cost_usd", "missing")),
    (lambda line: line[: len(line) // 2], ("bad.jsonl:3:", "not valid JSON")),  # a torn line
])
def test_a_malformed_line_is_one_error_line_naming_file_line_and_field(user_files, tmp_path, command, change,
                                                                        fragments):
    bad = _rewrite_line(user_files["calib"], tmp_path / "bad.jsonl", 3, change)
    extra = ["--out", str(tmp_path / "out")] if command == "train" else ["--out", str(tmp_path / "t.json")]
    result = routenlp(command, "--data", str(bad), "--portfolio", str(user_files["portfolio"]), *extra,
                      cwd=tmp_path)
    _assert_one_line_error(result, command, *fragments)
    assert not (tmp_path / "out" / "router.json").exists() and not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("command", ["train", "calibrate"])
def test_a_missing_portfolio_is_a_clear_error(user_files, tmp_path, command):
    result = routenlp(command, "--data", str(user_files["calib"]), "--portfolio", "no/such/portfolio.yaml",
                      "--out", str(tmp_path / "out"), cwd=tmp_path)
    _assert_one_line_error(result, command, "portfolio file not found", "no/such/portfolio.yaml")


def test_a_record_that_does_not_match_the_portfolio_names_the_field(user_files, tmp_path):
    portfolio = tmp_path / "other.yaml"
    portfolio.write_text(user_files["portfolio"].read_text().replace(TASK, "another_task"))
    result = routenlp("train", "--data", str(user_files["calib"]), "--portfolio", str(portfolio),
                      "--out", str(tmp_path / "out"), cwd=tmp_path)
    _assert_one_line_error(result, "train", "calib.jsonl:1:", "field `task`", TASK)


def test_missing_data_router_or_encoder_are_clear_errors(user_files, tmp_path):
    """Before the fix, a missing router or encoder directory ended in a RuntimeError traceback."""
    cwd, portfolio = user_files["dir"], "portfolio.yaml"
    result = routenlp("calibrate", "--data", "nope.jsonl", "--portfolio", portfolio, "--out", str(tmp_path / "t"),
                      cwd=cwd)
    _assert_one_line_error(result, "calibrate", "all-pairs file not found", "nope.jsonl")
    result = routenlp("calibrate", "--data", "calib.jsonl", "--portfolio", portfolio, "--router", "no_router",
                      "--out", str(tmp_path / "t"), cwd=cwd)
    _assert_one_line_error(result, "calibrate", "router artifact directory not found", "no_router")
    result = routenlp("train", "--data", "calib.jsonl", "--portfolio", portfolio, "--out", str(tmp_path / "r"),
                      "--encoder", str(tmp_path / "no_encoder"), cwd=cwd)
    _assert_one_line_error(result, "train", "encoder artifact", "no_encoder", "routenlp export-encoder")
