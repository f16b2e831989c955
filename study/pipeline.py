"""Runs a job, in this order: data -> stage 1 (pre-train or import, ``study.pretrain`` on
Ray Train) -> stage 2 (the sweep of fine-tuning + attack trials, ``study.sweep`` on Ray
Tune) -> the attack suite on every model -> the analyses -> results and the report.
The pieces are in ``study.stages``; this module only orders them.

OUT layout::

    OUT/job.yaml              the resolved config that ran
    OUT/job.json              the job's MLflow experiment and parent run
    OUT/data/<dataset>/       .beton files and manifests (data.dir)
    OUT/checkpoints/          one checkpoint + record per trained model, and its
                              attack results (<stage>.eval.json, one entry per attack)
    OUT/mlflow.db             MLflow sqlite backend (local server only)
    OUT/mlartifacts/          MLflow artifact store (local server only)
    OUT/results.csv, .md      the table (the paper's Tables 1 and 2 beside ours in .md)
    OUT/sanity.csv            every sanity flag of every evaluated model
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from study import analyses, corruptions, formats, objectives, results, sweep, threat, tracking
from study.claims import judge, qualifier
from study.config import JobConfig
from study.data.beton import prepare
from study.files import atomic_write_text
from study.pretrain import fetch_weights, pretrain
from study.report import page as report_page
from study.runtime import Runtime, locks
from study.stages import Job, evaluate_trained, log, resolve_device


def prepare_data(job: Job) -> None:
    """Every split of every dataset the job reads, written once as an FFCV .beton."""
    cfg = job.cfg
    used = {cfg.pretrain.dataset} if cfg.pretrain.dataset else set()  # with weights: for the analyses
    used |= set(cfg.finetune.datasets if cfg.finetune else [])
    for key in sorted(used):
        prepared = prepare(
            cfg.dataset_name(key),
            job.data_dir,
            root=cfg.dataset_root(key),
            params=cfg.dataset_params(key),
            workers=cfg.data.workers,
            folder=key,
        )
        for split, p in prepared.items():
            log(
                f"data {key}/{split}: {p.manifest['count']} images, "
                f"{'written' if p.written else 'already prepared'} ({p.beton})"
            )


class _Table:
    """The job's result rows as its models are evaluated, and the stages behind them."""

    def __init__(self, job: Job):
        self.job, self.rows, self.sanity, self.stages, self.masks = job, [], [], {}, {}

    def add(self, stage, seed: int, key: str, backbone: str, method: str, source: str | None, point=None):
        self.stages[stage.key] = stage
        job = self.job.for_seed(seed)
        records, flags = evaluate_trained(job, stage, key, backbone, method)
        n = job.aoi_images(key, stage.record)
        model = {
            "dataset": key,
            "backbone": backbone,
            "method": method,
            "source": source,
            "seed": seed,
            "stage": stage.key,
            "images": n,
        }
        rows, sanity = results.model_rows(job.cfg, model, stage.record, records, flags, point)
        self.masks[stage.key] = results.per_image(records)
        self.rows.extend(rows)
        self.sanity.extend(sanity)


def _examples(job) -> dict | None:
    """The first test image of the first fine-tuning target the job corrupts, under each of
    its corruptions and severities (the report's example grid); None without corruptions."""
    c, ft = job.cfg.eval.corruptions, job.cfg.finetune
    keys = [k for k in (ft.datasets if ft else []) if c is not None and (c.datasets is None or k in c.datasets)]
    if not keys:
        return None
    names, severities = corruptions.check(c.names, c.severities)
    x, _ = next(iter(job.loader(keys[0], "test", 1, train=False)))
    image = corruptions.to_uint8(x[:1])[0]
    grid = corruptions.example_grid(image, names, severities, seed=job.cfg.seed, index=0)
    return {"grid": grid, "names": list(names), "severities": list(severities), "dataset": keys[0]}


def _stage1(job: Job, table: _Table) -> dict:
    """(seed, backbone, objective name) -> the pre-trained model (``Trained``), for every replicate (with
    ``pretrain.replicate: false`` every seed gets the first seed's); those trained here are
    attacked."""
    cfg, sources = job.cfg, {}
    seeds = cfg.replicate_seeds()
    for seed in seeds if cfg.pretrain.replicate else seeds[:1]:
        for backbone in cfg.pretrain.backbones:
            for objective in cfg.pretrain.objective_specs():
                name = objectives.objective_name(objective)
                sources[seed, backbone, name] = stage = pretrain(job.for_seed(seed), backbone, objective)
                if stage.record.get("AOI") is not None:  # trained here: it has a test split
                    table.add(stage, seed, cfg.pretrain.dataset, backbone, "pretrain", name)
    if not cfg.pretrain.replicate:
        sources |= {(seed, b, o): st for seed in seeds[1:] for (_, b, o), st in list(sources.items())}
    return sources


