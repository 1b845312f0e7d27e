"""``routenlp``: the offline commands around the proxy plugin.

    routenlp export-encoder   [--out artifacts/encoder]
    routenlp export-encoder   --static [--source artifacts/encoder] [--dim 256] [--no-tune] [--out artifacts/encoder-static]
    routenlp build-artifacts  [--artifacts artifacts] [--router]
    routenlp label            --config proxy_config.yaml --task banking77 [--split train] [--limit N] --out F.jsonl
    routenlp train            --data F.jsonl [--data G.jsonl] --portfolio P.yaml --out DIR [--mode frozen|finetune]
    routenlp calibrate        --data F.jsonl --portfolio P.yaml [--router DIR | --config proxy_config.yaml] [--alpha 0.05]
                              --out thresholds.json
    routenlp bench            --data F.jsonl [--data G.jsonl] --portfolio P.yaml --out DIR [--seeds 5] [--split 0.6,0.2,0.2]
    routenlp bench            --dataset cascades_9llm|routerbench|routellm|all --out DIR  (the shared sets)
    routenlp coopt            [run|read-logs|failures|cluster|select|distill|retrain|compare|status|
                               activate|rollback|report] ...  (co-optimisation, Algorithm 1)
    routenlp report           --decisions D.jsonl [--since 24h] [--until T] [--verdicts V.jsonl] [--baseline B.json]
                              [--json F] [--html F] [--strict]   (operations report, drift alerts)
    routenlp check            (same inputs) exit 1 and one line per alert, else `ok`   (for cron)
    routenlp verdicts         --file X.jsonl [--config proxy_config.yaml]   (clients' verdicts -> the durable log)

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
    if args.static:
        from coopt.static_encoder import export_static_encoder

        out = export_static_encoder(args.out or "artifacts/encoder-static", args.source, dim=args.dim,
                                    **({"tune_tasks": ()} if args.no_tune else {}))
    else:
        from coopt.export_encoder import export_encoder

        out = export_encoder(args.out or "artifacts/encoder")
    print(f"encoder written to {out}")
    return 0


def _cmd_label(args: argparse.Namespace) -> int:
    from coopt.label import label_task

    count = label_task(args.config, args.task, args.split, args.limit, args.out, seed=args.seed,
                       concurrency=args.concurrency, max_tokens=args.max_tokens)
    print(f"labelled {count} new queries -> {args.out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from routenlp_core.allpairs import load_portfolio, read_allpairs
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


#: policies whose knob per task is certified (calibration.fit_cascade_routing.FAMILIES)
CERTIFIED_POLICIES = ("posterior_threshold", "cascade_routing")


def _serving_router(args: argparse.Namespace) -> tuple[object, dict]:
    """(router, the serving settings calibration must replay) from ``--config`` or ``--router``.

    ``--config`` builds the router the proxy config names (``routenlp_settings.router``, any
    registered kind) and takes its ``router_quantized``, ``max_hops``, ``no_logprobs_policy`` and
    ``route_confidence``, so the policy file is fitted under exactly what that proxy serves."""
    if args.config is None:
        return args.router, {}
    from litellm_routenlp.routers import router_from_config

    router, settings = router_from_config(args.config)
    return router, {"router_quantized": settings.router_quantized, "max_hops": settings.max_hops,
                    "no_logprobs_policy": settings.no_logprobs_policy, "route_confidence": settings.route_confidence}


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from calibration.calibrate import calibrate
    from routenlp_core.allpairs import load_portfolio

    router, serving = _serving_router(args)
    if args.policy in CERTIFIED_POLICIES:
        from calibration.calibrate import calibrate_cascade_routing

        if router is None:
            raise SystemExit(f"routenlp calibrate: --policy {args.policy} needs --router or --config "
                             "(its ex-ante estimates)")
        serving.pop("route_confidence", None)  # the certified policies start on acceptance estimates
        document = calibrate_cascade_routing(args.data, load_portfolio(args.portfolio), router_artifact=router,
                                             out_path=args.out, guarantee=args.guarantee, delta=args.delta,
                                             target=args.target, family=args.policy, **serving)
        for task, entry in document["tasks"].items():
            print(f"{task}: {(entry.get('certificate') or {}).get('message')}")
        return 0
    result = calibrate(args.data, load_portfolio(args.portfolio), router_artifact=router,
                       alpha=args.alpha, n_calib=args.n, out_path=args.out, **serving)
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
    static_dir = artifacts / "encoder-static"
    if not (static_dir / "encoder.json").is_file():
        from coopt.static_encoder import export_static_encoder

        print("distilling the static router encoder from MiniLM ...", flush=True)
        export_static_encoder(static_dir, encoder_dir)
    from routenlp_standins.build import build_all

    build_all(artifacts, tasks=DEMO_TASKS)
    if args.router:
        from coopt.demo_router import build_demo_router

        build_demo_router(artifacts, config_path=args.config, per_task=args.per_task, relabel=not args.reuse_labels)
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
                         progress=not args.no_progress, certify_baselines=args.certify_baselines,
                         threads=args.threads)
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

    p = sub.add_parser("export-encoder", help="export all-MiniLM-L6-v2 to ONNX fp32 + int8, or (--static) "
                                              "distil the static lookup-table encoder the router serves")
    p.add_argument("--out", default=None, help="default artifacts/encoder, or artifacts/encoder-static with --static")
    p.add_argument("--static", action="store_true",
                   help="distil a static token-embedding encoder from the exported MiniLM (Model2Vec-style)")
    p.add_argument("--source", default="artifacts/encoder", help="with --static: the exported MiniLM directory")
    p.add_argument("--dim", type=int, default=256,
                   help="with --static: PCA dimensions of the distilled table (tuning then maps it to MiniLM's 384)")
    p.add_argument("--no-tune", action="store_true",
                   help="with --static: skip tuning the table to MiniLM on the tasks' train splits")
    p.set_defaults(func=_cmd_export_encoder)

    p = sub.add_parser("build-artifacts", help="build the default artifacts that are missing")
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--config", default="proxy_config.yaml")
    p.add_argument("--router", action="store_true", help="also relabel + retrain + recalibrate the demo router")
    p.add_argument("--reuse-labels", action="store_true",
                   help="with --router: reuse artifacts/labels/demo_allpairs.jsonl instead of relabelling (seconds, not minutes)")
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
    p.add_argument("--encoder", default="artifacts/encoder-static",
                   help="frozen mode's encoder: artifacts/encoder-static (served by default: ~0.2 ms a decision) "
                        "or artifacts/encoder (MiniLM: 2-10 ms)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("calibrate", help="fit conformal cascade thresholds delta[tier][task]")
    p.add_argument("--data", required=True)
    p.add_argument("--portfolio", required=True)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--router", default=None, help="router artifact: fit on the queries that reach each tier")
    which.add_argument("--config", default=None,
                       help="proxy config: calibrate under the router its routenlp_settings.router names (any "
                            "registered kind) and its router_quantized / max_hops / no_logprobs_policy / "
                            "route_confidence")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--n", type=int, default=500, help="calibration queries per task")
    p.add_argument("--out", required=True)
    p.add_argument("--policy", choices=("conformal_thresholds",) + CERTIFIED_POLICIES, default="conformal_thresholds",
                   help="the paper's per-tier thresholds (default), or a certified policy: posterior_threshold "
                        "(threshold cascade on the per-tier estimates) or cascade_routing (lookahead)")
    p.add_argument("--guarantee", choices=("ltt", "crc"), default="ltt",
                   help="certified policies: with probability 1 - delta (Learn-then-Test) or in expectation (CRC)")
    p.add_argument("--delta", type=float, default=0.1, help="certified policies + ltt: the chance the guarantee fails")
    p.add_argument("--target", type=float, default=0.97, help="certified policies: quality ratio to the top tier per task")
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
    p.add_argument("--encoder", default="artifacts/encoder-static",
                   help="encoder of the learned systems' embeddings (default: the static encoder the proxy serves; "
                        "artifacts/encoder: MiniLM)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for the encoder and numeric work (2 uses both cores of an idle machine)")
    p.add_argument("--certify-baselines", action="store_true",
                   help="choose every baseline's knob by Learn-then-Test (WSR, delta 0.1), as RouteNLP's lambda")
    p.add_argument("--cache", default=None, help="embedding cache file (default artifacts/cache/bench-embeddings-*)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_bench)
    _add_coopt_parser(sub)
    _add_ops_parsers(sub)
    return parser


# ---------------------------------------------------------------------------------------------------
# routenlp coopt: the co-optimisation loop (coopt/loop.py) and each of its steps on its own


def _task_counts(text: str) -> dict[str, int]:
    """``banking77=250,clinc150=250,bitext=40`` -> {task: count}."""
    out = {}
    for part in text.split(","):
        if not part.strip():
            continue
        task, _, count = part.partition("=")
        try:
            out[task.strip()] = int(count)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected task=count pairs, got {part!r}") from None
    return out


def _coopt_settings(args: argparse.Namespace):
    """The run's settings: ``run.json`` of --run-dir when it exists, else the demo defaults; flags override."""
    from coopt.loop import CooptSettings, load_settings

    run_dir = Path(args.run_dir)
    settings = load_settings(run_dir) if (run_dir / "run.json").is_file() else CooptSettings(run_dir=str(run_dir))
    for flag, field_name in (("config", "config"), ("portfolio", "portfolio"), ("artifacts", "artifacts"),
                             ("max_iterations", "max_iterations"), ("epsilon", "epsilon"), ("seed", "seed"),
                             ("router_set", "router_set"), ("eval_set", "eval_set"), ("traffic", "traffic"),
                             ("spend_logs_json", "spend_logs_json"), ("spend_logs_dsn", "spend_logs_dsn"),
                             ("classifier_weight", "classifier_weight"),
                             ("max_failures_per_task", "max_failures_per_task")):
        value = getattr(args, flag, None)
        if value is not None:
            setattr(settings, field_name, value)
    if getattr(args, "tasks", None):
        settings.tasks = tuple(args.tasks)
    if getattr(args, "no_seed_labels", False):
        settings.seed_labels = None
    if getattr(args, "lora_steps", None) is not None:
        settings.lora = {**settings.lora, "max_steps": args.lora_steps}
    return settings


