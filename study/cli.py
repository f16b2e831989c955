"""The `study` command.

    study run JOB.yaml [--out DIR]       run what a job file declares
    study demo [--out DIR]               run jobs/demo.yaml (Fashion-MNIST source, generated targets)
    study data prepare NAME --out DIR [--root DIR] [--param KEY=VALUE ...]
    study ui [--out DIR] [--port N]      the MLflow UI over OUT's store
    study weights list                   the catalog of pre-trained models and torchvision's weights
    study weights fetch NAME             download into the cache; print the path and sha256
    study weights verify NAME --data ROOT [--images N] [--attack [NAME]]
                                         its ImageNet accuracy beside the published one
    study plan JOB.yaml [--costs FILE] [--no-measure] [--evidence OUT] [--from OUT] [--cluster 8xGPU]
                                         trials, stages and GPU-hours, before anything starts
    study report [--experiment NAME] [--from OUT] --out DIR
                                         the paper's tables and figures rebuilt from MLflow

Exit codes: 0 done, 2 bad input (one line on stderr naming what is wrong), 1 failure.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import yaml

USAGE_ERROR = 2


def jobs_dir() -> Path:
    """jobs/ beside the package (a checkout) or shipped inside it (an installed wheel)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "jobs", here / "_jobs"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("the jobs/ folder was not found beside the study package")


