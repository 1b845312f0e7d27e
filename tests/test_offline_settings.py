"""Offline settings are strict: a misspelt or invalid key in ``run.json`` is an error naming it."""

from __future__ import annotations

import json

import pytest

from coopt.loop import CooptSettings, load_settings, save_settings


def test_unknown_key_in_run_json_is_refused_with_its_name(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"run_dir": str(tmp_path), "max_iteration": 3}))
    with pytest.raises(ValueError, match=r"run\.json: max_iteration: Extra inputs are not permitted"):
        load_settings(tmp_path)


def test_invalid_value_and_broken_json_name_the_field_or_line(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"alpha": 1.5}))
    with pytest.raises(ValueError, match=r"alpha: .*less than 1"):
        load_settings(tmp_path)
    (tmp_path / "run.json").write_text('{"alpha": 0.1,\n "seed": }')
    with pytest.raises(ValueError, match=r"run\.json:2: not valid JSON"):
        load_settings(tmp_path)


def test_settings_round_trip_through_run_json(tmp_path):
    settings = CooptSettings(run_dir=str(tmp_path), tasks=("banking77",), max_failures_per_task=5)
    save_settings(settings)
    again = load_settings(tmp_path)
    assert again == settings and again.tasks == ("banking77",)


def test_bench_config_refuses_an_unknown_key_and_a_bad_value_naming_them():
    from pydantic import ValidationError

    from coopt.bench.run import BenchConfig

    with pytest.raises(ValidationError, match=r"seed\n.*Extra inputs are not permitted"):
        BenchConfig(seed=3)
    with pytest.raises(ValidationError, match=r"seeds\n.*greater than or equal to 1"):
        BenchConfig(seeds=0)
    config = BenchConfig(seeds=2)
    with pytest.raises(ValidationError, match="threads"):
        config.threads = 0  # assignment is validated too
    assert config.seeds == 2 and config.threads == 1


def test_which_tiers_coopt_distils_is_read_from_the_portfolio(tmp_path):
    """The demo portfolio declares T1 (label) and T2 (SeqKD + LoRA); a tier without `distill` is never a
    student whatever its model is called, and a tier is a student only of the tasks it serves."""
    from coopt.loop import Pipeline
    from routenlp_core.allpairs import load_portfolio

    settings = CooptSettings(run_dir=str(tmp_path))
    pipeline = Pipeline(settings)
    assert pipeline.students("banking77") == [("T1", "label")]     # T2 serves bitext only
    assert pipeline.students("bitext") == [("T2", "seqkd_lora")]
    text = (tmp_path / "p.yaml")
    text.write_text("tiers:\n  - {name: T1, model: routenlp-local/classifier}\n"
                    "  - {name: T2, model: routenlp-local/smollm2, distill: seqkd_lora}\n"
                    "  - {name: T3, model: routenlp-local/retrieval}\n  - {name: T4, model: routenlp-local/replay}\n"
                    "tasks: {banking77: {metric: accuracy, tau: 0.92}}\n")
    pipeline.portfolio = load_portfolio(text)
    assert pipeline.students("banking77") == [] and pipeline.students("bitext") == [("T2", "seqkd_lora")]
