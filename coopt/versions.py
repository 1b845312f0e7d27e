"""Versioned iteration artifacts: one immutable directory per co-optimisation iteration, and rollback.

Layout of a run (``artifacts/coopt/<run>/``)::

    iter-0/                  the starting portfolio (base tiers), its router and thresholds
    iter-N/
      router/  thresholds.json          retrained router, recalibrated thresholds
      tiers/classifier/<task>.*         distilled T1 heads (every head distilled so far)
      lora/smollm2/                     the T2 LoRA adapter (PEFT format)
      proxy_config.yaml                 a proxy config serving exactly this iteration
      inputs/  ...                      what produced it: traffic log, failures, clusters, distillation data
      labels/  metrics.json ...         relabelled all-pairs, the Table-4 figures
      manifest.json                     sha256 of every file; written last (its presence = complete)
    active/                  a copy of the serving files of the active iteration (what a proxy loads)
    ACTIVE.json              {"iteration": N, "history": [0, 1, ..., N]}

An iteration directory is never modified once its manifest exists.  :func:`activate` installs an
iteration's serving files into ``active/`` (build in a temp dir, verify every hash against the
manifest, swap), :func:`rollback` re-installs the previous entry of the history.  A proxy serving the
run is started with ``litellm --config artifacts/coopt/<run>/active/proxy_config.yaml`` and picks up a
rollback at its next start.

Which directories the local stand-in tiers serve is written into each generated config, in the
``model_info`` of every ``routenlp-local`` deployment (:class:`routenlp_standins.artifacts.StandinDirs`);
in-process callers (labelling, failure scoring, teacher answers) build their tiers from such a config
too, so nothing is handed over through environment variables.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import yaml

from litellm_routenlp.config import read_yaml, settings_from_mapping
from routenlp_core.hashing import sha256_file
from routenlp_standins.artifacts import StandinDirs, is_standin

PREFIX = "iter-"
MANIFEST = "manifest.json"
ACTIVE = "ACTIVE.json"
ACTIVE_DIR = "active"
SERVING = ("router", "thresholds.json", "tiers", "lora", "proxy_config.yaml")   # what a proxy loads
CONFIG_NAME = "proxy_config.yaml"


class VersionError(ValueError):
    """An iteration is missing, incomplete or altered (the message names it)."""


def iteration_dir(run_dir: str | os.PathLike[str], n: int) -> Path:
    return Path(run_dir) / f"{PREFIX}{n}"


def is_complete(directory: Path) -> bool:
    return (directory / MANIFEST).is_file()


def iterations(run_dir: str | os.PathLike[str]) -> list[int]:
    """Numbers of the complete iterations of a run, ascending."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    out = []
    for child in root.iterdir():
        number = child.name[len(PREFIX):]
        if child.is_dir() and child.name.startswith(PREFIX) and number.isdigit() and is_complete(child):
            out.append(int(number))
    return sorted(out)




def _files(directory: Path) -> dict[str, str]:
    return {str(path.relative_to(directory)): sha256_file(path) for path in sorted(directory.rglob("*"))
            if path.is_file() and path.name != MANIFEST}