def _folder(text: str) -> Path:
    """An --out argument: an empty one would be the current folder (a checkout, often)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty folder name (it would mean the current folder); give a folder")
    if "\0" in text:
        raise argparse.ArgumentTypeError("a folder name with a NUL byte")
    return Path(text)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: give at least 1")
    return n


def _parse_param(text: str):
    from study.config import ConfigError

    if "=" not in text:
        raise ConfigError(f"--param {text!r}: expected KEY=VALUE")
    key, value = text.split("=", 1)
    return key, yaml.safe_load(value)


def cmd_run(args, job_path: Path) -> int:
    from study import config

    cfg = config.load(job_path)  # everything is checked before anything starts
    if cfg.limits.gpu_hours is not None:  # the budget, against the measured costs
        from study import costs, plan

        est = plan.estimate(cfg, costs.load(Path(cfg.limits.costs).expanduser()))
        if est["unknown"] or not est["seconds"] / 3600 <= cfg.limits.gpu_hours:  # NaN-safe
            raise config.ConfigError(
                f"limits.gpu_hours: the estimate is {est['seconds'] / 3600:,.1f} GPU-hours against a limit "
                f"of {cfg.limits.gpu_hours:g}"
                + (f" (not counted: {'; '.join(est['unknown'])})" if est["unknown"] else "")
            )
    out = Path(args.out or Path("runs") / cfg.name)
    from study.pipeline import run_job

    _, md = run_job(cfg, out, progress=not args.quiet)
    print()
    print(md)
    print(f"\n[study] results: {out / 'results.csv'}  {out / 'results.md'}")
    print(f"[study] MLflow store: {out / 'mlflow.db'}  (browse: study ui --out {out})")
    return 0


def cmd_data_prepare(args) -> int:
    from study.data.beton import prepare
    from study.data.registry import DatasetError, get_info, resolve_params

    get_info(args.name)
    if args.out.exists() and not args.out.is_dir():
        raise DatasetError(f"--out {args.out}: exists and is not a folder; give a folder")
    params = resolve_params(args.name, dict(_parse_param(p) for p in args.param))
    for split, p in prepare(args.name, Path(args.out), root=args.root, params=params, workers=args.workers).items():
        state = "written" if p.written else "already prepared, nothing to do"
        print(
            f"{args.name}/{split}: {p.manifest['count']} images, "
            f"{p.manifest['num_classes']} classes -> {p.beton} ({state})"
        )
    return 0


def cmd_ui(args) -> int:
    from study.config import ConfigError
    from study.tracking import DB_NAME, serve_ui

    if not (Path(args.out) / DB_NAME).is_file():  # a wrong --out is a usage error, as elsewhere
        raise ConfigError(f"no MLflow store at {Path(args.out) / DB_NAME}; run a job with --out {args.out} first")
    return serve_ui(Path(args.out), args.port)


def cmd_plan(args) -> int:
    from study import config, plan

    cfg = config.load(args.job, check_paths=False)  # the data may lie on the cluster only
    # a pilot and a run to check against are read before any measuring
    pilot = plan.read_pilot(cfg, args.evidence) if args.evidence is not None else None
    run = plan.read_run(cfg, args.source) if args.source is not None else None
    cluster = plan.parse_cluster(args.cluster) if args.cluster else None
    costs = args.costs or (Path(cfg.limits.costs).expanduser() if cfg.limits.costs else None)
    costs = costs or Path.home() / ".cache" / "study" / "costs.json"
    table = plan.costs_for(cfg, costs, not args.no_measure)
    shares = plan.pilot_shares(run[0]) if run else None
    est = plan.estimate(cfg, table, shares, cluster)
    print(plan.render(cfg, est, measured=run[1] if run else None))
    if run:
        table = plan.calibrate(table, est, run[1], args.source)
        fixed = ", ".join(f"{k} {v:.3g} s" for k, v in table["fixed"].items())
        print(f"fixed costs measured from {args.source}: {fixed}")
        if not args.no_measure:
            from study.costs import store

            store(costs, table)
            print(f"  stored in {costs}: later plans on this machine use them")
    print(f"costs: {costs}")
    if pilot is not None:
        print("\n".join(plan.evidence(cfg, table, args.evidence, pilot, args.at)))
    return 0


def cmd_weights(args) -> int:
    from tabulate import tabulate

    from study import weights as hub

    if args.weights_command == "list":
        rows = hub.listing([args.backbone] if args.backbone else None)
        print(tabulate(rows, headers="keys", floatfmt=".2f", missingval="-"))
        for ns, e in {e["namespace"]: e for e in hub.catalog().values()}.items():
            print(f"\n{ns}/: {e['citation']}\n  hub: {e['repo']}\n  published numbers: {e['published']}")
        print("\ntorchvision: accuracies from its weights' metadata (acc@1 on ImageNet-1K)")
        return 0
    src = hub.parse(args.name, args.backbone)
    if args.weights_command == "verify":  # before any download
        if not (args.data / "val").is_dir():
            raise hub.WeightsError(f"{args.data / 'val'}: no ImageNet validation folder (ROOT/val/<wnid>/<image>)")
        if args.attack not in (None, "own"):
            from study.attacks import AttackError, parse_attack

            try:
                parse_attack(args.attack)
            except AttackError as err:
                raise hub.WeightsError(f"--attack: {err}") from None
    got = hub.fetch(src, args.cache)
    print(f"{args.name}: {got.path}" + (f" (hub commit {got.revision})" if got.revision else ""))
    print(f"sha256 {got.sha256}")
    if args.weights_command == "fetch":
        print(f"pin it in a job: weights: {{from: {args.name}, sha256: {got.sha256}}}")
        return 0
    if args.weights_command == "check":
        arch = src.arch or args.backbone
        if arch is None:
            raise hub.WeightsError(f"{args.name}: say which architecture the file holds (--backbone)")
        _, terms = hub.checked(got, arch, [args.resolution], args.classes)
        for term in terms:
            print(f"  {term.name:9s} {'ok' if term.passed else 'not probed'}: {term.detail}")
        print(f"{args.name} ({arch}) keeps the model contract at {args.resolution} px")
        return 0
    return _verify(args, hub, src, got)


def _verify(args, hub, src, got) -> int:
    import torch

    arch = src.arch or args.backbone
    if arch is None:
        raise hub.WeightsError(f"{args.name}: say which architecture the file holds (--backbone)")
    attack = hub.default_attack(src) if args.attack == "own" else args.attack
    res = hub.verify(
        got,
        arch,
        args.data,
        args.images,
        attack,
        args.resolution,
        args.batch_size,
        "cuda" if torch.cuda.is_available() else "cpu",
    )
    published = args.expect if args.expect is not None else src.published
    print(
        f"{args.name} ({arch}{', ' + hub.threat(src.entry) if src.entry else ''}) on {res['images']} "
        f"ImageNet validation images of {args.data}"
    )
    print(
        f"  clean {res['clean']:.2f} % [{res['clean_lo']:.2f}, {res['clean_hi']:.2f}] (Wilson 95 %)"
        + (f"; published {published:.2f} %" if published is not None else "; nothing published to compare")
    )
    if "robust" in res:
        known = (src.entry or {}).get("robust")
        print(
            f"  robust under {res['attack']}: {res['robust']:.2f} %"
            + (f"; published {known:.2f} %" if known is not None else "; not published")
        )
    if published is None:
        return 0
    if res["clean_hi"] + args.tolerance < published:
        print(
            f"  FAILED: even the interval's upper end is more than {args.tolerance:g} points below the "
            f"published {published:.2f} %: this file does not behave as the published model"
        )
        return 1
    print(f"  consistent with the published number (within {args.tolerance:g} points of the interval)")
    return 0


def cmd_report(args) -> int:
    """From $MLFLOW_TRACKING_URI (a cluster's server), else from the store of a job
    folder (--from OUT, served locally for the time it takes)."""
    import os

    from study import tracking
    from study.report import page as report_page
    from study.runtime import locks

    locks.check_out(args.out)  # not the file system's root, a checkout's top or a file
    store = Path(args.source)
    if not os.environ.get("MLFLOW_TRACKING_URI") and not (store / tracking.DB_NAME).is_file():
        print(
            f"study: error: no MLflow store at {store / tracking.DB_NAME} and no MLFLOW_TRACKING_URI", file=sys.stderr
        )
        return USAGE_ERROR
    try:  # a live run's OUT: its own server, left running
        page = tracking.read_store(store, lambda: report_page.from_mlflow(Path(args.out), args.experiment))
    except LookupError as err:
        print(f"study: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    print(f"[study] report: {page}")
    return 0


def _weights_parser(sub) -> None:
    """`study weights list|fetch|verify`."""
    w = sub.add_parser("weights", help="pre-trained weights by name: the catalog, fetching, checking")
    ws = w.add_subparsers(dest="weights_command", required=True)
    wl = ws.add_parser("list", help="the catalog (Salman et al.'s robust models) and torchvision's weights")
    wl.add_argument("--backbone", help="only this architecture")
    for verb, text in (
        ("fetch", "download into the cache; print the path and sha256"),
        ("check", "load into the study's architecture and hold it to the model contract (study.contract)"),
        ("verify", "clean (and robust) ImageNet accuracy beside the published number"),
    ):
        wv = ws.add_parser(verb, help=text)
        wv.add_argument("name", help="a catalog name, hf://OWNER/REPO/FILE[@REV], IMAGENET1K_V1 or a path")
        wv.add_argument("--backbone", help="the architecture, where the name does not say it")
        wv.add_argument("--cache", type=Path, help="download folder (default: huggingface_hub's and torch's caches)")
        if verb == "check":
            wv.add_argument("--resolution", type=_positive, default=224, help="the side the job runs it at")
            wv.add_argument("--classes", type=_positive, default=1000, help="the classes its head has")
    wv.add_argument("--data", type=Path, required=True, help="ImageNet's root (ROOT/val/<wnid>/...)")
    wv.add_argument("--images", type=_positive, default=1000, help="validation images, one class after another")
    wv.add_argument(
        "--attack",
        nargs="?",
        const="own",
        help="also attack: an attack name, or none for PGD-10 at the model's own eps",
    )
    wv.add_argument(
        "--tolerance",
        type=float,
        default=2.0,
        help="points the clean accuracy's interval may lie below the published number",
    )
    wv.add_argument("--expect", type=float, help="the accuracy to compare with (default: the published one)")
    wv.add_argument("--resolution", type=int, default=224)
    wv.add_argument("--batch-size", type=_positive, default=50)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="study", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a job file")
    r.add_argument("job", type=Path)
    r.add_argument("--out", type=_folder, help="output folder (default runs/<job name>)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")

    d = sub.add_parser(
        "demo",
        help="the whole study on one laptop: Fashion-MNIST as the source, alphabet and two generated targets "
        "(jobs/demo.yaml)",
    )
    d.add_argument("--out", type=_folder, default=Path("runs/demo"))
    d.add_argument("--quiet", action="store_true")

    data = sub.add_parser("data", help="dataset commands").add_subparsers(dest="data_command", required=True)
    dp = data.add_parser("prepare", help="write a dataset's splits as FFCV .beton files")
    dp.add_argument("name")
    dp.add_argument("--out", type=_folder, required=True)
    dp.add_argument("--root", help="where a real dataset lies on disk")
    dp.add_argument("--param", action="append", default=[], help="generator parameter KEY=VALUE")
    dp.add_argument("--workers", type=_positive, default=2)

    u = sub.add_parser("ui", help="serve the MLflow UI on a job's store")
    u.add_argument("--out", type=_folder, default=Path("runs/demo"))
    u.add_argument("--port", type=_positive, default=5000)

    _weights_parser(sub)

    pl = sub.add_parser("plan", help="trials, stages and a GPU-hour estimate, without starting anything")
    pl.add_argument("job", type=Path)
    pl.add_argument("--costs", type=Path, help="per-image costs file (default: the job's limits.costs)")
    pl.add_argument(
        "--evidence",
        type=Path,
        metavar="OUT",
        help="a pilot run's folder: the seeds and test images each claim needs for an 80 %% chance of a "
        "conclusive verdict at the pilot's effect, and what that costs",
    )
    pl.add_argument(
        "--at",
        choices=("lower", "point"),
        default="lower",
        help="with --evidence: plan at the pilot's lower plausible effect (default) or at its point estimate",
    )
    pl.add_argument(
        "--from",
        dest="source",
        type=Path,
        metavar="OUT",
        help="a finished run of this job: the plan beside what each stage took there, and the fixed "
        "costs measured from it (stored in the costs file)",
    )
    pl.add_argument("--cluster", help="wall-clock on N devices instead of this machine: 8xGPU, 16xCPU")
    pl.add_argument(
        "--no-measure",
        action="store_true",
        help="use the costs file as it is (default: time what it lacks on this machine's "
        "device, a few seconds per backbone, and store it there)",
    )

    rp = sub.add_parser("report", help="rebuild the paper's tables and figures from MLflow")
    rp.add_argument("--out", type=_folder, required=True, help="folder for index.html, index.md and the PNGs")
    rp.add_argument("--experiment", help="one MLflow experiment (a job's name); default: all")
    rp.add_argument(
        "--from",
        dest="source",
        default="runs/demo",
        help="a job's OUT whose store to read when MLFLOW_TRACKING_URI is unset",
    )
    return p


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("run", "demo") and args.out:  # before the imports: a held OUT stops at once
        from study.runtime.locks import Busy, check_free

        try:
            check_free(Path(args.out))
        except Busy as err:
            print(f"study: error: {err}", file=sys.stderr)
            return USAGE_ERROR
    from study.config import ConfigError
    from study.data.beton import BetonError
    from study.data.registry import DatasetError
    from study.files import BadInput
    from study.models import ModelError
    from study.runtime.locks import Busy, Unusable
    from study.tracking import TrackingError

    # SIGTERM (a killed job) unwinds like Ctrl-C, so the local MLflow server is stopped.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.command == "run":
            return cmd_run(args, args.job)
        if args.command == "demo":
            return cmd_run(args, jobs_dir() / "demo.yaml")
        if args.command == "data":
            return cmd_data_prepare(args)
        if args.command == "ui":
            return cmd_ui(args)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "plan":
            return cmd_plan(args)
        if args.command == "weights":
            return cmd_weights(args)
    except (ConfigError, DatasetError, ModelError, Busy, Unusable, BadInput) as err:
        print(f"study: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except (BetonError, TrackingError) as err:
        print(f"study: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("study: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
