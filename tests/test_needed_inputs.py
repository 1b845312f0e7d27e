"""A test that needs the shared data or built artifacts fails, saying how to get them, instead of
skipping (issue 10 item 6): a run on a machine without them must not look green.

* the helpers in conftest.py (``require_data``, ``require_artifacts``) and the ``needs`` marker fail
  with the path and the command;
* no test file skips except where ``ALLOWED_SKIPS`` says why skipping is right.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_artifacts, require_data

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SKIP_CALLS = {"skip", "skipif", "importorskip"}
# (file, a fragment of the reason): skips that are right, and why
ALLOWED_SKIPS = {
    # a system server, not data or an artifact: .ci/run installs it, which needs root; the reason says how
    ("test_coopt_logs.py", "PostgreSQL server binaries"),
}


def test_require_data_fails_naming_the_folder_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTENLP_DATA_DIR", str(tmp_path))
    assert require_data() == tmp_path
    with pytest.raises(pytest.fail.Exception, match=r"shared data not found: .*cascades_9llm .*ROUTENLP_DATA_DIR"):
        require_data("cascades_9llm")
    monkeypatch.setenv("ROUTENLP_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(pytest.fail.Exception, match="nowhere"):
        require_data()


def test_require_artifacts_fails_naming_the_file_and_the_make_target():
    assert require_artifacts("router") == ROOT / "artifacts"   # ships in git
    with pytest.raises(pytest.fail.Exception, match=r"artifacts/no-such-file .*`make artifacts`"):
        require_artifacts("router", "no-such-file")


def test_the_needs_marker_fails_a_test_without_its_data(tmp_path):
    """A real pytest run of a data test with an empty data folder: failed (an error at setup), not skipped."""
    env = {**os.environ, "ROUTENLP_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
                           "tests/test_multimodel.py::test_cascades_medmcqa_matches_the_source"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-2000:]
    assert f"shared data not found: {tmp_path / 'cascades_9llm'}" in out and "1 error" in out, out[-2000:]
    assert "skipped" not in out, out[-2000:]


def _skips(path: Path) -> list[tuple[int, str]]:
    """(line, source text) of every pytest.skip / skipif / importorskip call in a file."""
    source = path.read_text(encoding="utf-8")
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SKIP_CALLS:
            found.append((node.lineno, ast.get_source_segment(source, node) or ""))
    return found


def test_no_test_skips_without_a_reason_saying_why_that_is_right():
    offending = []
    for path in sorted(TESTS.glob("*.py")):
        for line, text in _skips(path):
            if not any(path.name == name and fragment in text for name, fragment in ALLOWED_SKIPS):
                offending.append(f"tests/{path.name}:{line}: {text[:120]}")
    assert not offending, ("skips a test instead of failing it; use @pytest.mark.needs(data=..., artifacts=...) "
                           "(conftest.py) or add the case to ALLOWED_SKIPS with why:\n" + "\n".join(offending))