def _cmd_coopt_run(args: argparse.Namespace) -> int:
    from coopt.loop import Pipeline, run
    from coopt.report import iteration_table, load_iterations, write_report

    settings = _coopt_settings(args)
    result = run(settings, progress=not args.no_progress)
    print()
    print(iteration_table(load_iterations(settings.run_dir)))
    print(f"stopped: {result.stopped_because}; active iteration: {result.active}")
    if args.compare:
        from coopt.report import comparison_table

        print(comparison_table(Pipeline(settings, progress=not args.no_progress).compare()))
    print(f"report: {write_report(settings.run_dir)}")
    return 0


def _cmd_coopt_read_logs(args: argparse.Namespace) -> int:
    from coopt.logs import (join_spend_logs, merge_sources, read_decision_log, read_spend_logs_json,
                            read_spend_logs_postgres, summarise, tier_names_by_model_id, write_requests)

    tiers = tier_names_by_model_id(args.config)
    sources = [read_decision_log(path) for path in args.decisions or []]
    # the decision log vouches for the escalation links of spend rows (coopt.logs docstring)
    decisions = [record for source in sources for record in source] if sources else None
    sources += [join_spend_logs(read_spend_logs_json(path), tiers, args.model_group, "spend_logs_json", decisions)
                for path in args.spend_logs_json or []]
    if args.spend_logs_dsn:
        rows = read_spend_logs_postgres(args.spend_logs_dsn, model_group=args.model_group)
        sources.append(join_spend_logs(rows, tiers, args.model_group, "spend_logs_db", decisions))
    if not sources:
        raise ValueError("give at least one of --decisions, --spend-logs-json, --spend-logs-dsn")
    records = merge_sources(*sources)
    write_requests(records, args.out)
    print(f"{'task':<12} {'requests':>8} {'escalated':>9}  failed tier")
    for task, entry in sorted(summarise(records).items()):
        print(f"{task:<12} {entry['requests']:>8} {entry['escalated']:>9}  {entry['failed_tier']}")
    print(f"{len(records)} requests -> {args.out}")
    return 0


