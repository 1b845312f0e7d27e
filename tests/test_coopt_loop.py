"""Co-optimisation loop control: the epsilon stop, resuming, versioned iterations, activation and rollback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from coopt.loop import comparison, run_loop
from coopt.versions import (VersionError, activate, active_config, active_iteration, derive_proxy_config,
                            iteration_dir, iterations, read_manifest, rollback, serving_config, sha256_file,
                            write_serving_config)
from litellm_routenlp.config import read_yaml
from routenlp_core.paths import project_root
from routenlp_standins.artifacts import StandinConfigError, StandinDirs, classifier_root
from routenlp_standins.classifier import ClassifierTier


class FakeSteps:
    """Steps that write serving files like the real ones (a T1 head that answers one fixed label)."""

    def __init__(self, cost_ratios: list[float], labels: list[str], artifacts: Path = Path("artifacts")) -> None:
        self.cost_ratios = cost_ratios
        self.labels = labels
        self.artifacts = artifacts
        self.built: list[int] = []

    def _write(self, n: int, out_dir: Path) -> dict:
        from routenlp_standins.artifacts import write_tensors_and_meta

        self.built.append(n)
        (out_dir / "router").mkdir(parents=True)
        (out_dir / "router" / "weights.safetensors").write_bytes(np.random.default_rng(n).bytes(64))
        (out_dir / "thresholds.json").write_text(json.dumps({"thresholds": {"T1": {"banking77": {"delta": 0.1 * n}}}}))
        derive_proxy_config(project_root() / "proxy_config.yaml", out_dir, self.artifacts)
        winner = self.labels[n % len(self.labels)]
        intercept = np.array([5.0 if label == winner else 0.0 for label in self.labels], np.float32)
        write_tensors_and_meta(out_dir / "tiers" / "classifier" / "banking77.safetensors",
                               {"coef": np.zeros((len(self.labels), 384), np.float32), "intercept": intercept},
                               {"tier": "classifier", "task": "banking77", "labels": self.labels})
        return {"iteration": n, "cost_ratio": self.cost_ratios[n]}

    def baseline(self, out_dir: Path) -> dict:
        return self._write(0, out_dir)

    def iterate(self, n: int, previous: Path, out_dir: Path) -> dict:
        assert previous == iteration_dir(out_dir.parent, n - 1)
        return self._write(n, out_dir)


LABELS = ["card_arrival", "card_linking", "lost_or_stolen_card"]


def test_loop_stops_when_the_cost_ratio_moves_less_than_epsilon(tmp_path: Path) -> None:
    steps = FakeSteps([0.50, 0.40, 0.397, 0.30], LABELS)

    result = run_loop(tmp_path, steps, max_iterations=5, epsilon=0.005, log=lambda _: None)

    assert steps.built == [0, 1, 2]                       # iteration 3 never started
    assert [m["cost_ratio"] for m in result.iterations] == [0.50, 0.40, 0.397]
    assert "epsilon" in result.stopped_because
    assert result.active == 2 and iterations(tmp_path) == [0, 1, 2]


def test_loop_stops_after_max_iterations_and_resumes_where_it_stopped(tmp_path: Path) -> None:
    first = FakeSteps([0.9, 0.7, 0.5, 0.3], LABELS)
    result = run_loop(tmp_path, first, max_iterations=1, epsilon=0.005, log=lambda _: None)
    assert first.built == [0, 1] and "max_iterations" in result.stopped_because
    iteration_dir(tmp_path, 2).mkdir()                        # a crash left iteration 2 half written
    (iteration_dir(tmp_path, 2) / "thresholds.json").write_text("{")

    second = FakeSteps([0.9, 0.7, 0.5, 0.3], LABELS)
    result = run_loop(tmp_path, second, max_iterations=3, epsilon=0.005, log=lambda _: None)

    assert second.built == [2, 3]                             # 0 and 1 reused, 2 rebuilt from scratch
    assert [m["iteration"] for m in result.iterations] == [0, 1, 2, 3]
    assert json.loads((iteration_dir(tmp_path, 2) / "thresholds.json").read_text())["thresholds"]


def _served_label(run_dir: Path, artifacts: Path) -> str:
    """What the local T1 tier answers when started on the active config (a fresh load, as after a restart):
    the directories come from the config's stand-in deployments, as the proxy's handler reads them."""
    from routenlp_standins.handler import configured_standins

    groups = configured_standins(read_yaml(active_config(run_dir)))
    assert list(groups.values()) == [["classifier", "smollm2", "retrieval", "replay"]]
    (dirs,) = groups
    assert dirs == StandinDirs(artifacts.resolve(), (run_dir / "active").resolve())
    root = classifier_root(dirs, "banking77")
    assert root == (run_dir / "active").resolve()
    return ClassifierTier(root, "banking77").classify(np.zeros((1, 384), np.float32))[0][0]


def test_rollback_restores_the_previous_iterations_artifacts(tmp_path: Path) -> None:
    run_dir, artifacts = tmp_path / "run", tmp_path / "artifacts"
    run_loop(run_dir, FakeSteps([0.5, 0.4, 0.3], LABELS, artifacts), max_iterations=2, epsilon=0.005,
             log=lambda _: None)
    assert active_iteration(run_dir) == 2
    assert _served_label(run_dir, artifacts) == LABELS[2]

    assert rollback(run_dir) == 1

    assert active_iteration(run_dir) == 1
    manifest = read_manifest(iteration_dir(run_dir, 1))["files"]
    for name in ("router/weights.safetensors", "thresholds.json", "tiers/classifier/banking77.safetensors",
                 "tiers/classifier/banking77.json"):
        assert sha256_file(run_dir / "active" / name) == manifest[name]
    assert _served_label(run_dir, artifacts) == LABELS[1]
    assert "iteration 1" in active_config(run_dir).read_text().splitlines()[0]
    assert rollback(run_dir) == 0 and _served_label(run_dir, artifacts) == LABELS[0]
    with pytest.raises(VersionError, match="nothing to roll back"):
        rollback(run_dir)


def test_an_altered_iteration_is_refused(tmp_path: Path) -> None:
    run_loop(tmp_path, FakeSteps([0.5, 0.4], LABELS), max_iterations=1, epsilon=0.005, log=lambda _: None)
    (iteration_dir(tmp_path, 0) / "thresholds.json").write_text("{}")
    with pytest.raises(VersionError, match="thresholds.json"):
        activate(tmp_path, 0)
    assert active_iteration(tmp_path) == 1                    # still serving the intact one


def test_derived_proxy_config_serves_the_iteration(repo_root: Path, tmp_path: Path) -> None:
    from litellm_routenlp.config import load_settings

    out = tmp_path / "iter-3"
    path = derive_proxy_config(repo_root / "proxy_config.yaml", out, repo_root / "artifacts")
    settings, document = load_settings(path)
    assert settings.router_artifact == (out / "router").resolve()
    assert settings.thresholds_path == (out / "thresholds.json").resolve()
    assert not any(key.startswith("ROUTENLP_") for key in document.get("environment_variables") or {})
    assert [d["model_info"]["routenlp_tier"] for d in document["model_list"]] == [1, 2, 3, 4]
    for deployment in document["model_list"]:                 # every stand-in names what it serves
        assert StandinDirs.from_model_info(deployment["model_info"]) == StandinDirs(
            (repo_root / "artifacts").resolve(), out.resolve())


def test_a_serving_config_keeps_everything_but_the_standins_directories(repo_root: Path, tmp_path: Path) -> None:
    from litellm_routenlp.config import load_settings

    base_settings, base = load_settings(repo_root / "proxy_config.yaml")
    path = write_serving_config(repo_root / "proxy_config.yaml", tmp_path / "elsewhere" / "c.yaml",
                                StandinDirs(tmp_path / "artifacts"))
    settings, document = load_settings(path)
    assert settings == base_settings                          # relative paths still mean the same files
    for before, after in zip(base["model_list"], document["model_list"]):
        assert after["litellm_params"] == before["litellm_params"]
        assert after["model_info"] == {**before["model_info"], "routenlp_artifacts_dir": str(tmp_path / "artifacts")}
    with pytest.raises(VersionError, match="iter-1: no such iteration directory"):
        with serving_config(repo_root / "proxy_config.yaml", tmp_path / "a", tmp_path / "iter-1"):
            pass
    (tmp_path / "iter-1").mkdir()
    with serving_config(repo_root / "proxy_config.yaml", tmp_path / "a", tmp_path / "iter-1") as temporary:
        dirs = StandinDirs.from_model_info(read_yaml(temporary)["model_list"][0]["model_info"])
        assert dirs == StandinDirs(tmp_path / "a", tmp_path / "iter-1")
    assert not temporary.exists()


def test_a_relative_or_non_string_directory_in_model_info_is_refused_naming_the_field() -> None:
    with pytest.raises(StandinConfigError, match=r"model_list\[0\]\.model_info\.routenlp_coopt_dir .*absolute"):
        StandinDirs.from_model_info({"routenlp_coopt_dir": "artifacts/coopt/demo/active"}, "model_list[0].model_info")
    with pytest.raises(StandinConfigError, match="routenlp_artifacts_dir"):
        StandinDirs.from_model_info({"routenlp_artifacts_dir": 3})


def test_targeted_over_random_is_the_ratio_of_cost_reductions() -> None:
    def metrics(total: float, a: float) -> dict:
        return {"cost_ratio": total, "per_task": {"a": {"cost_ratio": a}}}

    start, targeted = metrics(0.5, 0.6), metrics(0.3, 0.3)
    result = comparison(start, targeted, [metrics(0.42, 0.5), metrics(0.38, 0.6)])
    assert result["cost_ratio_reduction"]["random_mean"] == pytest.approx(0.1)
    assert result["targeted_over_random"] == pytest.approx(2.0)
    assert result["per_task"]["a"]["random_each"] == [pytest.approx(0.1), pytest.approx(0.0)]
    assert result["per_task"]["a"]["targeted_over_random"] == pytest.approx(6.0)
    assert comparison(start, targeted, [metrics(0.55, 0.6)])["targeted_over_random"] is None


def test_cli_steps_read_logs_status_and_rollback(tmp_path: Path, capsys, repo_root: Path) -> None:
    from coopt.logs import read_requests
    from routenlp_cli.cli import main
    from litellm_routenlp.decision_log import DecisionLog

    log = DecisionLog(tmp_path / "decisions.jsonl", fsync=False)
    attempt = {"tier": 1, "tier_name": "T1", "uncertainty": 0.9, "cost_usd": 1e-4, "escalated": True}
    log.append({"request_id": "x", "task": "banking77", "prompt": "where is my card",
                "attempts": [attempt, {"tier": 4, "tier_name": "T4", "uncertainty": 0.0, "cost_usd": 0.06}]})
    log.close()
    assert main(["coopt", "read-logs", "--decisions", str(tmp_path / "decisions.jsonl"),
                 "--config", str(repo_root / "proxy_config.yaml"), "--out", str(tmp_path / "requests.jsonl")]) == 0
    assert read_requests(tmp_path / "requests.jsonl")[0].path == ["T1", "T4"]
    assert "banking77" in capsys.readouterr().out

    run_dir = tmp_path / "run"
    run_loop(run_dir, FakeSteps([0.5, 0.4, 0.3], LABELS), max_iterations=2, epsilon=0.005, log=lambda _: None)
    assert main(["coopt", "status", "--run-dir", str(run_dir)]) == 0
    assert "active iteration: 2" in capsys.readouterr().out
    assert main(["coopt", "rollback", "--run-dir", str(run_dir)]) == 0
    assert active_iteration(run_dir) == 1
    assert main(["coopt", "activate", "--run-dir", str(run_dir), "--iteration", "7"]) == 2   # one-line error
    assert "iter-7" in capsys.readouterr().err