def write_manifest(directory: Path, info: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Hash every file of ``directory`` and write ``manifest.json`` last: the iteration is complete."""
    manifest = {"iteration": directory.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "files": _files(directory), **(info or {})}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, directory / MANIFEST)
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise VersionError(f"{directory}: no {MANIFEST} (the iteration did not finish)")
    return json.loads(path.read_text(encoding="utf-8"))


def verify(directory: Path, only: Optional[tuple[str, ...]] = None) -> list[str]:
    """Files whose hash differs from the manifest, or that are missing (empty list: intact)."""
    recorded = read_manifest(directory)["files"]
    problems = []
    for name, digest in recorded.items():
        if only is not None and not any(name == item or name.startswith(item + "/") for item in only):
            continue
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{name}: sha256 differs from the manifest")
    return problems


def point_standins(document: Mapping[str, Any], dirs: StandinDirs) -> dict[str, Any]:
    """A copy of a proxy-config document whose stand-in deployments serve ``dirs`` (their ``model_info``
    names the directories, absolute); every other deployment and setting is unchanged."""
    out = copy.deepcopy(dict(document))
    for deployment in out.get("model_list") or []:
        if isinstance(deployment, dict) and is_standin(deployment):
            info = {key: value for key, value in (deployment.get("model_info") or {}).items()
                    if key not in ("routenlp_artifacts_dir", "routenlp_coopt_dir")}
            deployment["model_info"] = {**info, **dirs.as_model_info()}
    return out


def write_serving_config(base_config: str | os.PathLike[str], out_path: Path, dirs: StandinDirs) -> Path:
    """Write ``out_path``: ``base_config`` with its stand-in tiers serving ``dirs`` (for in-process callers
    that build their tiers from a config: ``coopt label``, failure scoring, teacher answers)."""
    base = Path(base_config).resolve()
    document = point_standins(read_yaml(base), dirs)
    if "routenlp_settings" in document:  # the copy lives elsewhere: its paths must not move
        document["routenlp_settings"] = _absolute_paths(document["routenlp_settings"], base)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(f"# Generated from {base}: its stand-in tiers serve {dirs.as_model_info()}\n"
                        + yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return out_path


SETTINGS_PATHS = ("router_artifact", "encoder_dir", "thresholds_path", "decision_log_path", "verdicts_path")


def _absolute_paths(settings: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """``routenlp_settings`` of the config ``base`` with every path (given or default, relative to
    ``base``'s folder) written out absolute, so a copy of it elsewhere still names the same files."""
    resolved = settings_from_mapping(settings, str(base), base.parent)
    out = dict(settings)
    for key in SETTINGS_PATHS:
        value = getattr(resolved, key)
        if value is not None:
            out[key] = str(value)
    if resolved.adaptation is not None:
        out["adaptation"] = {**dict(settings["adaptation"]), "log_path": str(resolved.adaptation.log_path)}
    return out


@contextlib.contextmanager
def serving_config(base_config: str | os.PathLike[str], artifacts_root: str | os.PathLike[str],
                   coopt_dir: Optional[str | os.PathLike[str]] = None) -> Iterator[Path]:
    """A temporary copy of ``base_config`` whose stand-ins serve ``artifacts_root`` and, if given,
    ``coopt_dir``'s distilled tiers (what ``routenlp coopt failures|select --serve DIR`` ask for)."""
    if coopt_dir is not None and not Path(coopt_dir).is_dir():
        raise VersionError(f"{coopt_dir}: no such iteration directory (its distilled tiers were asked for)")
    dirs = StandinDirs(Path(artifacts_root), Path(coopt_dir) if coopt_dir is not None else None)
    with tempfile.TemporaryDirectory(prefix="routenlp-serving-") as scratch:
        yield write_serving_config(base_config, Path(scratch) / CONFIG_NAME, dirs)


def derive_proxy_config(base_config: str | os.PathLike[str], out_dir: Path, artifacts_root: str | os.PathLike[str],
                        coopt_dir: Optional[Path] = None) -> Path:
    """Write ``out_dir/proxy_config.yaml``: the base config serving this directory's router, thresholds and tiers.

    ``router_artifact``/``thresholds_path`` become relative to ``out_dir`` (they live there); the stand-in
    deployments' ``model_info`` names ``artifacts_root`` (the base artifacts) and ``coopt_dir`` (default
    ``out_dir``: its distilled tiers), as absolute paths.  Every other path (decision and verdict logs,
    encoder) names the base config's file, absolute: a proxy never writes into an iteration.
    """
    base = Path(base_config).resolve()
    document = point_standins(read_yaml(base), StandinDirs(Path(artifacts_root), coopt_dir or out_dir))
    # logs and the encoder stay where the base config puts them (never inside the immutable iteration)
    settings = _absolute_paths(document.get("routenlp_settings") or {}, base)
    settings["router_artifact"] = "router"
    settings["thresholds_path"] = "thresholds.json"
    document["routenlp_settings"] = settings
    header = (f"# Generated by `routenlp coopt` from {base}: serves the router, thresholds and distilled tiers\n"
              f"# of this directory.  Start it with: litellm --config {out_dir.resolve() / CONFIG_NAME}\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CONFIG_NAME
    path.write_text(header + yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def _read_active(run_dir: Path) -> dict[str, Any]:
    path = run_dir / ACTIVE
    if not path.is_file():
        return {"iteration": None, "history": []}
    return json.loads(path.read_text(encoding="utf-8"))


def active_iteration(run_dir: str | os.PathLike[str]) -> Optional[int]:
    return _read_active(Path(run_dir)).get("iteration")


def active_config(run_dir: str | os.PathLike[str]) -> Path:
    """The proxy config serving the active iteration."""
    path = Path(run_dir) / ACTIVE_DIR / CONFIG_NAME
    if not path.is_file():
        raise VersionError(f"{Path(run_dir)}: no active iteration (run `routenlp coopt activate`)")
    return path


def _install(run_dir: Path, n: int) -> Path:
    source = iteration_dir(run_dir, n)
    if not is_complete(source):
        raise VersionError(f"{source}: not a complete iteration (no {MANIFEST})")
    problems = verify(source, only=SERVING)
    if problems:
        raise VersionError(f"{source}: altered since it was written: " + "; ".join(problems[:5]))
    staging = run_dir / (ACTIVE_DIR + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for item in SERVING:
        path = source / item
        if path.is_dir():
            shutil.copytree(path, staging / item)
        elif path.is_file() and item != CONFIG_NAME:
            shutil.copy2(path, staging / item)
    config = yaml.safe_load((source / CONFIG_NAME).read_text(encoding="utf-8")) or {}
    config = _repoint_coopt(config, (run_dir / ACTIVE_DIR).resolve())
    (staging / CONFIG_NAME).write_text(f"# Active co-optimisation iteration {n} (copied from {source.resolve()}).\n"
                                       + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    recorded = read_manifest(source)["files"]
    for name, digest in recorded.items():  # the copy must be byte-identical to what the manifest certifies
        if any(name == item or name.startswith(item + "/") for item in SERVING if item != CONFIG_NAME):
            if sha256_file(staging / name) != digest:
                raise VersionError(f"copy of {source / name} does not match its manifest")
    target = run_dir / ACTIVE_DIR
    previous = run_dir / (ACTIVE_DIR + ".old")
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        target.replace(previous)
    staging.replace(target)
    shutil.rmtree(previous, ignore_errors=True)
    return target


def _repoint_coopt(document: Mapping[str, Any], active: Path) -> dict[str, Any]:
    """The iteration's config with its stand-ins serving the distilled tiers from ``active`` (the copy a
    proxy loads) instead of the iteration directory; the base artifacts stay those it names."""
    out = copy.deepcopy(dict(document))
    for index, deployment in enumerate(out.get("model_list") or []):
        if isinstance(deployment, dict) and is_standin(deployment):
            dirs = StandinDirs.from_model_info(deployment.get("model_info"), f"model_list[{index}].model_info")
            deployment["model_info"] = {**(deployment.get("model_info") or {}),
                                        **StandinDirs(dirs.artifacts, active).as_model_info()}
    return out


def _write_active(run_dir: Path, state: dict[str, Any]) -> None:
    tmp = run_dir / (ACTIVE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, run_dir / ACTIVE)


def activate(run_dir: str | os.PathLike[str], n: int) -> Path:
    """Make iteration ``n`` the active one (installs its serving files into ``active/``)."""
    run_dir = Path(run_dir)
    target = _install(run_dir, n)
    state = _read_active(run_dir)
    history = [i for i in state.get("history", [])]
    if not history or history[-1] != n:
        history.append(n)
    _write_active(run_dir, {"iteration": n, "history": history, "activated": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return target


def rollback(run_dir: str | os.PathLike[str]) -> int:
    """Re-install the iteration that was active before the current one; returns its number."""
    run_dir = Path(run_dir)
    state = _read_active(run_dir)
    history = list(state.get("history", []))
    if len(history) < 2:
        raise VersionError(f"{run_dir}: nothing to roll back to (history {history})")
    history.pop()
    previous = history[-1]
    _install(run_dir, previous)
    _write_active(run_dir, {"iteration": previous, "history": history,
                            "activated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rolled_back_from": state["iteration"]})
    return previous
