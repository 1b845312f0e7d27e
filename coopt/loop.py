"""Algorithm 1: the co-optimisation loop, one versioned iteration at a time, and the paper's comparison.

Iteration 0 is the starting portfolio: the base tiers answer a fixed *router set* (router training
60% / calibration 40%, by a hash of the query id) and a fixed, disjoint *evaluation set* of held-out
queries; the router is trained, the thresholds are calibrated, the cascade is replayed over the
evaluation set (``coopt.evaluate``).  Iteration N (>= 1), from iteration N-1:

1. traffic: a fresh batch of held-out queries goes through the real proxy serving N-1 (``coopt.traffic``);
2. read what happened: the decision log (plus any spend logs) -> one record per request (``coopt.logs``);
3. failures: every escalated request scored against the top tier's answer (``coopt.failures``);
4. clusters: per task, on N-1's router features; top 5 by size x mean gap (``coopt.clusters``);
5. data: 30% hardest failures of those clusters + 20% random in-distribution queries, teacher answers
   from the top tier through LiteLLM (``coopt.selection``);
6. distil: label distillation into the classifier tier, SeqKD + LoRA into the generative tier
   (``coopt.distill_classifier``, ``coopt.distill_lora``);
7. relabel the changed tiers on both sets (``coopt.relabel``), retrain the router, recalibrate, replay;
8. stop when the cost ratio moved less than epsilon (0.005), or after ``max_iterations``.

Every iteration is written to its own directory with a manifest and activated; ``coopt.versions``
rolls back.  :func:`compare_targeted_random` runs the paper's comparison: from iteration 0, the same
number of distillation examples chosen at random from the same traffic instead of from the clusters.

:func:`run_loop` holds only the control flow (resume, stop rule, activation) and takes the steps as an
object, so it is tested with fake steps; :class:`Pipeline` is the real one.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from calibration.calibrate import calibrate, deltas_of
from coopt.clusters import cluster_all, cluster_report, write_clusters
from coopt.demo_router import is_calibration_id
from coopt.distill_classifier import distill_classifier
from coopt.distill_lora import LoraSettings, train_lora
from coopt.evaluate import evaluate, outcome_dicts, tier_quality
from coopt.failures import score_failures, top_tier, write_failures
from coopt.label import label_examples, tier_router
from coopt.logs import (join_spend_logs, merge_sources, read_decision_log, read_requests, read_spend_logs_json,
                        read_spend_logs_postgres, summarise, tier_names_by_model_id, write_requests)
from coopt.relabel import prepare_local_generators, relabel_tiers
from coopt.selection import (composition, fill_teacher_outputs, read_items, select_random, select_targeted,
                             write_items)
from coopt.traffic import send_through_proxy
from coopt.train_router import train_router
from coopt.versions import (activate, active_iteration, derive_proxy_config, is_complete, iteration_dir,
                            write_manifest, write_serving_config)
from litellm_routenlp.config import read_yaml
from litellm_routenlp.router_model import RouterModel
from litellm_routenlp.thresholds import Thresholds
from routenlp_core.allpairs import append_allpairs, load_portfolio, read_allpairs, write_allpairs
from routenlp_core.tasks import get_task
from routenlp_standins.artifacts import StandinDirs

EPSILON = 0.005
DEMO_SAMPLE_PER_TASK = 250  # the labelled sample coopt.demo_router drew from each test split (seed 0)


# --------------------------------------------------------------------------------------------------
# Control flow


class LoopSteps(Protocol):
    def baseline(self, out_dir: Path) -> dict[str, Any]:
        """Build iteration 0 in ``out_dir``; return its metrics (with ``cost_ratio``)."""

    def iterate(self, n: int, previous: Path, out_dir: Path) -> dict[str, Any]:
        """Build iteration ``n`` from ``previous`` in ``out_dir``; return its metrics."""


@dataclass
class LoopResult:
    iterations: list[dict[str, Any]] = field(default_factory=list)   # metrics of iterations 0..N
    stopped_because: str = ""
    active: Optional[int] = None


def _metrics(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "metrics.json").read_text(encoding="utf-8"))


def finish_iteration(directory: Path, metrics: dict[str, Any], n: int) -> None:
    """Write ``metrics.json`` and the manifest: the iteration is complete and immutable."""
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    write_manifest(directory, {"iteration_number": n, "cost_ratio": metrics.get("cost_ratio")})


KEPT_ON_RESUME = ("inputs/decisions.jsonl", "inputs/traffic.json")  # the traffic already served (minutes of CPU)


def _fresh(directory: Path) -> None:
    """An incomplete iteration directory (a crash mid-way) is rebuilt; only a finished traffic log is kept."""
    if directory.exists() and not is_complete(directory):
        kept = {name: (directory / name).read_bytes() for name in KEPT_ON_RESUME if (directory / name).is_file()}
        shutil.rmtree(directory)
        if len(kept) == len(KEPT_ON_RESUME):
            for name, content in kept.items():
                (directory / name).parent.mkdir(parents=True, exist_ok=True)
                (directory / name).write_bytes(content)
    directory.mkdir(parents=True, exist_ok=True)


def run_loop(run_dir: str | os.PathLike[str], steps: LoopSteps, max_iterations: int = 3, epsilon: float = EPSILON,
             log: Callable[[str], None] = print) -> LoopResult:
    """Iterate until |cost_ratio(N) - cost_ratio(N-1)| < ``epsilon`` or ``max_iterations`` are done.

    Complete iterations already on disk are reused (the loop resumes); each new one is activated as it
    completes, so the active iteration is always the newest finished one.
    """
    if max_iterations < 0 or epsilon < 0:
        raise ValueError("max_iterations and epsilon must be non-negative")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    result = LoopResult()
    first = iteration_dir(run_dir, 0)
    if not is_complete(first):
        _fresh(first)
        finish_iteration(first, steps.baseline(first), 0)
        activate(run_dir, 0)
    else:
        log(f"iteration 0: reusing {first}")
    result.iterations.append(_metrics(first))
    result.active = 0
    previous = first
    result.stopped_because = f"max_iterations ({max_iterations}) reached"
    for n in range(1, max_iterations + 1):
        current = iteration_dir(run_dir, n)
        if is_complete(current):
            log(f"iteration {n}: reusing {current}")
        else:
            _fresh(current)
            started = time.perf_counter()
            metrics = steps.iterate(n, previous, current)
            metrics.setdefault("seconds", round(time.perf_counter() - started, 1))
            finish_iteration(current, metrics, n)
            activate(run_dir, n)
        metrics = _metrics(current)
        result.iterations.append(metrics)
        result.active = n
        change = float(metrics["cost_ratio"]) - float(result.iterations[-2]["cost_ratio"])
        log(f"iteration {n}: cost ratio {metrics['cost_ratio']:.4f} (change {change:+.4f})")
        if abs(change) < epsilon:
            result.stopped_because = f"cost ratio moved {change:+.4f} (< epsilon {epsilon})"
            break
        previous = current
    result.active = active_iteration(run_dir)
    return result


# --------------------------------------------------------------------------------------------------
# The real steps


class CooptSettings(BaseModel):
    """Everything a run depends on (stored in ``run.json``); the defaults are the CPU demo.

    A pydantic model that rejects unknown keys: a misspelt key in ``run.json`` (``max_iteration``) is an
    error naming it, not a silently ignored setting.  Assignments are validated too (the CLI sets flags).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    run_dir: str = "artifacts/coopt/demo"
    config: str = "proxy_config.yaml"
    portfolio: str = "artifacts/portfolio.yaml"
    artifacts: str = "artifacts"
    tasks: tuple[str, ...] = ("banking77", "clinc150", "bitext")
    # bitext is small because every T2 (SmolLM2) answer costs ~2-5 s of CPU, and the router set must still
    # certify T3's threshold (>= 19 calibration queries reaching it at alpha 0.05).
    router_set: dict[str, int] = Field(default_factory=lambda: {"banking77": 250, "clinc150": 250, "bitext": 80})
    eval_set: dict[str, int] = Field(default_factory=lambda: {"banking77": 500, "clinc150": 500, "bitext": 40})
    traffic: dict[str, int] = Field(default_factory=lambda: {"banking77": 600, "clinc150": 600, "bitext": 150})
    seed_labels: Optional[str] = "artifacts/labels/demo_allpairs.jsonl"   # reused labels (same ids) when present
    max_iterations: int = Field(3, ge=1)
    epsilon: float = Field(EPSILON, ge=0)
    hard_fraction: float = Field(0.3, gt=0, le=1)
    random_share: float = Field(0.2, ge=0, lt=1)
    classifier_weight: int = Field(3, ge=1)
    lora: dict[str, Any] = Field(default_factory=dict)                   # LoraSettings overrides
    max_tokens: int = Field(48, ge=1)          # answers when labelling / scoring (the demo labels' budget)
    teacher_max_tokens: int = Field(256, ge=1)  # distillation targets
    alpha: float = Field(0.05, gt=0, lt=1)
    route_confidence: float = Field(0.5, gt=0, le=1)
    seed: int = 0
    concurrency: int = Field(2, ge=1)
    traffic_concurrency: int = Field(4, ge=1)
    max_failures_per_task: Optional[int] = Field(None, ge=1)  # score a sample of each task's escalations (None: all)
    spend_logs_json: Optional[str] = None   # extra sources merged into every iteration's records
    spend_logs_dsn: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "run.json") -> "CooptSettings":
        """Validated settings; a bad or unknown key raises ``ValueError`` naming ``source`` and the key."""
        try:
            return cls.model_validate(raw)
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}"
                                 for e in error.errors())
            raise ValueError(f"{source}: {problems}") from None