def _cmd_coopt_failures(args: argparse.Namespace) -> int:
    from coopt.failures import score_failures, write_failures
    from coopt.logs import read_requests
    from coopt.versions import serving_config

    with serving_config(args.config, args.artifacts, args.serve) as config:
        failures = score_failures(read_requests(args.requests), config, tasks=args.tasks,
                                  max_tokens=args.max_tokens)
    write_failures(failures, args.out)
    for task in sorted({f.task for f in failures}):
        gaps = [f.gap for f in failures if f.task == task]
        print(f"{task:<12} {len(gaps):>5} failures, mean gap {sum(gaps) / len(gaps):.3f}")
    print(f"{len(failures)} failures -> {args.out}")
    return 0


def _cmd_coopt_cluster(args: argparse.Namespace) -> int:
    from coopt.clusters import cluster_all, cluster_report, write_clusters
    from coopt.failures import read_failures
    from litellm_routenlp.router_model import RouterModel

    clustering = cluster_all(read_failures(args.failures), RouterModel.load(args.router, quantized=False),
                             seed=args.seed)
    write_clusters(clustering, args.out)
    report = cluster_report(clustering)
    if args.report:
        Path(args.report).write_text(report, encoding="utf-8")
    print(report)
    return 0


def _cmd_coopt_select(args: argparse.Namespace) -> int:
    from coopt.clusters import read_clusters
    from coopt.failures import read_failures
    from coopt.logs import read_requests
    from coopt.selection import composition, fill_teacher_outputs, select_random, select_targeted, write_items
    from coopt.versions import serving_config

    requests = read_requests(args.requests)
    if args.random:
        items = select_random(requests, args.random, seed=args.seed)
    else:
        if not args.failures or not args.clusters:
            raise ValueError("targeted selection needs --failures and --clusters (or use --random task=n,...)")
        items = select_targeted(read_failures(args.failures), read_clusters(args.clusters), requests,
                                args.hard_fraction, args.random_share, seed=args.seed)
    with serving_config(args.config, args.artifacts, args.serve) as config:
        items = fill_teacher_outputs(items, config, max_tokens=args.teacher_max_tokens)
    write_items(items, args.out)
    print(f"{composition(items)} -> {args.out}")
    return 0


