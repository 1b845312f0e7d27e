"""Shared fixtures: offline environment, the real data directory, and ONE real proxy per test session."""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return require_data()


# ----------------------------------------------------------------------------------------- needed inputs
# A test that reads the shared data or built artifacts FAILS, saying how to get them, when they are
# missing (issue 10 item 6): a skip would let a run without them look green.  Declare them with
# ``@pytest.mark.needs(data=[...], artifacts=[...])`` (or ``pytestmark``), or call the helpers.
MAKE_ARTIFACTS = "build them with `make artifacts` (routenlp build-artifacts)"


def require_data(*names: str) -> Path:
    """The shared data folder; fails the test if it, or ``names`` inside it, is missing."""
    from routenlp_core.paths import DATA_DIR_ENV, data_dir as resolve

    root = resolve()
    for path in [root] + [root / name for name in names]:
        if not path.exists():
            pytest.fail(f"shared data not found: {path} (put the shared data folder at ../shared/data beside "
                        f"the checkout, or set {DATA_DIR_ENV})", pytrace=False)
    return root


def require_artifacts(*names: str) -> Path:
    """The repo's ``artifacts/``; fails the test if ``names`` inside it are missing."""
    for name in names:
        if not (ROOT / "artifacts" / name).exists():
            pytest.fail(f"built artifact not found: {ROOT / 'artifacts' / name} ({MAKE_ARTIFACTS})", pytrace=False)
    return ROOT / "artifacts"


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "needs(data=[...], artifacts=[...]): shared data / built artifacts the test "
                                       "reads; missing ones fail the test saying how to get them")


def pytest_runtest_setup(item) -> None:
    for marker in item.iter_markers("needs"):
        unknown = set(marker.kwargs) - {"data", "artifacts"}
        if marker.args or unknown:
            pytest.fail(f"{item.nodeid}: needs() takes data=[...] and artifacts=[...] only", pytrace=False)
        if "data" in marker.kwargs:
            require_data(*marker.kwargs["data"])
        require_artifacts(*marker.kwargs.get("artifacts", ()))


# ----------------------------------------------------------------------------------------- fake upstream
@pytest.fixture(scope="module")
def start_upstream():
    """``start_upstream(**options)`` starts a fake OpenAI-compatible upstream (tests/fake_upstream.py);
    every one started is closed when the module ends, after the module's proxies have stopped."""
    from fake_upstream import FakeUpstream

    started: list[FakeUpstream] = []

    def start(**options) -> FakeUpstream:
        started.append(FakeUpstream(**options))
        return started[-1]

    yield start
    for server in started:
        server.close()


# ----------------------------------------------------------------------------------------- shared helpers
# Plain functions (tests import them: ``from conftest import write_proxy_config``) because they are
# called from parametrised lambdas and module-scoped fixtures alike.


@contextlib.contextmanager
def running_proxy(config: Path, work: Path, env: dict | None = None, timeout: float = 240):
    """A real ``litellm --config`` proxy on 127.0.0.1 serving ``config`` from the repo root, stopped on exit.

    ``decision_log`` / ``stdout_log`` name the files tests read: the configs written here put the
    decision log at ``work/decisions.jsonl``; the proxy's output goes to ``work/proxy.log``."""
    from litellm_routenlp.proxy_process import ProxyProcess

    process = ProxyProcess(config, log_path=Path(work) / "proxy.log", cwd=ROOT, env=env)
    process.start(timeout=timeout)
    process.decision_log = Path(work) / "decisions.jsonl"
    process.stdout_log = Path(work) / "proxy.log"
    try:
        yield process
    finally:
        process.stop()


def write_proxy_config(directory: Path, mutate=None, thresholds_path: Path | None = None,
                       mutate_settings=None, **settings) -> Path:
    """``proxy_config.yaml`` of the repo, served from ``directory``: the shipped router and policy file
    (or ``thresholds_path``), the decision log at ``directory/decisions.jsonl``, ``settings`` merged into
    ``routenlp_settings``; ``mutate(document)`` / ``mutate_settings(routenlp_settings)`` edit it last."""
    import yaml

    document = yaml.safe_load((ROOT / "proxy_config.yaml").read_text())
    block = document["routenlp_settings"]
    block["router_artifact"] = str(ROOT / "artifacts/router")
    block["thresholds_path"] = str(thresholds_path or ROOT / "artifacts/thresholds.json")
    block["decision_log_path"] = str(Path(directory) / "decisions.jsonl")
    block.update(settings)
    if mutate:
        mutate(document)
    if mutate_settings:
        mutate_settings(block)
    path = Path(directory) / "proxy_config.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def mock_deployments(uncertain_tiers=(), without=(), fixed_ids: bool = False) -> list[dict]:
    """One deployment per tier answering through LiteLLM's mock_response, with per-token logprobs
    (p = 0.05 at ``uncertain_tiers``: their answers escalate), prices as in proxy_config.yaml; the answer
    ids are LiteLLM's own unless ``fixed_ids`` (``mock-<tier>``)."""
    prices = {1: 0.00001, 2: 0.0001, 3: 0.0008, 4: 0.008}
    out = []
    for tier, price in prices.items():
        if tier in without:
            continue
        logprob = -3.0 if tier in uncertain_tiers else -0.001
        out.append({"model_name": "routenlp",
                    "litellm_params": {"model": f"openai/mock-t{tier}", "api_key": "not-used",
                                       "input_cost_per_token": price, "output_cost_per_token": price,
                                       "mock_response": {
                                           **({"id": f"mock-{tier}"} if fixed_ids else {}),
                                           "object": "chat.completion", "created": 1,
                                           "model": f"mock-t{tier}",
                                           "choices": [{"index": 0, "finish_reason": "stop",
                                                        "message": {"role": "assistant", "content": "card_arrival"},
                                                        "logprobs": {"content": [
                                                            {"token": "card", "logprob": logprob, "top_logprobs": []},
                                                            {"token": "_arrival", "logprob": logprob,
                                                             "top_logprobs": []}]}}],
                                           "usage": {"prompt_tokens": 12, "completion_tokens": 2,
                                                     "total_tokens": 14}}},
                    "model_info": {"id": f"mock-t{tier}", "routenlp_tier": tier,
                                   **({"routenlp_tasks": ["banking77", "clinc150"]} if tier == 1 else {}),
                                   **({"routenlp_tasks": ["bitext"]} if tier == 2 else {})}})
    return out
