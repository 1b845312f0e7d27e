"""`routenlp label` with the real tiers of proxy_config.yaml (local stand-ins called through an
in-process litellm.Router, as the proxy calls them) on a few banking77 test queries.

banking77 is fast to label: T2 (SmolLM2) is restricted to bitext by `model_info.routenlp_tasks`, so
it is recorded as "not served" without being called; T1 (classifier), T3 (retrieval) and T4
(replay) answer in milliseconds once loaded.  The commands run as subprocesses from a temporary
directory; the stand-ins find the built artifacts through ROUTENLP_ARTIFACTS_DIR.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from routenlp_core.allpairs import load_portfolio, read_allpairs
from routenlp_core.paths import project_root

ROOT = project_root()
ARTIFACTS = ROOT / "artifacts"
CONFIG = ROOT / "proxy_config.yaml"
PORTFOLIO = ARTIFACTS / "portfolio.yaml"
pytestmark = pytest.mark.needs(data=["banking77"], artifacts=["tiers", "encoder/model.onnx"])  # missing: fail, say how


def label(config: Path, out: Path, limit: int, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                "TOKENIZERS_PARALLELISM": "false", "ROUTENLP_ARTIFACTS_DIR": str(ARTIFACTS)})
    return subprocess.run([sys.executable, "-m", "routenlp_cli.cli", "label", "--config", str(config),
                           "--task", "banking77", "--split", "test", "--limit", str(limit), "--out", str(out)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]


def _expected_ids(limit: int) -> set[str]:
    from routenlp_core.tasks import get_task

    return {example.id for example in get_task("banking77").load("test", limit=limit, seed=0)}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, bytes]:
    folder = tmp_path_factory.mktemp("label")
    out = folder / "labels.jsonl"
    result = label(CONFIG, out, 4, folder)
    return out, result, out.read_bytes() if out.exists() else b""


def test_every_record_is_valid_allpairs_data_for_the_demo_portfolio(first_run):
    out, result, _ = first_run
    assert result.returncode == 0, result.stderr
    assert "labelled 4 new queries" in result.stdout
    records = read_allpairs(out, load_portfolio(PORTFOLIO))  # raises on any invalid field
    assert len(records) == 4
    assert {record.id for record in records} == _expected_ids(4)
    assert all(record.task == "banking77" and record.prompt and record.reference for record in records)


def test_served_tiers_answer_with_cost_latency_and_uncertainty(first_run):
    out, _, _ = first_run
    records = read_allpairs(out, load_portfolio(PORTFOLIO))
    for record in records:
        for tier in ("T1", "T3", "T4"):
            result = record.tiers[tier]
            assert result.error is None, (record.id, tier, result.error)
            assert isinstance(result.output, str) and result.output.strip()
            assert result.cost_usd > 0  # LiteLLM priced it with the deployment's per-token prices
            assert result.latency_ms is not None and result.latency_ms > 0
            assert result.uncertainty is not None and 0.0 <= result.uncertainty <= 1.0
            assert result.quality in (0.0, 1.0)  # banking77 is scored by exact-label accuracy
        assert record.tiers["T4"].uncertainty == 0.0  # replay answers carry logprob 0 per token
        # prices grow with the tier ($0.01, $0.80, $8.00 per 1K tokens) on the same query
        assert record.tiers["T1"].cost_usd < record.tiers["T3"].cost_usd < record.tiers["T4"].cost_usd
    assert sum(record.tiers["T4"].quality for record in records) >= 3  # T4 replays the reference answers


def test_a_tier_that_does_not_serve_the_task_is_recorded_not_called(first_run):
    out, _, _ = first_run
    for record in read_allpairs(out, load_portfolio(PORTFOLIO)):
        t2 = record.tiers["T2"]
        assert t2.error is not None and t2.error.startswith("not served")
        assert "banking77" in t2.error
        assert t2.output is None and t2.quality == 0.0 and t2.cost_usd == 0.0


def test_a_second_run_with_a_larger_limit_only_adds_the_new_queries(first_run):
    out, result, first_bytes = first_run
    assert result.returncode == 0, result.stderr
    first_ids = _ids(out)
    assert set(first_ids) <= _expected_ids(7)  # the seeded sample of 7 contains the sample of 4
    again = label(CONFIG, out, 7, out.parent)
    assert again.returncode == 0, again.stderr
    assert "labelled 3 new queries" in again.stdout
    ids = _ids(out)
    assert len(ids) == 7 and len(set(ids)) == 7
    assert set(ids) == _expected_ids(7)
    assert out.read_bytes().startswith(first_bytes)  # the first four lines were not rewritten
    assert len(read_allpairs(out, load_portfolio(PORTFOLIO))) == 7
    nothing = label(CONFIG, out, 7, out.parent)  # everything done: nothing is called again
    assert nothing.returncode == 0 and "labelled 0 new queries" in nothing.stdout
    assert len(_ids(out)) == 7


def test_a_failing_tier_is_recorded_per_query_and_the_run_completes(tmp_path):
    document = yaml.safe_load(CONFIG.read_text())
    broken = [d for d in document["model_list"] if d["model_info"].get("routenlp_tier") == 3]
    assert len(broken) == 1
    broken[0]["litellm_params"]["model"] = "routenlp-local/nonexistent"
    config = tmp_path / "broken_config.yaml"
    config.write_text(yaml.safe_dump(document, sort_keys=False))
    out = tmp_path / "labels.jsonl"
    result = label(config, out, 3, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "labelled 3 new queries" in result.stdout
    records = read_allpairs(out, load_portfolio(PORTFOLIO))
    assert len(records) == 3
    for record in records:
        t3 = record.tiers["T3"]
        assert t3.error is not None and not t3.error.startswith("not served")
        assert "nonexistent" in t3.error  # the provider's message names the bad deployment
        assert t3.output is None and t3.quality == 0.0 and t3.uncertainty is None
        # the other tiers were still asked and answered
        for tier in ("T1", "T4"):
            assert record.tiers[tier].error is None and record.tiers[tier].output