def _cmd_coopt_distill(args: argparse.Namespace) -> int:
    import json as _json

    from coopt.loop import Pipeline
    from coopt.selection import read_items

    pipeline = Pipeline(_coopt_settings(args), progress=not args.no_progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    changed, report = pipeline.distill(read_items(args.items), Path(args.previous), out, None, {})
    print(_json.dumps(report, indent=1))
    print(f"changed tiers: {', '.join(sorted(changed)) or 'none'} -> {out}")
    return 0


def _cmd_coopt_retrain(args: argparse.Namespace) -> int:
    from coopt.loop import Pipeline, finish_iteration
    from coopt.report import iteration_table

    pipeline = Pipeline(_coopt_settings(args), progress=not args.no_progress)
    out = Path(args.out)
    changed = {tier.strip() for tier in args.changed.split(",") if tier.strip()}
    metrics = pipeline.rebuild(Path(args.previous), out, changed, {})
    metrics.update({"iteration": args.iteration, "arm": "manual", "changed_tiers": sorted(changed)})
    finish_iteration(out, metrics, args.iteration)
    print(iteration_table([metrics]))
    return 0


def _cmd_coopt_compare(args: argparse.Namespace) -> int:
    from coopt.loop import Pipeline, load_settings
    from coopt.report import comparison_table, write_report

    result = Pipeline(load_settings(args.run_dir), progress=not args.no_progress).compare(args.repeats, args.tasks)
    print(comparison_table(result))
    print(f"report: {write_report(args.run_dir)}")
    return 0


def _cmd_coopt_status(args: argparse.Namespace) -> int:
    from coopt.report import iteration_table, load_iterations
    from coopt.versions import active_iteration

    print(iteration_table(load_iterations(args.run_dir)))
    print(f"active iteration: {active_iteration(args.run_dir)}")
    return 0


def _cmd_coopt_activate(args: argparse.Namespace) -> int:
    from coopt.versions import activate, active_config

    activate(args.run_dir, args.iteration)
    print(f"iteration {args.iteration} is active: litellm --config {active_config(args.run_dir)}")
    return 0


def _cmd_coopt_rollback(args: argparse.Namespace) -> int:
    from coopt.versions import active_config, rollback

    previous = rollback(args.run_dir)
    print(f"rolled back to iteration {previous}: restart the proxy with litellm --config {active_config(args.run_dir)}")
    return 0


def _cmd_coopt_report(args: argparse.Namespace) -> int:
    from coopt.report import write_report

    path = write_report(args.run_dir)
    print(path.read_text(encoding="utf-8"))
    return 0


def _add_coopt_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", default="artifacts/coopt/demo", help="where the iterations are versioned")
    p.add_argument("--config", default=None, help="base proxy config (default proxy_config.yaml)")
    p.add_argument("--portfolio", default=None, help="portfolio YAML (default artifacts/portfolio.yaml)")
    p.add_argument("--artifacts", default=None, help="base artifacts root (default artifacts)")
    p.add_argument("--tasks", nargs="+", default=None)
    p.add_argument("--max-iterations", type=int, default=None)
    p.add_argument("--epsilon", type=float, default=None, help="stop when the cost ratio moves less (0.005)")
    p.add_argument("--router-set", type=_task_counts, default=None, help="task=n,... labelled router queries")
    p.add_argument("--eval-set", type=_task_counts, default=None, help="task=n,... held-out evaluation queries")
    p.add_argument("--traffic", type=_task_counts, default=None, help="task=n,... fresh queries per iteration")
    p.add_argument("--classifier-weight", type=int, default=None, help="repeats of a distilled query in T1's fit")
    p.add_argument("--lora-steps", type=int, default=None, help="cap on SeqKD LoRA steps per iteration")
    p.add_argument("--max-failures-per-task", type=int, default=None,
                   help="score a seeded sample of each task's escalations (default: all)")
    p.add_argument("--spend-logs-json", default=None, help="also read this GET /spend/logs JSON every iteration")
    p.add_argument("--spend-logs-dsn", default=None, help="also read LiteLLM_SpendLogs from this PostgreSQL DSN")
    p.add_argument("--no-seed-labels", action="store_true", help="do not reuse artifacts/labels/demo_allpairs.jsonl")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--compare", action="store_true", help="then run the targeted-vs-random comparison")
    p.add_argument("--no-progress", action="store_true")


def _add_coopt_parser(sub: argparse._SubParsersAction) -> None:
    coopt = sub.add_parser("coopt", help="co-optimisation: learn cheaper tiers from escalations (Algorithm 1)",
                           description="Without a step: the whole loop (same as `coopt run`).")
    _add_coopt_run_options(coopt)
    coopt.set_defaults(func=_cmd_coopt_run)
    steps = coopt.add_subparsers(dest="coopt_step")

    p = steps.add_parser("run", help="the loop: iterate until the cost ratio moves < epsilon")
    _add_coopt_run_options(p)
    p.set_defaults(func=_cmd_coopt_run)

    p = steps.add_parser("read-logs", help="1. decision log / spend logs -> one record per request")
    p.add_argument("--decisions", action="append", help="RouteNLP decision log JSONL (repeatable)")
    p.add_argument("--spend-logs-json", action="append", help="saved GET /spend/logs answer (repeatable)")
    p.add_argument("--spend-logs-dsn", default=None, help="PostgreSQL DSN of LiteLLM's database (DATABASE_URL)")
    p.add_argument("--model-group", default=None, help="keep one model alias (e.g. routenlp)")
    p.add_argument("--config", default="proxy_config.yaml", help="maps deployment ids to tiers")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_coopt_read_logs)

    p = steps.add_parser("failures", help="2. score escalated requests against the top tier's answers")
    p.add_argument("--requests", required=True)
    p.add_argument("--config", default="proxy_config.yaml")
    p.add_argument("--serve", default=None, help="iteration directory whose distilled tiers answer (default: base)")
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--tasks", nargs="+", default=None)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_coopt_failures)

    p = steps.add_parser("cluster", help="3. PCA + k-means (k by silhouette) per task; top clusters report")
    p.add_argument("--failures", required=True)
    p.add_argument("--router", required=True, help="router artifact whose penultimate features are clustered")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--report", default=None, help="also write the readable report (markdown)")
    p.set_defaults(func=_cmd_coopt_cluster)

    p = steps.add_parser("select", help="4. distillation data (hard + random) with the teacher's answers")
    p.add_argument("--requests", required=True)
    p.add_argument("--failures", default=None)
    p.add_argument("--clusters", default=None)
    p.add_argument("--random", type=_task_counts, default=None, help="task=n,...: a random control set instead")
    p.add_argument("--hard-fraction", type=float, default=0.3)
    p.add_argument("--random-share", type=float, default=0.2)
    p.add_argument("--config", default="proxy_config.yaml")
    p.add_argument("--serve", default=None)
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--teacher-max-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_coopt_select)

    p = steps.add_parser("distill", help="5. label distillation (T1) and SeqKD LoRA (T2) into a new iteration dir")
    _add_coopt_run_options(p)
    p.add_argument("--items", required=True)
    p.add_argument("--previous", required=True, help="iteration directory to start from")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_coopt_distill)

    p = steps.add_parser("retrain", help="6. relabel changed tiers, retrain the router, recalibrate, measure")
    _add_coopt_run_options(p)
    p.add_argument("--previous", required=True, help="iteration whose labels are updated")
    p.add_argument("--out", required=True, help="the directory `distill` wrote")
    p.add_argument("--changed", default="T1,T2", help="tiers to relabel")
    p.add_argument("--iteration", type=int, required=True, help="its number (recorded in the manifest)")
    p.set_defaults(func=_cmd_coopt_retrain)

    p = steps.add_parser("compare", help="targeted vs random distillation of as many examples, from iteration 0")
    p.add_argument("--run-dir", default="artifacts/coopt/demo")
    p.add_argument("--repeats", type=int, default=1, help="random arms, one seed each (the mean is compared)")
    p.add_argument("--tasks", nargs="+", default=None, help="limit the random arms to these tasks")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_coopt_compare)

    for name, func, text in (("status", _cmd_coopt_status, "per-iteration table and the active iteration"),
                             ("rollback", _cmd_coopt_rollback, "re-activate the previously active iteration"),
                             ("report", _cmd_coopt_report, "write report.md and the plots")):
        p = steps.add_parser(name, help=text)
        p.add_argument("--run-dir", default="artifacts/coopt/demo")
        p.set_defaults(func=func)

    p = steps.add_parser("activate", help="serve an iteration (copies it to <run-dir>/active)")
    p.add_argument("--run-dir", default="artifacts/coopt/demo")
    p.add_argument("--iteration", type=int, required=True)
    p.set_defaults(func=_cmd_coopt_activate)


