"""``routenlp``: the offline commands around the proxy plugin.

    routenlp export-encoder   [--out artifacts/encoder]
    routenlp build-artifacts  [--artifacts artifacts] [--router]
    routenlp label            --config proxy_config.yaml --task banking77 [--split train] [--limit N] --out F.jsonl
    routenlp train            --data F.jsonl [--data G.jsonl] --portfolio P.yaml --out DIR [--mode frozen|finetune]
    routenlp calibrate        --data F.jsonl --portfolio P.yaml [--router DIR] [--alpha 0.05] --out thresholds.json
    routenlp bench            --data F.jsonl [--data G.jsonl] --portfolio P.yaml --out DIR [--seeds 5] [--split 0.6,0.2,0.2]
    routenlp bench            --dataset cascades_9llm|routerbench|routellm|all --out DIR  (the shared sets)

Heavy dependencies (torch, transformers, scikit-learn) are imported only by the command that needs
them, so ``routenlp --help`` and the proxy stay light.  Errors are printed as one line naming the
argument or file, with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

DEMO_TASKS = ("banking77", "clinc150", "bitext")
DEMO_PORTFOLIO = Path("artifacts/portfolio.yaml")


def _cmd_export_encoder(args: argparse.Namespace) -> int:
    from coopt.export_encoder import export_encoder

    out = export_encoder(args.out)
    print(f"encoder written to {out}")
    return 0


def _cmd_label(args: argparse.Namespace) -> int:
    from coopt.label import label_task

    count = label_task(args.config, args.task, args.split, args.limit, args.out, seed=args.seed,
                       concurrency=args.concurrency, max_tokens=args.max_tokens)
    print(f"labelled {count} new queries -> {args.out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from coopt.allpairs import load_portfolio, read_allpairs
    from coopt.train_router import train_router

    portfolio = load_portfolio(args.portfolio)
    records = [record for path in args.data for record in read_allpairs(path, portfolio)]
    report = train_router(records, portfolio, args.out, mode=args.mode, encoder_dir=args.encoder,
                          seed=args.seed, epochs=args.epochs)
    print(f"router written to {report.out_dir} ({report.mode} encoder): {report.n_train} train / "
          f"{report.n_val} val queries, {report.epochs_run} epochs (best {report.best_epoch}), "
          f"{report.train_seconds:.1f}s")
    print(f"val accuracy {report.val_accuracy:.3f} vs always-majority {report.majority_baseline_accuracy:.3f}; "
          f"val cross-entropy {report.val_route_ce:.3f} vs label prior {report.prior_baseline_ce:.3f}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from calibration.calibrate import calibrate
    from coopt.allpairs import load_portfolio

    result = calibrate(args.data, load_portfolio(args.portfolio), router_artifact=args.router,
                       alpha=args.alpha, n_calib=args.n, out_path=args.out)
    _print_thresholds(result)
    return 0


def _print_thresholds(result: dict) -> None:
    print(f"{'tier':<5} {'task':<14} {'n':>5} {'delta':>8} {'violation':>9}  wilson_95")
    for tier, per_task in result.get("thresholds", {}).items():
        for task, entry in per_task.items():
            delta = entry.get("delta")
            ci = entry.get("wilson_95") or [float("nan"), float("nan")]
            print(f"{tier:<5} {task:<14} {entry.get('n', 0):>5} "
                  f"{'-' if delta is None else f'{delta:.4f}':>8} {entry.get('violation', float('nan')):>9.4f}"
                  f"  [{ci[0]:.3f}, {ci[1]:.3f}]")


def _cmd_build_artifacts(args: argparse.Namespace) -> int:
    """Build what is missing; ``--router`` also relabels, retrains and recalibrates the demo router."""
    artifacts = Path(args.artifacts)
    encoder_dir = artifacts / "encoder"
    if not (encoder_dir / "encoder.json").is_file():
        from coopt.export_encoder import export_encoder

        print("exporting the MiniLM encoder to ONNX ...", flush=True)
        export_encoder(encoder_dir)
    from routenlp_standins.build import build_all

    build_all(artifacts, tasks=DEMO_TASKS)
    if args.router:
        from coopt.demo_router import build_demo_router

        build_demo_router(artifacts, config_path=args.config, per_task=args.per_task)
    missing = [p for p in (artifacts / "router" / "router.json", artifacts / "thresholds.json") if not p.exists()]
    if missing:
        print("missing: " + ", ".join(map(str, missing)) + " (run `make router`)", file=sys.stderr)
        return 2
    print("artifacts ready")
    return 0


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _cmd_bench(args: argparse.Namespace) -> int:
    from coopt.bench.queueing import QueueConfig
    from coopt.bench.run import BenchConfig, bench_files, bench_shared, load_plugins

    if bool(args.data) == bool(args.dataset):
        raise ValueError("give either --data (with --portfolio) or --dataset, not both")
    if args.data and not args.portfolio:
        raise ValueError("--data needs --portfolio")
    if len(args.split) != 3:
        raise ValueError(f"--split needs three fractions, got {args.split}")
    load_plugins(args.plugin or [])
    queue = QueueConfig(arrivals_per_min=args.arrivals, headline_per_min=args.headline_rate,
                        workers=tuple(int(w) for w in args.workers), top_rate_per_s=args.top_rate or None,
                        sla_ms=args.sla_ms, n_arrivals=args.n_arrivals, service=args.service)
    config = BenchConfig(seeds=args.seeds, split=tuple(args.split), target_quality=args.target_quality,
                         systems=[s.strip() for s in args.systems.split(",")] if args.systems else None,
                         queue=queue, bootstrap=args.bootstrap, sweeps=not args.no_sweeps,
                         encoder_dir=Path(args.encoder), cache_path=Path(args.cache) if args.cache else None,
                         progress=not args.no_progress)
    if args.dataset:
        results = bench_shared(args.dataset, Path(args.out), config)
        for name in results:
            print((Path(args.out) / name / "table.md").read_text())
    else:
        bench_files(args.data, args.portfolio, Path(args.out), config)
        print((Path(args.out) / "table.md").read_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="routenlp", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export-encoder", help="export all-MiniLM-L6-v2 to ONNX fp32 + int8")
    p.add_argument("--out", default="artifacts/encoder")
    p.set_defaults(func=_cmd_export_encoder)

    p = sub.add_parser("build-artifacts", help="build the default artifacts that are missing")
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--config", default="proxy_config.yaml")
    p.add_argument("--router", action="store_true", help="also relabel + retrain + recalibrate the demo router")
    p.add_argument("--per-task", type=int, default=250, help="queries labelled per task for --router")
    p.set_defaults(func=_cmd_build_artifacts)

    p = sub.add_parser("label", help="answer queries with every tier of a proxy config and score them")
    p.add_argument("--config", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_label)

    p = sub.add_parser("train", help="train the task-conditioned router on all-pairs data")
    p.add_argument("--data", action="append", required=True, help="all-pairs JSONL (repeatable)")
    p.add_argument("--portfolio", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=["frozen", "finetune"], default="frozen")
    p.add_argument("--encoder", default="artifacts/encoder")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("calibrate", help="fit conformal cascade thresholds delta[tier][task]")
    p.add_argument("--data", required=True)
    p.add_argument("--portfolio", required=True)
    p.add_argument("--router", default=None, help="router artifact: fit on the queries that reach each tier")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--n", type=int, default=500, help="calibration queries per task")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("bench", help="the paper's evaluation: RouteNLP against the baselines on all-pairs data")
    p.add_argument("--data", action="append", help="all-pairs JSONL (repeatable; files share --portfolio)")
    p.add_argument("--portfolio", help="portfolio YAML of the --data files")
    p.add_argument("--dataset", action="append",
                   help="a shared set by name (cascades_9llm, routerbench, routellm) or 'all'; repeatable")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--split", type=_floats, default=(0.6, 0.2, 0.2), help="train,calibration,test fractions")
    p.add_argument("--systems", default=None, help="comma-separated subset of the registered systems")
    p.add_argument("--plugin", action="append", help="import this module first (it registers its own systems)")
    p.add_argument("--target-quality", type=float, default=0.97,
                   help="quality ratio each system's knob is tuned to reach on the calibration split")
    p.add_argument("--arrivals", type=_floats, default=(1000.0, 5000.0, 10000.0, 20000.0),
                   help="Poisson arrival rates, queries/min")
    p.add_argument("--headline-rate", type=float, default=1000.0, help="arrival rate of the p99/SLA columns")
    p.add_argument("--workers", type=_floats, default=(8, 4, 4), help="workers of T1, T2, ... below the top tier")
    p.add_argument("--top-rate", type=float, default=60.0, help="top tier's rate limit, req/s (0: a queue)")
    p.add_argument("--sla-ms", type=float, default=500.0)
    p.add_argument("--n-arrivals", type=int, default=20000, help="simulated arrivals per rate")
    p.add_argument("--service", choices=["exponential", "empirical"], default="exponential")
    p.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples")
    p.add_argument("--no-sweeps", action="store_true", help="skip RouteNLP's alpha/tau/delta sweeps and shift test")
    p.add_argument("--encoder", default="artifacts/encoder")
    p.add_argument("--cache", default=None, help="embedding cache file (default artifacts/cache/bench-embeddings-*)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_bench)
    return parser


def _input_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (a file, an artifact, an argument): one line, no traceback.

    The artifact errors are RuntimeErrors of modules only some commands import; they can only have
    been raised when their module is loaded, so they are looked up there (an except clause is
    evaluated when an exception arrives, after the command ran).
    """
    errors: list[type[BaseException]] = [ValueError, FileNotFoundError, KeyError]
    for module, name in (("litellm_routenlp.router_model", "RouterArtifactError"),
                         ("litellm_routenlp.encoder", "EncoderArtifactError")):
        loaded = sys.modules.get(module)
        if loaded is not None:
            errors.append(getattr(loaded, name))
    return tuple(errors)


def _message(error: BaseException) -> str:
    """The error's text; a plain KeyError's str() would wrap its message in quotes."""
    if isinstance(error, KeyError) and type(error).__str__ is KeyError.__str__ and len(error.args) == 1:
        return str(error.args[0])
    return str(error)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        status = args.func(args)
    except _input_errors() as error:
        print(f"routenlp {args.command}: error: {_message(error)}", file=sys.stderr)
        return 2
    print(f"({args.command} took {time.perf_counter() - started:.1f}s)", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
