"""MLflow: a local tracking server when none is given, and the study's run layout.

Locally (``MLFLOW_TRACKING_URI`` unset) the CLI starts ``mlflow server`` on 127.0.0.1
at a free port, with the sqlite backend ``OUT/mlflow.db`` and the artifact store
``OUT/mlartifacts``, and stops it on exit. Every process -- the driver, Ray workers,
Tune trials -- logs over HTTP to that one server, so no two processes ever write
the sqlite file directly.

Layout: one experiment per job (the job's ``name``), a parent run per job, a child run
per trained model (tagged ``mlflow.parentRunId``).

This module is the study's one door to MLflow: no other module imports it (a test holds
that), so the server, the run layout, the names and what a failed call means live here.
HTTP retries are MLflow's own (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``); a call that fails
after them raises, except where a function below says what it skips.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from study.files import atomic_write_text
from study.runtime.server import (
    ARTIFACTS_NAME,
    DB_NAME,
    LOG_NAME,
    SERVER_RECORD,
    SERVER_SWITCHES,
    LocalServer,
    TrackingError,
    free_port,
    guarded,
    live_server,
    serve_ui,
    server_command,
    server_env,
    stop_group,
    stop_orphan,
)
from study.tracking.connect import Tracking, owned, quiet_mlflow, quiet_worker, read_store, reading


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}; other values stay as they are (log_params stringifies)."""
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, f"{key}."))
        else:
            flat[key] = v
    return flat


def log_params(params: dict) -> None:
    import mlflow

    items = [(k, str(v)[:6000]) for k, v in flatten(params).items()]
    for i in range(0, len(items), 100):  # MLflow's per-batch limit
        mlflow.log_params(dict(items[i : i + 100]))


def log_yaml(obj: dict, name: str) -> None:
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(yaml.safe_dump(obj, sort_keys=False))
        mlflow.log_artifact(str(path))


def pip_requirements() -> list[str]:
    """Pinned from this environment, so log_model needs no slow requirement inference."""
    from importlib.metadata import version

    return [f"torch=={version('torch')}", f"torchvision=={version('torchvision')}"]


def log_model(model, name: str = "model") -> None:
    """Logs a StudyModel: it loads back with mlflow.pytorch.load_model as a module that
    takes [0,1] images and returns logits."""
    import mlflow.pytorch

    # pickle, not the default pt2: pt2 freezes the traced input shape, and the study
    # needs a module for any batch size. Only the study's own runs are loaded this way.
    mlflow.pytorch.log_model(
        model.cpu().eval(), name=name, serialization_format="pickle", pip_requirements=pip_requirements()
    )


def metric_key(name: str) -> str:
    """A name as MLflow takes it in a metric key (no brackets, ``=`` or commas):
    ``pgd10_linf_0.5[loss=cw,rel_step=2.5]`` -> ``pgd10_linf_0.5:loss-cw:rel_step-2.5``."""
    return name.replace("[", ":").replace("]", "").replace("=", "-").replace(",", ":")


def log_evaluation(run_id: str, records: list[dict], flags: list, logged: set) -> None:
    """A model's attack results into its run: ``AOI|AAI|DR/<attack>`` (``metric_key``) for the records not
    ``logged`` before, ``sanity/<flag>`` (1 = every instance passed), ``attacks.csv``,
    ``attacks.json`` (a table the UI shows), ``sanity.json`` and the ``study.sanity`` tag."""
    import mlflow
    import pandas as pd

    client = mlflow.MlflowClient()
    main = [r for r in records if not r["probe"]]  # the eps = 0 probe is only a flag
    for r in main:
        if r["key"] in logged:
            continue
        for m in ("AOI", "AAI", "DR"):
            if r[m] == r[m]:  # not NaN
                client.log_metric(run_id, f"{m}/{metric_key(r['attack'])}", float(r[m]))
    for name in dict.fromkeys(f.name for f in flags):
        ok = all(f.passed for f in flags if f.name == name)
        client.log_metric(run_id, f"sanity/{name}", 1.0 if ok else 0.0)
    cols = [
        "attack",
        "images",
        "AOI",
        "AAI",
        "DR",
        "max_delta",
        "eps_pixels",
        "in_range",
        "vanishing_gradients",
        "seconds",
    ]
    table = pd.DataFrame([{c: r[c] for c in cols} for r in main], columns=cols)
    client.log_text(run_id, table.to_csv(index=False), "attacks.csv")
    mlflow.log_table(table, artifact_file="attacks.json", run_id=run_id)
    client.log_dict(run_id, [f.__dict__ for f in flags], "sanity.json")
    bad = sorted({f.name for f in flags if not f.passed})
    client.set_tag(run_id, "study.sanity", "pass" if not bad else "fail: " + ", ".join(bad))