# ---------------------------------------------------------------------------------------------------
# routenlp report / check: the operations report and its drift alerts (coopt/ops_report.py)


def _ops_report(args: argparse.Namespace) -> dict:
    import json

    from coopt.ops_report import (build_report, load_baseline, load_requests, parse_targets, parse_window,
                                  quality_targets, read_verdicts, thresholds_baseline, top_tier_deployment, Baseline)

    since, until = parse_window(args.since, args.until)
    records, scan = load_requests(args.decisions or [], since=since, until=until,
                                  spend_logs_json=args.spend_logs_json or [], config=args.config,
                                  progress=False if args.no_progress else None)
    document = None
    if args.thresholds and Path(args.thresholds).is_file():
        try:
            document = json.loads(Path(args.thresholds).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{args.thresholds}: not valid JSON ({error})") from None
    baseline = load_baseline(args.baseline) if args.baseline else None
    if baseline is None and thresholds_baseline(document):
        baseline = Baseline(thresholds_baseline(document), f"{args.thresholds} (calibration)")
    targets = {**quality_targets(document), **parse_targets(args.target or [])}
    verdicts = read_verdicts(args.verdicts, scan.warnings) if args.verdicts else None
    for warning in scan.warnings:  # corrupt log / verdict lines: named, skipped, the rest read
        print(f"warning: {warning}", file=sys.stderr)
    top, top_params = (top_tier_deployment(args.config) if args.config and Path(args.config).is_file()
                       else (None, None))
    return build_report(records, scan, since=since, until=until, verdicts=verdicts, baseline=baseline,
                        targets=targets, top_tier=top, top_params=top_params,
                        sources=[str(p) for p in (args.decisions or []) + (args.spend_logs_json or [])])


def _cmd_verdicts(args: argparse.Namespace) -> int:
    """Clients' verdicts from a JSONL: every line checked and joined to its decision first (an unknown
    request id names its file:line and nothing is stored), then each one appended, fsync'd."""
    import asyncio

    from litellm_routenlp import online_adaptation
    from litellm_routenlp.config import load_settings
    from litellm_routenlp.verdicts import VerdictStore, read_client_file

    settings, document = load_settings(args.config)
    # None unless routenlp_settings.adaptation; the CLI moves the shared state only, it serves no policy
    adaptation = online_adaptation.build(settings, document, serving=False)
    store = VerdictStore(settings.verdicts_path, settings.decision_log_path)
    try:
        items = read_client_file(args.file)
        records = [store.prepare(item.get("request_id"), item.get("acceptable"), "client", item.get("note"),
                                 where=where) for where, item in items]
        if len({r.request_id for r in records}) != len(records):
            raise ValueError(f"{args.file}: a request id appears twice")
        for record in records:
            store.store(record, settings.tasks)
    finally:
        store.close()
    print(f"stored {len(records)} verdicts in {settings.verdicts_path}")
    if adaptation is not None:  # the same ACI step a proxy takes on a verdict, in the shared Redis state
        async def adapt() -> int:
            try:
                return sum([await adaptation.observe(record) is not None for record in records])
            finally:
                await adaptation.close()

        moved = asyncio.run(adapt())
        print(f"online adaptation: {moved} of {len(records)} verdicts moved a task's scale"
              + ("" if moved == len(records) else " (Redis unreachable or task without a target)"))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from coopt.ops_report import render_text, write_html, write_json

    report = _ops_report(args)
    print(render_text(report))
    if args.json:
        print(f"json: {write_json(report, args.json)}")
    if args.html:
        print(f"html: {write_html(report, args.html)}")
    return 3 if args.strict and report["warnings"] else 0


def _cmd_check(args: argparse.Namespace) -> int:
    from coopt.ops_report import checks_made

    report = _ops_report(args)
    for alert in report["alerts"]:
        print(alert["line"])
    print(checks_made(report), file=sys.stderr)
    if report["alerts"]:
        return 1
    print("ok")
    return 3 if args.strict and report["warnings"] else 0


def _add_ops_parsers(sub: argparse._SubParsersAction) -> None:
    for name, func, text in (
            ("report", _cmd_report, "operations report: spend, savings, tier shares, escalation, quality, alerts"),
            ("check", _cmd_check, "drift alerts for cron: exit 1 and one line per alert, else `ok`")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--decisions", action="append", help="decision log JSONL (repeatable)")
        p.add_argument("--spend-logs-json", action="append", help="GET /spend/logs JSON (repeatable)")
        p.add_argument("--config", default="proxy_config.yaml", help="proxy config: tier of each deployment")
        p.add_argument("--since", help="window start: ISO time or relative (24h, 30m, 7d)")
        p.add_argument("--until", help="window end (exclusive): ISO time or relative")
        p.add_argument("--thresholds", default="artifacts/thresholds.json",
                       help="thresholds / policy file: certified targets (and escalation baselines if it has them)")
        p.add_argument("--baseline", help="escalation baseline: `routenlp report --json` of a reference window")
        p.add_argument("--verdicts", help="verdicts JSONL: {request_id, acceptable, source} per line "
                                          "(the proxy writes routenlp_settings.verdicts_path)")
        p.add_argument("--target", action="append", help="certified quality target override, task=0.9 (repeatable)")
        p.add_argument("--strict", action="store_true", help="exit 3 when a log line was corrupt")
        p.add_argument("--no-progress", action="store_true")
        if name == "report":
            p.add_argument("--json", help="write the report as JSON here")
            p.add_argument("--html", help="write one self-contained HTML page here")
        p.set_defaults(func=func)
    p = sub.add_parser("verdicts", help="store clients' verdicts {request_id, acceptable, note?} from a JSONL")
    p.add_argument("--file", required=True, help="JSONL, one {request_id, acceptable: bool, note?} per line")
    p.add_argument("--config", default="proxy_config.yaml", help="proxy config: decision log and verdict log paths")
    p.set_defaults(func=_cmd_verdicts)


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
