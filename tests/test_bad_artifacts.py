"""Bad router / threshold / encoder artifacts stop the plugin at start-up with a message naming the file
and the problem, ``fail_open: true`` routes everything to the top tier with a loud warning instead, and
nothing in the project loads an artifact with pickle.

Most cases build the callback exactly as the proxy does at start-up (``RouteNLPCallback.from_config``,
what ``litellm_routenlp.proxy_hook`` runs on import); one case starts the real proxy on a truncated
head file and checks that it exits with the message.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import yaml

from litellm_routenlp.config import SettingsError
from litellm_routenlp.plugin import RouteNLPCallback
from litellm_routenlp.router_model import RouterArtifactError, RouterModel

ROOT = Path(__file__).resolve().parent.parent
ROUTER = ROOT / "artifacts" / "router"
ENCODER = ROOT / "artifacts" / "encoder-static"   # the shipped router's encoder
MINILM = ROOT / "artifacts" / "encoder"
THRESHOLDS = ROOT / "artifacts" / "thresholds.json"


@pytest.fixture
def artifacts(tmp_path):
    """A private, writable copy of the shipped router (small) and thresholds; the encoder is shared."""
    router = tmp_path / "router"
    shutil.copytree(ROUTER, router)
    thresholds = tmp_path / "thresholds.json"
    shutil.copy(THRESHOLDS, thresholds)
    return {"router": router, "thresholds": thresholds, "dir": tmp_path}


def write_config(tmp_path: Path, router: Path, thresholds: Path, encoder_dir: Path | None = None,
                 mutate=None) -> Path:
    document = yaml.safe_load((ROOT / "proxy_config.yaml").read_text())
    settings = document["routenlp_settings"]
    settings["router_artifact"] = str(router)
    settings["thresholds_path"] = str(thresholds)
    settings["decision_log_path"] = str(tmp_path / "decisions.jsonl")
    # the copied router.json's dir_hint (artifacts/encoder) is relative: name the encoder explicitly
    settings["encoder_dir"] = str(encoder_dir or ENCODER)
    if mutate:
        mutate(document)
    path = tmp_path / "proxy_config.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:max(1, int(len(data) * keep))])


def edit_json(path: Path, change) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document, indent=2))


def refused(config: Path) -> str:
    with pytest.raises(SettingsError) as info:
        RouteNLPCallback.from_config(config)
    return str(info.value)


def test_the_unmodified_copy_loads(artifacts):
    """Control: the copies themselves are fine, so every failure below comes from the one change made."""
    callback = RouteNLPCallback.from_config(write_config(artifacts["dir"], artifacts["router"], artifacts["thresholds"]))
    assert callback.router is not None and callback.thresholds is not None


# ---------------------------------------------------------------------------------------------- router
ROUTER_BREAKAGES = {
    # name: (what to do to the copy, file that must be named, problem that must be named)
    "router.json truncated": (lambda r: truncate(r / "router.json"), "router.json", "not valid JSON"),
    "router.json missing": (lambda r: (r / "router.json").unlink(), "router.json", "missing"),
    "head.int8.onnx truncated": (lambda r: truncate(r / "head.int8.onnx"), "head.int8.onnx", "truncated"),
    "head.onnx truncated": (lambda r: truncate(r / "head.onnx", 0.9), "head.onnx", "does not match"),
    "weights.safetensors truncated": (lambda r: truncate(r / "weights.safetensors", 0.99),
                                      "weights.safetensors", "does not match"),
    "head.onnx missing": (lambda r: (r / "head.onnx").unlink(), "head.onnx", "missing"),
    "head from another run": (lambda r: shutil.copy(r / "head.int8.onnx", r / "head.onnx"), "head.onnx",
                              "from another run"),
    "router.json lists 3 tiers, head has 4": (
        lambda r: edit_json(r / "router.json", lambda d: d.update(tiers=d["tiers"][:3])),
        "weights.safetensors", "router.json lists 3 tiers"),
    "router.json lists an extra task": (
        lambda r: edit_json(r / "router.json", lambda d: d["tasks"].append("extra_task")),
        "weights.safetensors", "task_embedding.weight"),
    "router.json from a newer format": (
        lambda r: edit_json(r / "router.json", lambda d: d.update(format_version=99)),
        "router.json", "format_version 99"),
    "router.json without file hashes": (
        lambda r: edit_json(r / "router.json", lambda d: d.pop("files")), "router.json", "sha256"),
}


@pytest.mark.parametrize("name", list(ROUTER_BREAKAGES))
def test_broken_router_artifact_stops_start_up_naming_file_and_problem(artifacts, name):
    breakage, file_name, problem = ROUTER_BREAKAGES[name]
    breakage(artifacts["router"])
    message = refused(write_config(artifacts["dir"], artifacts["router"], artifacts["thresholds"]))
    assert "routenlp_settings.router_artifact" in message, message
    assert file_name in message, message
    assert problem in message, message


def test_router_for_a_different_tier_count_than_the_config_is_refused(artifacts):
    message = refused(write_config(artifacts["dir"], artifacts["router"], artifacts["thresholds"],
                                   mutate=lambda d: d["model_list"].pop()))
    assert "router predicts 4 tiers" in message and "has 3" in message, message


@pytest.fixture(scope="module")
def wrong_encoders(tmp_path_factory):
    """Encoder directories that are not the one the router was trained with."""
    base = tmp_path_factory.mktemp("encoders")
    other = base / "other_graph"          # valid ONNX graphs of the same width, but another encoder (MiniLM)
    other.mkdir()
    for name in ("encoder.json", "tokenizer.json", "model.onnx", "model.int8.onnx"):
        (other / name).symlink_to(MINILM / name)
    corrupt = base / "corrupt_graph"      # not an ONNX graph at all
    corrupt.mkdir()
    for name in ("encoder.json", "tokenizer.json"):
        shutil.copy(ENCODER / name, corrupt / name)
    (corrupt / "model.onnx").write_bytes(b"\x08\x07not really onnx")
    (corrupt / "model.int8.onnx").write_bytes((ENCODER / "model.int8.onnx").read_bytes()[:4096])
    no_tokenizer = base / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("encoder.json", "model.onnx", "model.int8.onnx"):
        (no_tokenizer / name).symlink_to(ENCODER / name)
    return {"other": other, "corrupt": corrupt, "no_tokenizer": no_tokenizer}


@pytest.mark.parametrize("which, file_name, problem", [
    ("other", "model.int8.onnx", "is not the encoder this router was trained with"),
    ("corrupt", "model.int8.onnx", "cannot be loaded by ONNX Runtime"),
    ("no_tokenizer", "tokenizer.json", "missing"),
])
def test_wrong_or_broken_encoder_is_refused(artifacts, wrong_encoders, which, file_name, problem):
    message = refused(write_config(artifacts["dir"], artifacts["router"], artifacts["thresholds"],
                                   encoder_dir=wrong_encoders[which]))
    assert file_name in message and problem in message, message


def test_router_artifact_errors_are_router_artifact_errors_when_loaded_directly(artifacts):
    """The library API (used by training/benchmarks) raises the typed error, never a bare traceback."""
    truncate(artifacts["router"] / "head.int8.onnx")
    with pytest.raises(RouterArtifactError, match="head.int8.onnx"):
        RouterModel.load(artifacts["router"], encoder_dir=ENCODER)


# ---------------------------------------------------------------------------------------------- thresholds
THRESHOLD_BREAKAGES = {
    "truncated": (lambda p: truncate(p, 0.6), "not valid JSON"),
    "empty file": (lambda p: p.write_text(""), "not valid JSON"),
    "missing": (lambda p: p.unlink(), "not found"),
    "no thresholds mapping": (lambda p: p.write_text(json.dumps({"alpha": 0.05})), "`thresholds` mapping"),
    "negative delta": (lambda p: edit_json(p, lambda d: d["thresholds"]["T1"]["banking77"].update(delta=-0.1)),
                       "thresholds.T1.banking77.delta"),
    "delta is a string": (lambda p: edit_json(p, lambda d: d["thresholds"]["T1"]["banking77"].update(delta="0.5")),
                          "thresholds.T1.banking77.delta"),
    "entry without delta": (lambda p: edit_json(p, lambda d: d["thresholds"]["T1"].update(banking77={"n": 3})),
                            "thresholds.T1.banking77"),
}


@pytest.mark.parametrize("name", list(THRESHOLD_BREAKAGES))
def test_broken_thresholds_file_stops_start_up_naming_file_and_problem(artifacts, name):
    breakage, problem = THRESHOLD_BREAKAGES[name]
    breakage(artifacts["thresholds"])
    message = refused(write_config(artifacts["dir"], artifacts["router"], artifacts["thresholds"]))
    assert "routenlp_settings.thresholds_path" in message, message
    assert "thresholds.json" in message and problem in message, message


# ---------------------------------------------------------------------------------------------- fail_open
def _fail_open(document):
    document["routenlp_settings"]["fail_open"] = True


@pytest.mark.parametrize("name", ["head.int8.onnx truncated", "router.json missing", "head from another run"])
def test_fail_open_routes_everything_to_the_top_tier_with_a_loud_warning(artifacts, caplog, name):
    ROUTER_BREAKAGES[name][0](artifacts["router"])
    config = write_config(artifacts["dir"], artifacts["router"], artifacts["thresholds"], mutate=_fail_open)
    with caplog.at_level(logging.WARNING, logger="litellm_routenlp"):
        callback = RouteNLPCallback.from_config(config)
    assert callback.router is None
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("litellm_routenlp")]
    assert warnings, "fail_open must warn"
    text = " ".join(r.getMessage() for r in warnings)
    assert "top tier" in text and "router" in text, text
    for task, text in (("banking77", "where is my card"), ("bitext", "refund please"), (None, "hello")):
        decision = callback.decide([{"role": "user", "content": text}], {"task": task} if task else {})
        assert decision.probabilities == [0.0, 0.0, 0.0, 1.0], (task, decision)


def test_fail_open_routes_to_the_top_tier_when_the_thresholds_file_is_broken(artifacts, caplog):
    """Issue 6: a broken router OR threshold file falls back to always-top routing when fail_open is set."""
    truncate(artifacts["thresholds"])
    config = write_config(artifacts["dir"], artifacts["router"], artifacts["thresholds"], mutate=_fail_open)
    with caplog.at_level(logging.WARNING, logger="litellm_routenlp"):
        callback = RouteNLPCallback.from_config(config)
    assert any("thresholds" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    decision = callback.decide([{"role": "user", "content": "where is my card"}], {"task": "banking77"})
    assert decision.probabilities[-1] == 1.0


def test_fail_open_does_not_hide_a_bad_setting(artifacts):
    """fail_open covers unusable artifacts, not configuration mistakes."""
    message = refused(write_config(artifacts["dir"], artifacts["router"], artifacts["thresholds"],
                                   mutate=lambda d: (_fail_open(d), d["routenlp_settings"].update(max_hops=-1))))
    assert "routenlp_settings.max_hops" in message


# ---------------------------------------------------------------------------------------------- real proxy
@pytest.mark.proxy
def test_real_proxy_refuses_to_start_on_a_truncated_router_file(artifacts):
    from litellm_routenlp.proxy_process import ProxyProcess

    truncate(artifacts["router"] / "head.int8.onnx")
    config = write_config(artifacts["dir"], artifacts["router"], artifacts["thresholds"])
    log = artifacts["dir"] / "proxy.log"
    proxy = ProxyProcess(config, log_path=log, cwd=ROOT, env={"ROUTENLP_STANDINS_WARMUP": "0"})
    with pytest.raises(RuntimeError, match="exited"):
        proxy.start(timeout=180)
    text = log.read_text(errors="replace")
    lines = [line for line in text.splitlines() if "RouteNLP: refusing to start" in line]
    assert lines, text[-2000:]
    # one line says which file and what is wrong with it (uvicorn then logs the aborted start-up)
    assert "head.int8.onnx" in lines[0] and "truncated" in lines[0], lines[0]
    assert proxy.process.returncode != 0


# ---------------------------------------------------------------------------------------------- no pickle
SCANNED = ("litellm_routenlp", "routenlp_standins", "coopt", "calibration")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
PICKLE_TEXT = re.compile(r"\b(import\s+(c?pickle|dill|cloudpickle|joblib|shelve)|from\s+(c?pickle|dill|cloudpickle|"
                         r"joblib|shelve)\s+import|pickle\.loads?\(|joblib\.load\(|torch\.load\(|"
                         r"allow_pickle\s*=\s*True|weights_only\s*=\s*False)")


def _code_without_comments_and_docstrings(source: str) -> str:
    """Source text with comments and string literals blanked, so prose such as 'no pickle' is not a hit."""
    import io
    import tokenize

    out = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in (tokenize.COMMENT, tokenize.STRING):
            continue
        out.append(token.string)
    return " ".join(out)


def _pickle_uses(path: Path) -> list[str]:
    source = path.read_text()
    hits = []
    tree = ast.parse(source, filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            hits += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            hits.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = node.func
            name = ast.unparse(func)
            if name in ("torch.load", "joblib.load", "pickle.load", "pickle.loads", "np.load", "numpy.load",
                        "torch.serialization.load", "pd.read_pickle", "pandas.read_pickle"):
                if name in ("np.load", "numpy.load"):
                    flagged = [k for k in node.keywords if k.arg == "allow_pickle"
                               and not (isinstance(k.value, ast.Constant) and k.value.value is False)]
                    if flagged:
                        hits.append(f"{name}(allow_pickle=...) line {node.lineno}")
                else:
                    hits.append(f"{name}(...) line {node.lineno}")
            for keyword in node.keywords:
                if keyword.arg == "weights_only" and not (isinstance(keyword.value, ast.Constant)
                                                          and keyword.value.value is True):
                    hits.append(f"weights_only={ast.unparse(keyword.value)} line {node.lineno}")
    for match in PICKLE_TEXT.finditer(_code_without_comments_and_docstrings(source)):
        hits.append(f"text: {match.group(0)}")
    return hits


def test_no_module_loads_anything_with_pickle():
    files = [p for package in SCANNED for p in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) > 20, f"scanned too few files: {files}"
    offenders = {str(p.relative_to(ROOT)): hits for p in files if (hits := _pickle_uses(p))}
    assert not offenders, f"pickle-capable loading found: {offenders}"


def test_the_scanner_catches_what_it_is_meant_to(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import joblib\nimport numpy as np\nimport torch\n"
                   "x = np.load('a.npy', allow_pickle=True)\ny = torch.load('w.pt')\n"
                   "z = joblib.load('m.joblib')\n# pickle in a comment is fine\n")
    hits = _pickle_uses(bad)
    assert any("joblib" in h for h in hits) and any("torch.load" in h for h in hits) \
        and any("allow_pickle" in h for h in hits), hits
    good = tmp_path / "good.py"
    good.write_text('"""No pickle anywhere: torch.load( is banned."""\nimport numpy as np\nx = np.load("a.npy")\n')
    assert _pickle_uses(good) == []


def test_shipped_artifacts_use_no_pickle_capable_format():
    """Every artifact file is safetensors / ONNX / JSON / YAML / text: nothing a loader could unpickle."""
    banned = {".pkl", ".pickle", ".joblib", ".pt", ".pth", ".bin", ".ckpt", ".npy", ".npz"}
    found = [str(p.relative_to(ROOT)) for p in (ROOT / "artifacts").rglob("*") if p.is_file()
             and p.suffix.lower() in banned]
    assert not found, found
