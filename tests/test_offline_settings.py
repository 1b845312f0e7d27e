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
