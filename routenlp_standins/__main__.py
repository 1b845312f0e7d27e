"""Command line: ``python -m routenlp_standins build|warmup``.

``build`` writes the stand-in tiers' artifacts (skipping what exists unless ``--force``);
``warmup`` loads every tier the way the proxy does at start-up and prints the timings (load time,
SmolLM2 tokens/s), which is how the figures in the docs are measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from routenlp_standins.artifacts import ARTIFACTS_ENV, default_artifacts_root
from routenlp_standins.build import DEFAULT_TASKS, BuildSettings, build_all


def _limit(value: str) -> Optional[int]:
    return None if value.lower() in ("all", "none") else int(value)


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

    defaults = BuildSettings()
    parser = argparse.ArgumentParser(prog="python -m routenlp_standins", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the stand-in tiers' artifacts")
    warm = sub.add_parser("warmup", help="load all tiers and report timings")
    for command in (build, warm):
        command.add_argument("--artifacts", default=None,
                             help=f"artifacts root (default: ${ARTIFACTS_ENV} or <project>/artifacts)")
        command.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    build.add_argument("--force", action="store_true", help="rebuild artifacts that already exist")
    build.add_argument("--classifier-train-limit", type=_limit, default=defaults.classifier_train_limit,
                       help="train rows for the classifier head ('all' for the whole split)")
    build.add_argument("--index-train-limit", type=_limit, default=defaults.index_train_limit,
                       help="train rows in the retrieval index (default: all)")
    build.add_argument("--eval-limit", type=_limit, default=defaults.eval_limit,
                       help="test rows for the accuracies recorded in the JSON")
    build.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    root = Path(args.artifacts) if args.artifacts else default_artifacts_root()

    if args.command == "build":
        settings = BuildSettings(classifier_train_limit=args.classifier_train_limit,
                                 index_train_limit=args.index_train_limit, eval_limit=args.eval_limit, seed=args.seed)
        report = build_all(root, tasks=args.tasks, force=args.force, settings=settings,
                           log=lambda line: print(line, file=sys.stderr))
    else:
        # imports litellm (seconds), after the offline switches above that it reads at import
        from routenlp_standins.handler import LocalTiers

        report = LocalTiers(root).warmup(tasks=args.tasks)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
