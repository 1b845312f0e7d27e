import textwrap

import pytest

from litellm_routenlp.config import RouteNLPSettings, SettingsError, load_settings
from litellm_routenlp.request_fields import RequestError, query_text, resolve_task, validate_request


def _write(tmp_path, body):
    path = tmp_path / "proxy_config.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def test_settings_resolve_relative_paths_against_the_config(tmp_path):
    path = _write(tmp_path, """
        routenlp_settings:
          router_artifact: artifacts/router
          tasks: {bitext: {kind: generation, tau: 0.65}}
        """)
    settings, _ = load_settings(path)
    assert settings.router_artifact == (tmp_path / "artifacts/router").resolve()
    assert settings.tasks["bitext"].cascade_streaming == "buffer"
    assert settings.max_hops == 3


@pytest.mark.parametrize("bad, named", [
    ("max_hops: -1", "routenlp_settings.max_hops"),
    ("route_confidence: 1.5", "routenlp_settings.route_confidence"),
    ("unknown_task_policy: guess", "routenlp_settings.unknown_task_policy"),
    ("decision_log_durability: eventually", "routenlp_settings.decision_log_durability"),
    ("router_execution: subprocess", "routenlp_settings.router_execution"),
    ("typo_setting: 1", "routenlp_settings.typo_setting"),
])
def test_bad_setting_is_named(tmp_path, bad, named):
    path = _write(tmp_path, f"""
        routenlp_settings:
          router_artifact: r
          {bad}
          tasks: {{bitext: {{kind: generation, tau: 0.65}}}}
        """)
    with pytest.raises(SettingsError, match=named.replace(".", r"\.")):
        load_settings(path)


def test_bad_task_setting_is_named(tmp_path):
    path = _write(tmp_path, """
        routenlp_settings:
          router_artifact: r
          tasks: {bitext: {kind: generation, tau: 1.7, cascade_streaming: sometimes}}
        """)
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    assert "routenlp_settings.tasks.bitext.tau" in str(info.value)
    assert "routenlp_settings.tasks.bitext.cascade_streaming" in str(info.value)


def _settings(**overrides):
    base = {"router_artifact": "r", "tasks": {"bitext": {"kind": "generation", "tau": 0.65}}}
    return RouteNLPSettings.model_validate({**base, **overrides})


def test_task_policy():
    settings = _settings()
    assert resolve_task({"task": "bitext"}, settings) == ("bitext", "known")
    assert resolve_task({"requester_metadata": {"task": "bitext"}}, settings) == ("bitext", "known")
    assert resolve_task({}, settings) == (None, "missing")
    assert resolve_task({"task": "poetry"}, settings) == ("poetry", "unknown")
    with pytest.raises(RequestError, match="metadata.task is required"):
        resolve_task({}, _settings(require_task=True))
    with pytest.raises(RequestError, match="unknown task 'poetry'"):
        resolve_task({"task": "poetry"}, _settings(unknown_task_policy="reject"))
    with pytest.raises(RequestError, match="non-empty string"):
        resolve_task({"task": 7}, settings)


def test_request_validation_and_query_text():
    messages = [{"role": "system", "content": "be nice"},
                {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "image_url"}]}]
    assert query_text(messages) == "hello"
    validate_request({"messages": messages})
    with pytest.raises(RequestError, match="n > 1"):
        validate_request({"messages": messages, "n": 2})
    with pytest.raises(RequestError, match="non-empty list"):
        validate_request({"messages": []})
    with pytest.raises(RequestError, match="must contain text"):
        validate_request({"messages": [{"role": "user", "content": "  "}]})
    with pytest.raises(RequestError, match="metadata must be an object"):
        validate_request({"messages": messages, "metadata": "x"})


@pytest.mark.parametrize("param, value", [("tools", [{"type": "function", "function": {"name": "f"}}]),
                                          ("tool_choice", "auto"), ("functions", [{"name": "f"}]),
                                          ("logit_bias", {"50256": -100})])
def test_tool_calls_and_unsupported_parameters_are_refused(param, value):
    with pytest.raises(RequestError, match=f"`{param}` is not supported") as info:
        validate_request({"messages": [{"role": "user", "content": "hi"}], param: value})
    assert info.value.param == param


@pytest.mark.parametrize("param, value", [("max_tokens", "ten"), ("max_tokens", 0), ("max_completion_tokens", -5),
                                          ("max_tokens", True), ("guardrails", ["\u0100"])])
def test_malformed_numbers_and_guardrail_names_are_refused(param, value):
    with pytest.raises(RequestError) as info:
        validate_request({"messages": [{"role": "user", "content": "hi"}], param: value})
    assert info.value.param == param


@pytest.mark.parametrize("where", ["metadata", "litellm_metadata"])
def test_guardrail_names_moved_into_metadata_by_the_proxy_are_checked_too(where):
    """The proxy moves a body-level `guardrails` into the metadata before the pre-call hook runs."""
    with pytest.raises(RequestError) as info:
        validate_request({"messages": [{"role": "user", "content": "hi"}], where: {"guardrails": ["\u0100"]}})
    assert info.value.param == "guardrails"