def tier_models(config: str | os.PathLike[str]) -> dict[str, str]:
    """``T<k>`` -> the ``litellm_params.model`` of that tier's deployment in a proxy config."""
    out = {}
    for deployment in read_yaml(Path(config)).get("model_list") or []:
        tier = (deployment.get("model_info") or {}).get("routenlp_tier")
        out[f"T{tier}"] = str((deployment.get("litellm_params") or {}).get("model"))
    return out


def query_pools(settings: CooptSettings) -> dict[str, dict[str, list[Any]]]:
    """Per task, disjoint held-out (test-split) queries: ``router``, ``eval`` and ``traffic`` (all batches).

    The router set is drawn from the sample the shipped demo router was labelled on (so those labels
    can be reused); evaluation and traffic come from the rest of the test split, shuffled with the seed.
    """
    pools: dict[str, dict[str, list[Any]]] = {}
    for task in settings.tasks:
        spec = get_task(task)
        sample = spec.load("test", limit=DEMO_SAMPLE_PER_TASK, seed=settings.seed)
        wanted = settings.router_set.get(task, 0)
        rng = random.Random(f"{settings.seed}:{task}:router")
        router = sorted(rng.sample(range(len(sample)), min(wanted, len(sample))))
        taken = {example.id for example in sample}
        rest = [example for example in spec.load("test") if example.id not in taken]
        random.Random(f"{settings.seed}:{task}:rest").shuffle(rest)
        n_eval = settings.eval_set.get(task, 0)
        pools[task] = {"router": [sample[i] for i in router], "eval": rest[:n_eval], "traffic": rest[n_eval:]}
    return pools