@dataclass
class Run:
    """A run of the study's layout, active while its ``with`` block runs: the study's own
    small type (no MLflow object leaves this module). ``params``: what it held on entry."""

    id: str
    experiment_id: str
    params: dict
    active: object = field(repr=False)  # MLflow's ActiveRun: it ends the run on exit

    @classmethod
    def of(cls, active) -> Run:
        return cls(active.info.run_id, active.info.experiment_id, dict(active.data.params), active)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc):
        return self.active.__exit__(*exc)


def parent_run(out: Path, name: str, config_hash: str) -> Run:
    """The job's parent run: resumed when this OUT already ran the same config."""
    import mlflow

    exp_id = get_or_create_experiment(name)
    mlflow.set_experiment(experiment_id=exp_id)  # child runs land beside their parent
    state = Path(out) / "job.json"
    if state.is_file():
        prev = json.loads(state.read_text())
        if prev.get("config_hash") == config_hash:
            if run_exists(prev["parent_run_id"], "the job's parent run"):
                return Run.of(mlflow.start_run(run_id=prev["parent_run_id"]))
    run = Run.of(mlflow.start_run(experiment_id=exp_id, run_name=name))
    atomic_write_text(
        state, json.dumps({"config_hash": config_hash, "experiment_id": exp_id, "parent_run_id": run.id}, indent=2)
    )
    return run


