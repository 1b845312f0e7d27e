"""The package layout holds: dependencies point downward, and the serving package stays small.

Layers, bottom to top (README "How the code is laid out"):

    routenlp_core  <-  litellm_routenlp  <-  routenlp_standins  <-  calibration  <-  coopt  <-  routenlp_cli

Every import between two of these packages, at module level or inside a function, must point to a
lower layer.  The serving package imports only the foundation, and nothing that trains (torch,
transformers, sklearn) — checked both in the source and in a fresh interpreter that loads the proxy hook.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["routenlp_core", "litellm_routenlp", "routenlp_standins", "calibration", "coopt", "routenlp_cli"]
TRAINING_LIBRARIES = {"torch", "transformers", "sklearn", "peft", "matplotlib"}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every absolute import in a file, function-local ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def _package_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_every_package_dependency_points_downward():
    upward = []
    for rank, package in enumerate(LAYERS):
        for path in _package_files(package):
            for line, module in _imports(path):
                if module in LAYERS and LAYERS.index(module) > rank:
                    upward.append(f"{path.relative_to(ROOT)}:{line} imports {module} (a higher layer)")
    assert not upward, "\n".join(upward)


def test_the_serving_package_imports_no_offline_module_in_its_source():
    offline = []
    for path in _package_files("litellm_routenlp"):
        for line, module in _imports(path):
            if module in TRAINING_LIBRARIES or (module in LAYERS and module not in ("routenlp_core", "litellm_routenlp")):
                offline.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not offline, "\n".join(offline)


def test_loading_the_proxy_hook_pulls_in_no_training_library(tmp_path):
    """A fresh interpreter loads the plugin exactly as the proxy does (config through ROUTENLP_CONFIG)."""
    config = tmp_path / "proxy_config.yaml"
    text = (ROOT / "proxy_config.yaml").read_text(encoding="utf-8")
    config.write_text(text.replace("artifacts/", f"{ROOT}/artifacts/").replace("logs/", f"{tmp_path}/logs/"))
    code = ("import json, sys; import litellm_routenlp.proxy_hook; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**__import__("os").environ, "ROUTENLP_CONFIG": str(config)})
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert not loaded & (TRAINING_LIBRARIES | {"coopt", "calibration", "routenlp_cli"}), sorted(
        loaded & (TRAINING_LIBRARIES | {"coopt", "calibration", "routenlp_cli"}))


def _module_level_imports(path: Path, module: str) -> set[str]:
    """Project modules ``module`` imports when it is imported (top-level statements, not functions)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        for statement in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else (node,):
            if isinstance(statement, ast.Import):
                out.update(alias.name for alias in statement.names)
            elif isinstance(statement, ast.ImportFrom):
                base = statement.module or ""
                if statement.level:
                    base = ".".join(package[:len(package) - statement.level + 1] + ([base] if base else []))
                out.add(base)
                out.update(f"{base}.{alias.name}" for alias in statement.names)  # `from pkg import module`
    return out


def test_no_import_cycle_between_modules():
    """Module-level imports form no cycle, so every module imports on its own, in any order
    (function-local imports are kept only to defer heavy libraries, never to hide a cycle)."""
    modules = {}
    for package in LAYERS:
        for path in _package_files(package):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {name: sorted(_module_level_imports(path, name) & set(modules) - {name}) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def cycle_from(name: str, path: list[str]) -> list[str]:
        state[name] = 1
        for target in graph[name]:
            if state.get(target) == 1:
                return path[path.index(target):] + [name, target] if target in path else [name, target]
            if target not in state:
                found = cycle_from(target, path + [name])
                if found:
                    return found
        state[name] = 2
        return []

    for name in sorted(graph):
        if name not in state:
            found = cycle_from(name, [])
            assert not found, " -> ".join(found)