def traffic_batch(pools: dict[str, dict[str, list[Any]]], settings: CooptSettings, n: int) -> list[tuple[str, str]]:
    """Batch ``n`` (1-based) of fresh traffic: ``settings.traffic[task]`` queries per task, interleaved."""
    per_task = {}
    for task in settings.tasks:
        size = settings.traffic.get(task, 0)
        pool = pools[task]["traffic"]
        start = (n - 1) * size
        if start + size > len(pool):
            raise ValueError(f"task {task}: the test split has no fresh traffic left for iteration {n} "
                             f"({len(pool)} queries, {size} per iteration); lower --traffic or --max-iterations")
        per_task[task] = [(task, example.text) for example in pool[start:start + size]]
    mixed: list[tuple[str, str]] = []
    longest = max((len(v) for v in per_task.values()), default=0)
    for i in range(longest):
        for task in settings.tasks:
            if i < len(per_task[task]):
                mixed.append(per_task[task][i])
    return mixed


class Pipeline:
    """The real Algorithm-1 steps on a proxy config's tiers (see module docstring)."""

    def __init__(self, settings: CooptSettings, progress: bool = True, log: Callable[[str], None] = print) -> None:
        self.settings = settings
        self.progress = progress
        self.log = log
        self.run_dir = Path(settings.run_dir)
        self.artifacts = Path(settings.artifacts)
        self.portfolio = load_portfolio(settings.portfolio)
        self._pools: Optional[dict[str, dict[str, list[Any]]]] = None

    # ---------------------------------------------------------------- data
    @property
    def pools(self) -> dict[str, dict[str, list[Any]]]:
        if self._pools is None:
            self._pools = query_pools(self.settings)
        return self._pools

    def _base_records(self, name: str) -> list[Any]:
        """The ``router`` or ``eval`` set answered by every base tier (labelled once, then reused)."""
        examples = [e for task in self.settings.tasks for e in self.pools[task][name]]
        path = self.run_dir / "data" / f"{name}_set.base.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        seed_file = Path(self.settings.seed_labels) if self.settings.seed_labels else None
        if seed_file is not None and seed_file.is_file():
            done = {r.id for r in read_allpairs(path)} if path.exists() else set()
            wanted = {e.id for e in examples} - done
            reused = [r for r in read_allpairs(seed_file) if r.id in wanted]
            if reused:
                append_allpairs(reused, path)
                self.log(f"{name} set: reusing {len(reused)} labelled queries from {seed_file}")
        # the base tiers on this run's artifacts root, named in the config the labeller builds them from
        config = write_serving_config(self.settings.config, self.run_dir / "data" / "base_proxy_config.yaml",
                                      StandinDirs(self.artifacts))
        prepare_local_generators(config)
        asyncio.run(label_examples(config, examples, path, concurrency=self.settings.concurrency,
                                   max_tokens=self.settings.max_tokens, progress=self.progress))
        by_id = {r.id: r for r in read_allpairs(path, self.portfolio)}
        return [by_id[e.id] for e in examples]

    # ---------------------------------------------------------------- router, thresholds, figures
    def _fit_and_measure(self, out_dir: Path, router_records: Sequence[Any], eval_records: Sequence[Any],
                         timings: dict[str, float]) -> dict[str, Any]:
        labels = out_dir / "labels"
        write_allpairs(router_records, labels / "router_set.jsonl")
        write_allpairs(eval_records, labels / "eval_set.jsonl")
        train_part = [r for r in router_records if not is_calibration_id(r.id)]
        calib_part = [r for r in router_records if is_calibration_id(r.id)]
        started = time.perf_counter()
        report = train_router(train_part, self.portfolio, out_dir / "router", mode="frozen",
                              encoder_dir=self.artifacts / "encoder", seed=self.settings.seed,
                              cache_path=self.run_dir / "cache" / "router-embeddings.safetensors")
        router = RouterModel.load(out_dir / "router", quantized=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "only n queries reach this tier": recorded in the file
            document = calibrate(calib_part, self.portfolio, router_artifact=router, alpha=self.settings.alpha,
                                 out_path=out_dir / "thresholds.json", route_confidence=self.settings.route_confidence)
        timings["train_router_and_calibrate"] = round(time.perf_counter() - started, 1)
        thresholds = Thresholds.load(out_dir / "thresholds.json")
        figures, outcomes = evaluate(eval_records, self.portfolio, router, thresholds,
                                     route_confidence=self.settings.route_confidence)
        with open(out_dir / "outcomes.jsonl", "w", encoding="utf-8") as handle:
            for row in outcome_dicts(outcomes):
                handle.write(json.dumps(row) + "\n")
        tier_acceptance = {f"{tier}/{task}": tier_quality(eval_records, self.portfolio, tier, task)
                           for task in self.settings.tasks for tier in self.portfolio.tier_names[:-1]}
        derive_proxy_config(self.settings.config, out_dir, self.artifacts)
        return {**figures,
                "tier_acceptance_eval": {k: v for k, v in tier_acceptance.items() if v is not None},
                "router": {"n_train": report.n_train, "val_accuracy": round(report.val_accuracy, 4),
                           "majority_baseline_accuracy": round(report.majority_baseline_accuracy, 4)},
                "thresholds": deltas_of(document), "timings": timings}

    def baseline(self, out_dir: Path) -> dict[str, Any]:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        router_records, eval_records = self._base_records("router"), self._base_records("eval")
        timings["label_base_sets"] = round(time.perf_counter() - started, 1)
        metrics = self._fit_and_measure(out_dir, router_records, eval_records, timings)
        metrics.update({"iteration": 0, "arm": "start"})
        return metrics

    # ---------------------------------------------------------------- one iteration
    def read_traffic(self, n: int, previous: Path, inputs: Path, timings: dict[str, float]) -> list[Any]:
        """Steps 1-2: fresh traffic through the proxy serving ``previous``; its log -> request records."""
        started = time.perf_counter()
        decisions, done = inputs / "decisions.jsonl", inputs / "traffic.json"
        queries = traffic_batch(self.pools, self.settings, n)
        if done.is_file() and decisions.is_file() and json.loads(done.read_text()).get("sent") == len(queries):
            self.log(f"iteration {n}: reusing the traffic already served ({decisions})")
            timings["traffic"] = json.loads(done.read_text()).get("seconds", 0.0)
        else:
            decisions.unlink(missing_ok=True)
            report = send_through_proxy(previous / "proxy_config.yaml", queries, decisions, inputs,
                                        concurrency=self.settings.traffic_concurrency,
                                        max_tokens=self.settings.max_tokens, progress=self.progress)
            done.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
            timings["traffic"] = round(time.perf_counter() - started, 1)
        records = read_decision_log(decisions)
        extra = []
        tiers = tier_names_by_model_id(self.settings.config)
        if self.settings.spend_logs_json:
            extra.append(join_spend_logs(read_spend_logs_json(self.settings.spend_logs_json), tiers,
                                         source="spend_logs_json", decisions=records))
        if self.settings.spend_logs_dsn:
            extra.append(join_spend_logs(read_spend_logs_postgres(self.settings.spend_logs_dsn), tiers,
                                         source="spend_logs_db", decisions=records))
        records = merge_sources(records, *extra)
        write_requests(records, inputs / "requests.jsonl")
        (inputs / "requests_summary.json").write_text(json.dumps(summarise(records), indent=1) + "\n")
        return records

    def targeted_items(self, records: Sequence[Any], previous: Path, inputs: Path,
                       timings: dict[str, float]) -> tuple[list[Any], dict[str, Any]]:
        """Steps 3-5: failures, clusters, the targeted distillation set with teacher answers."""
        config = previous / "proxy_config.yaml"  # its stand-ins serve ``previous``'s distilled tiers
        started = time.perf_counter()
        failures = score_failures(records, config, tasks=self.settings.tasks, max_tokens=self.settings.max_tokens,
                                  concurrency=self.settings.concurrency, progress=self.progress,
                                  max_per_task=self.settings.max_failures_per_task, seed=self.settings.seed)
        write_failures(failures, inputs / "failures.jsonl")
        timings["score_failures"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        router = RouterModel.load(previous / "router", quantized=False)
        clustering = cluster_all(failures, router, seed=self.settings.seed, progress=self.progress)
        write_clusters(clustering, inputs / "clusters.json")
        (inputs / "clusters.md").write_text(cluster_report(clustering), encoding="utf-8")
        timings["cluster"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        items = select_targeted(failures, clustering, records, self.settings.hard_fraction, self.settings.random_share,
                                seed=self.settings.seed)
        items = fill_teacher_outputs(items, config, max_tokens=self.settings.teacher_max_tokens,
                                     concurrency=self.settings.concurrency, progress=self.progress)
        write_items(items, inputs / "distill_items.jsonl")
        timings["select_and_teacher"] = round(time.perf_counter() - started, 1)
        summary = {"n_requests": len(records), "n_escalated": sum(r.escalated for r in records),
                   "n_failures": len(failures),
                   "failures_per_task": {t: sum(f.task == t for f in failures) for t in self.settings.tasks},
                   "clusters": {t: {"k": c.k, "silhouette": c.silhouette, "top": [
                       {"size": x.size, "mean_gap": x.mean_gap} for x in c.chosen()]} for t, c in clustering.items()},
                   "distill_items": composition(items), "teacher": self.teachers(config)}
        return items, summary

    def teachers(self, config: Path) -> dict[str, str]:
        """Per task, the tier whose answers are the distillation targets and the model behind it."""
        models = tier_models(config)
        out = {}
        for task in self.settings.tasks:
            teacher = top_tier(config, task)
            out[task] = f"{teacher} {models.get(teacher, '?')}"
        return out

    def students(self, task: str) -> list[tuple[str, str]]:
        """(tier name, method) of the tiers below the teacher that serve ``task`` and that the portfolio
        declares distillable (``tiers[].distill``); ``label`` only for tasks with a label set."""
        _, names, served = tier_router(self.settings.config)
        teacher = top_tier(self.settings.config, task)
        declared = {tier.name: tier.distill for tier in self.portfolio.tiers}
        out = []
        for name in names[:names.index(teacher)]:
            if served[name] is not None and task not in served[name]:
                continue
            method = declared.get(name)
            if method == "label" and get_task(task).labels() is None:
                continue
            if method is not None:
                out.append((name, method))
        return out

    def distill(self, items: Sequence[Any], previous: Path, out_dir: Path, n: Optional[int],
                timings: dict[str, float]) -> tuple[set[str], dict[str, Any]]:
        """Step 6: distil ``items`` into the student tiers; carry the other distilled tiers forward.

        Classifier heads are refitted on every item distilled so far (iterations 1..n); the LoRA adapter
        continues from ``previous``'s with this iteration's items.  Returns the changed tiers and a report.
        """
        started = time.perf_counter()
        for sub in ("tiers", "lora"):  # carry forward, then overwrite what is distilled now
            if (previous / sub).is_dir():
                shutil.copytree(previous / sub, out_dir / sub, dirs_exist_ok=True)
        earlier: list[Any] = []
        if n is not None:
            for k in range(1, n):
                path = iteration_dir(self.run_dir, k) / "inputs" / "distill_items.jsonl"
                if path.is_file():
                    earlier += read_items(path)
        changed: set[str] = set()
        report: dict[str, Any] = {}
        lora_items: list[Any] = []
        lora_tier = None
        for task in self.settings.tasks:
            task_items = [i for i in items if i.task == task]
            if not task_items:
                continue
            for tier, method in self.students(task):
                if method == "label":
                    everything = [i for i in earlier if i.task == task] + task_items
                    report[f"{tier}/{task}"] = distill_classifier(task, everything, self.artifacts, out_dir,
                                                                  weight=self.settings.classifier_weight,
                                                                  progress=self.progress)
                    changed.add(tier)
                elif method == "seqkd_lora":
                    lora_items += task_items
                    lora_tier = tier
        if lora_items:
            previous_adapter = previous / "lora" / "smollm2"
            settings = LoraSettings(**{"seed": self.settings.seed, **self.settings.lora})
            result = train_lora(lora_items, self.artifacts / "smollm2", out_dir / "lora" / "smollm2",
                                init_adapter=previous_adapter if (previous_adapter / "adapter_config.json").is_file()
                                else None, settings=settings, progress=self.progress)
            report[f"{lora_tier}/lora"] = {k: v for k, v in result.to_dict().items() if k != "step_losses"}
            changed.add(str(lora_tier))
        timings["distill"] = round(time.perf_counter() - started, 1)
        (out_dir / "distill.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        return changed, report

    def rebuild(self, previous: Path, out_dir: Path, changed: set[str], timings: dict[str, float]) -> dict[str, Any]:
        """Step 7: relabel the changed tiers on both sets, retrain, recalibrate, replay."""
        started = time.perf_counter()
        router_records = read_allpairs(previous / "labels" / "router_set.jsonl", self.portfolio)
        eval_records = read_allpairs(previous / "labels" / "eval_set.jsonl", self.portfolio)
        config = derive_proxy_config(self.settings.config, out_dir, self.artifacts)  # serves out_dir's students
        both = relabel_tiers(list(router_records) + list(eval_records), config, sorted(changed),
                             work_dir=out_dir / "labels" / "work", concurrency=self.settings.concurrency,
                             max_tokens=self.settings.max_tokens, progress=self.progress)
        router_records, eval_records = both[:len(router_records)], both[len(router_records):]
        shutil.rmtree(out_dir / "labels" / "work", ignore_errors=True)
        timings["relabel"] = round(time.perf_counter() - started, 1)
        return self._fit_and_measure(out_dir, router_records, eval_records, timings)

    def iterate(self, n: int, previous: Path, out_dir: Path) -> dict[str, Any]:
        timings: dict[str, float] = {}
        inputs = out_dir / "inputs"
        inputs.mkdir(parents=True, exist_ok=True)
        records = self.read_traffic(n, previous, inputs, timings)
        items, summary = self.targeted_items(records, previous, inputs, timings)
        changed, distilled = self.distill(items, previous, out_dir, n, timings)
        metrics = self.rebuild(previous, out_dir, changed, timings)
        metrics.update({"iteration": n, "arm": "targeted", **summary, "changed_tiers": sorted(changed),
                        "distillation": distilled})
        return metrics

    # ---------------------------------------------------------------- the comparison
    def compare(self, repeats: int = 1, tasks: Optional[Sequence[str]] = None) -> dict[str, Any]:
        """Targeted (iteration 1) against random distillation of as many examples, both from iteration 0.

        ``repeats`` random arms (seeds ``seed``, ``seed + 1``, ...) measure how much of the difference is
        the luck of one draw; ``tasks`` limits the random arms to some tasks (the others keep iteration
        0's tiers, e.g. to skip re-generating with a slow generative tier).  Arms already on disk are reused.
        """
        start, targeted = iteration_dir(self.run_dir, 0), iteration_dir(self.run_dir, 1)
        for directory in (start, targeted):
            if not is_complete(directory):
                raise ValueError(f"{directory} is not complete: run the loop first (`routenlp coopt run`)")
        arms = []
        for r in range(max(1, repeats)):
            name = "random" if r == 0 else f"random-{r}"
            arm = self.run_dir / "compare" / name
            if not is_complete(arm):
                self._random_arm(start, targeted, arm, self.settings.seed + r, tasks)
            arms.append(_metrics(arm))
        result = comparison(_metrics(start), _metrics(targeted), arms)
        out = self.run_dir / "compare" / "compare.json"
        out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        return result

    def _random_arm(self, start: Path, targeted: Path, arm: Path, seed: int, tasks: Optional[Sequence[str]]) -> None:
        _fresh(arm)
        timings: dict[str, float] = {}
        inputs = arm / "inputs"
        inputs.mkdir(parents=True, exist_ok=True)
        counts = {task: c["hard"] + c["random"]
                  for task, c in composition(read_items(targeted / "inputs" / "distill_items.jsonl")).items()
                  if tasks is None or task in tasks}
        records = read_requests(targeted / "inputs" / "requests.jsonl")
        started = time.perf_counter()
        items = select_random(records, counts, seed=seed)
        items = fill_teacher_outputs(items, start / "proxy_config.yaml", max_tokens=self.settings.teacher_max_tokens,
                                     concurrency=self.settings.concurrency, progress=self.progress)
        write_items(items, inputs / "distill_items.jsonl")
        timings["select_and_teacher"] = round(time.perf_counter() - started, 1)
        changed, distilled = self.distill(items, start, arm, None, timings)
        metrics = self.rebuild(start, arm, changed, timings)
        metrics.update({"iteration": 1, "arm": "random", "seed": seed, "distill_items": composition(items),
                        "changed_tiers": sorted(changed), "distillation": distilled})
        finish_iteration(arm, metrics, 1)


def comparison(start: dict[str, Any], targeted: dict[str, Any], random_arms: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Cost-ratio reduction of each arm from the same start, overall and per task, and targeted / random.

    With several random arms the random reduction is their mean (each arm is listed too).
    """
    def arm(metrics: dict[str, Any]) -> dict[str, Any]:
        return {key: metrics.get(key) for key in ("cost_ratio", "quality", "acceptance", "cheap_share", "top_share",
                                                  "escalation_rate", "tier_acceptance_eval", "distill_items", "seed")}

    def gain(metrics: dict[str, Any], task: Optional[str] = None) -> float:
        before = start if task is None else start["per_task"][task]
        after = metrics if task is None else metrics["per_task"][task]
        return round(float(before["cost_ratio"]) - float(after["cost_ratio"]), 5)

    def ratio(targeted_gain: float, random_gain: float) -> Optional[float]:
        return round(targeted_gain / random_gain, 3) if random_gain > 0 else None

    random_gains = [gain(m) for m in random_arms]
    mean_random = round(statistics.fmean(random_gains), 5)
    per_task = {}
    for task in sorted(start.get("per_task", {})):
        each = [gain(m, task) for m in random_arms]
        mean = round(statistics.fmean(each), 5)
        per_task[task] = {"targeted": gain(targeted, task), "random_mean": mean, "random_each": each,
                          "targeted_over_random": ratio(gain(targeted, task), mean)}
    result = {"start": arm(start), "targeted": arm(targeted), "random": [arm(m) for m in random_arms],
              "cost_ratio_reduction": {"targeted": gain(targeted), "random_mean": mean_random,
                                       "random_each": random_gains,
                                       "random_sd": round(statistics.stdev(random_gains), 5) if len(random_gains) > 1
                                       else None},
              "per_task": per_task, "targeted_over_random": ratio(gain(targeted), mean_random)}
    if result["targeted_over_random"] is None:
        result["note"] = "random distillation did not lower the cost ratio on average: the ratio is undefined"
    return result


def load_settings(run_dir: str | os.PathLike[str]) -> CooptSettings:
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no co-optimisation run here (start one with `routenlp coopt run`)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    return CooptSettings.from_dict(raw, source=str(path))


def save_settings(settings: CooptSettings) -> Path:
    path = Path(settings.run_dir) / "run.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings.to_dict(), indent=1) + "\n", encoding="utf-8")
    return path


def run(settings: CooptSettings, progress: bool = True, log: Callable[[str], None] = print) -> LoopResult:
    """``routenlp coopt run``: the loop with the real pipeline (settings saved to ``run.json``)."""
    save_settings(settings)
    return run_loop(settings.run_dir, Pipeline(settings, progress=progress, log=log), settings.max_iterations,
                    settings.epsilon, log=log)