def get_or_create_experiment(name: str) -> str:
    """The experiment's id; two runs of one job starting at once on one server may both
    find none and both create it: the one that loses takes the winner's."""
    import mlflow
    from mlflow.exceptions import MlflowException

    exp = mlflow.get_experiment_by_name(name)
    if exp:
        return exp.experiment_id
    try:
        return mlflow.create_experiment(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS" or not (exp := mlflow.get_experiment_by_name(name)):
            raise
        return exp.experiment_id


def _split_dataset(name: str, beton: Path, manifest: dict, count: int, digest: str):
    """A .beton split as an MLflow dataset: the job's dataset key as its name, a config
    hash as its digest, what it holds as its profile."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    class Split(MetaDataset):
        @property
        def profile(self):
            return {
                "count": count,
                "num_classes": manifest["num_classes"],
                "split": manifest["split"],
                "dataset": manifest["dataset"],
            }

        def to_dict(self):
            return super().to_dict() | {"profile": json.dumps(self.profile)}

    return Split(LocalArtifactDatasetSource(str(beton)), name=name, digest=digest)


def log_splits(name: str, parts: list[tuple[str, Path, dict, int, str]]) -> None:
    """The splits the active run reads, as its dataset inputs (the MLflow UI's Dataset
    column, ``search_runs`` by dataset): (context, .beton, manifest, images, digest) each,
    context ``training``, ``validation`` or ``evaluation``."""
    import mlflow

    for context, beton, manifest, count, digest in parts:
        mlflow.log_input(_split_dataset(name, beton, manifest, count, digest), context=context)


# -- runs, metrics, tags and artifacts: every other module's MLflow calls -------------------
def uri() -> str:
    """The tracking URI in use (what a Ray worker is handed to log to the same server)."""
    import mlflow

    return mlflow.get_tracking_uri()


def use(tracking_uri: str, experiment_id: str | None = None) -> None:
    """Points this process (a Ray worker, a Tune trial) at the job's server and experiment."""
    import mlflow

    quiet_worker()
    mlflow.set_tracking_uri(tracking_uri)
    if experiment_id is not None:
        mlflow.set_experiment(experiment_id=experiment_id)


def client(tracking_uri: str | None = None):
    import mlflow

    return mlflow.MlflowClient(tracking_uri)


def run_exists(run_id: str, what: str) -> bool:
    """Whether the store in use has the run; a run it does not have (another store, a
    deleted run) is said in one line and is False."""
    from mlflow.exceptions import MlflowException

    try:
        client().get_run(run_id)
        return True
    except MlflowException as e:
        print(f"[study] {what} {run_id} is not in this MLflow store ({e.error_code}); starting a new run", flush=True)
        return False


def child_run(name: str, parent_run_id: str | None = None, resume_id: str | None = None) -> Run:
    """A child run of the job: of the active run, or of ``parent_run_id`` in a process
    that has none (a Tune trial); ``resume_id`` continues that run instead."""
    import mlflow

    if resume_id is not None:
        return Run.of(mlflow.start_run(run_id=resume_id, nested=parent_run_id is None))
    if parent_run_id:
        return Run.of(mlflow.start_run(run_name=name, parent_run_id=parent_run_id))
    return Run.of(mlflow.start_run(run_name=name, nested=True))


def mark_killed(run_id: str) -> None:
    """Ends a run that a killed attempt left RUNNING (skipped, and said, when the store
    does not have it)."""
    if run_exists(run_id, "the run a killed attempt left"):
        client().set_terminated(run_id, status="KILLED")


def set_tags(tags: dict) -> None:
    import mlflow

    mlflow.set_tags(tags)


def log_metric(key: str, value: float) -> None:
    import mlflow

    mlflow.log_metric(key, value)


def log_metrics(metrics: dict) -> None:
    import mlflow

    mlflow.log_metrics(metrics)


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    import mlflow

    mlflow.log_artifact(str(path), artifact_path)


def log_artifacts(folder: Path, artifact_path: str) -> None:
    import mlflow

    mlflow.log_artifacts(str(folder), artifact_path)


class History:
    """A run's per-epoch metrics as the study logs them: ``sync`` logs every epoch of a
    trainer's history that the run does not have yet, so a resumed run logs each epoch
    exactly once. Its MLflow client stays inside."""

    def __init__(self, run_id: str, tracking_uri: str | None = None):
        self.run_id, self._client = run_id, client(tracking_uri)

    def logged(self, key: str = "train_loss") -> list[int]:
        """The epochs the run holds ``key`` for, in the order they were logged."""
        return [int(m.step) for m in self._client.get_metric_history(self.run_id, key)]

    def sync(self, history: list[dict]) -> int:
        """Returns how many epochs it logged."""
        from mlflow.entities import Metric

        done = set(self.logged())
        now = int(time.time() * 1000)
        new = 0
        for m in history:
            if int(m["epoch"]) in done:
                continue
            metrics = [Metric(k, float(v), now, int(m["epoch"])) for k, v in m.items() if k != "epoch"]
            self._client.log_batch(self.run_id, metrics=metrics)
            new += 1
        return new


def job_runs(experiment: str | None = None) -> list[tuple[str, str, str, set]]:
    """For each experiment (or the one named), its newest finished job run (a parent run)
    that logged ``results.csv``: (experiment name, run id, run name, its artifact paths)."""
    c = client()
    if experiment:
        exp = c.get_experiment_by_name(experiment)
        if exp is None:
            known = ", ".join(e.name for e in c.search_experiments()) or "none"
            raise LookupError(f"no MLflow experiment named {experiment!r} (known: {known})")
        exps = [exp]
    else:
        exps = [e for e in c.search_experiments() if e.name != "Default"]
    found = []
    for exp in exps:
        runs = c.search_runs(
            [exp.experiment_id],
            "attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=200,
        )
        for run in runs:
            if run.data.tags.get("mlflow.parentRunId"):
                continue
            have = {a.path for a in c.list_artifacts(run.info.run_id)}
            if "results.csv" in have:
                found.append((exp.name, run.info.run_id, run.info.run_name, have))
                break
    if not found:
        raise LookupError(
            "no finished job run with results.csv in "
            + (f"experiment {experiment!r}" if experiment else "any experiment")
        )
    return found


def download(run_id: str, artifact_path: str, dest: Path) -> Path:
    return Path(client().download_artifacts(run_id, artifact_path, str(dest)))


__all__ = [
    "History",
    "Run",
    "ARTIFACTS_NAME",
    "DB_NAME",
    "LOG_NAME",
    "LocalServer",
    "SERVER_RECORD",
    "SERVER_SWITCHES",
    "Tracking",
    "TrackingError",
    "child_run",
    "client",
    "download",
    "flatten",
    "free_port",
    "get_or_create_experiment",
    "guarded",
    "job_runs",
    "live_server",
    "log_artifact",
    "log_artifacts",
    "log_evaluation",
    "log_metric",
    "log_metrics",
    "log_model",
    "log_params",
    "log_splits",
    "log_yaml",
    "mark_killed",
    "metric_key",
    "owned",
    "parent_run",
    "pip_requirements",
    "quiet_mlflow",
    "quiet_worker",
    "read_store",
    "reading",
    "run_exists",
    "serve_ui",
    "server_command",
    "server_env",
    "set_tags",
    "stop_group",
    "stop_orphan",
    "uri",
    "use",
]