def _stage2(job: Job, table: _Table, sources: dict, parent) -> None:
    """The sweep, then every trial's model into the table."""
    cfg = job.cfg
    known = sweep.source_table(sources)
    for p in sweep.run(job, known, parent.id, parent.experiment_id):
        stage = sweep.trained_for(job, p, known)
        if stage.record is None:
            log(f"sweep: {sweep.label(p)} has no trained model (failed or stopped early)")
            continue
        table.add(stage, p["seed"], p["dataset"], p["backbone"], p["method"], sweep.source_name(cfg, p["method"]), p)


def _warn_cpu_driver(cfg: JobConfig, device) -> None:
    wants_gpu = cfg.pretrain.scaling.use_gpu or (cfg.finetune is not None and cfg.finetune.resources.gpus > 0)
    if wants_gpu and device.type == "cpu":
        # The driver itself attacks the stage-1 models (and writes the .beton files): on a
        # cluster's CPU head that is slow. `ray job submit --entrypoint-num-gpus 1` runs it on a GPU node.
        log(
            "this driver has no GPU, though the job's workers use GPUs: it attacks the stage-1 models on "
            "CPU (on a cluster, submit with `ray job submit --entrypoint-num-gpus 1`)"
        )


def run_job(cfg: JobConfig, out: Path, progress: bool = True):
    """Runs the job into ``out``, which it holds alone (study.runtime.locks: a second run into
    it stops at once); returns the results frame and its Markdown."""
    out = Path(out)
    device = resolve_device(cfg.device, cfg.deterministic)
    made = locks.prepare_out(out)
    try:
        # what the run owns (OUT's lock, its Ray, its loaders) ends with it, however it ends
        with Runtime.holding(out) as runtime:
            return _run(Job(cfg, out, device, progress, runtime=runtime))
    except BaseException:
        if made:
            locks.discard(out)  # refused before any work (a weights pin): no new folder left behind
        raise


class _Clock:
    """Where a run's time went, phase by phase: said in one line at its end, so anyone can
    see what their machine spent."""

    def __init__(self):
        self.spent: dict[str, float] = {}
        self.start = self.last = time.monotonic()

    def lap(self, phase: str) -> None:
        now = time.monotonic()
        self.spent[phase] = self.spent.get(phase, 0.0) + now - self.last
        self.last = now

    def line(self) -> str:
        parts = ", ".join(f"{k} {_duration(v)}" for k, v in self.spent.items())
        return f"time: {parts}; total {_duration(time.monotonic() - self.start)}"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def _run(job: Job):
    cfg, out, device, progress = job.cfg, job.out, job.device, job.progress
    clock = _Clock()
    formats.version(out)  # an OUT of a newer format: refused in one line before any work
    fetch_weights(job)  # downloads; a pin that does not match stops here, before anything is written
    formats.open_out(out, cfg.name, log=print)  # an older format's files upgraded in place
    atomic_write_text(out / "job.yaml", yaml.safe_dump(cfg.resolved(), sort_keys=False))
    _warn_cpu_driver(cfg, device)
    # the server starts while the data is prepared
    with tracking.owned(out, job.runtime.hold, quiet=not progress) as tracked:
        prepare_data(job)
        clock.lap("data")
        tracked.ready()
        with tracking.parent_run(out, cfg.name, cfg.hash()) as parent:
            tracking.log_yaml(cfg.resolved(), "job.yaml")
            if not parent.params:
                tracking.log_params(cfg.resolved())
            table = _Table(job)
            clock.lap("MLflow")
            sources = _stage1(job, table)
            clock.lap("stage 1")
            if cfg.finetune is not None and threat.craft_all(job, sweep.source_table(sources), log=log):
                clock.lap("transfer")  # the public-backbone threat's perturbations, crafted on f₀ once
            if cfg.finetune is not None:
                _stage2(job, table, sources, parent)
                clock.lap("sweep")
            results.select(table.rows)
            found = {}
            if cfg.finetune is not None and cfg.analyses.enabled:
                found = analyses.run_replicates(job, table.rows, table.stages, sources, log=log)
                clock.lap("analyses")
            job.runtime.ray.release()  # its daemons would take the CPUs the report needs
            df = results.frame(table.rows)
            checked = judge(df, found, table.masks)
            for c in checked:
                log(f"claim: {c['verdict']}{f' ({q})' if (q := qualifier(c)) else ''}: {c['claim']}")
            df, md = results.write(
                df, out, title=f"{cfg.name}: results", sanity=table.sanity, masks=table.masks, checked=checked
            )
            for name in ("results.csv", "results.md", "sanity.csv", "per_image.json", formats.NAME):
                tracking.log_artifact(out / name)
            if found:
                tracking.log_metrics(analyses.metrics(found))
                tracking.log_artifacts(out / "analyses", "analyses")
            page = report_page.build(
                df, found, out / "report", title=cfg.name, masks=table.masks, checked=checked, examples=_examples(job)
            )
            tracking.log_artifact(out / "report" / "claims.json")
            tracking.log_artifacts(out / "report", "report")
            log(f"report: {page}")
            clock.lap("results and report")
            log(clock.line())
            # where the time went, for `study plan JOB --from OUT` to check its plan against
            atomic_write_text(out / "timing.json", json.dumps({"job": cfg.name, "phases": clock.spent}, indent=2))
    return df, md
