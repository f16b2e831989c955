"""The study's MLflow client side: which tracking server this process logs to. The process
that holds OUT starts a server on OUT's store (``owned``); a reader uses the live run's
server or one of its own (``reading``); the user's ``MLFLOW_TRACKING_URI`` wins over both.
The server processes themselves are study.runtime.server's."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from study.runtime import locks
from study.runtime.environ import switched
from study.runtime.server import DB_NAME, LocalServer, TrackingError, answers, live_server, stop_orphan


class Tracking:
    """What ``tracking`` yields: ``ready()`` waits for the server (once) and returns the URI."""

    def __init__(self, uri: str | None = None, server: LocalServer | None = None, quiet: bool = False):
        self.uri, self.server, self.quiet = uri, server, quiet
        self.live = False  # the server of a live run that holds OUT (``reading``)

    def ready(self) -> str:
        import mlflow

        if self.uri is None:
            self.uri = self.server.wait().uri
            os.environ["MLFLOW_TRACKING_URI"] = self.uri  # child processes (Ray) inherit it
            if not self.quiet:
                print(f"[study] MLflow at {self.uri}", flush=True)
        mlflow.set_tracking_uri(self.uri)
        return self.uri


@contextlib.contextmanager
def owned(out: Path, hold, quiet: bool = False):
    """For the process that holds OUT (``hold``: ``study.runtime.locks.exclusive``'s): yields a
    ``Tracking`` of the user's ``MLFLOW_TRACKING_URI``, or of a local server on OUT's
    store, launched on entry (it starts while the caller goes on; ``ready()`` waits for
    it). A server a dead run left on the store is stopped first."""

    @contextlib.contextmanager
    def own():
        stop_orphan(out, hold)
        if not quiet:
            print(f"[study] starting MLflow server (sqlite {Path(out) / DB_NAME}) ...", flush=True)
        with _served(LocalServer(out, owner=True), quiet) as tracked:
            yield tracked

    with _connected(own) as tracked:
        yield tracked


@contextlib.contextmanager
def reading(out: Path, wait: float = 120.0):
    """For a command that only reads OUT's store (``study report``): the user's
    ``MLFLOW_TRACKING_URI``; else, while a live process holds OUT, the server it runs
    (waited for up to ``wait`` seconds while it starts); else a server of this process's
    own that leaves OUT as it is. Never stops a server, never writes into OUT."""

    @contextlib.contextmanager
    def found():
        uri = _live_answering(out, wait) if locks.held(out) else None
        if uri is not None:
            with _given(uri) as tracked:
                tracked.live = True
                yield tracked
            return
        with _served(LocalServer(out, owner=False), quiet=True) as tracked:
            yield tracked

    with _connected(found) as tracked:
        yield tracked


@contextlib.contextmanager
def _connected(local):
    """The user's ``MLFLOW_TRACKING_URI`` where set, else what ``local()`` yields; MLflow
    kept quiet (``quiet_mlflow``) either way."""
    given = os.environ.get("MLFLOW_TRACKING_URI")
    with quiet_mlflow(), _given(given) if given else local() as tracked:
        yield tracked


def _live_answering(out: Path, wait: float) -> str | None:
    """The URI of the server of the live process holding OUT, once it answers (it may be
    starting); None when OUT comes free meanwhile (the run ended)."""
    deadline = time.monotonic() + wait
    while locks.held(out):
        if (uri := live_server(out)) and answers(uri):
            return uri
        if time.monotonic() > deadline:
            raise TrackingError(
                f"{out} is held by a live run whose MLflow server does not answer; try again in a minute"
            )
        time.sleep(0.5)
    return None


def read_store(out: Path, read):
    """``read()`` under ``reading(out)``. A live run's server goes away when the run ends:
    if it went while ``read`` used it, ``read`` runs once more on a server of this
    process's own (OUT is free by then)."""
    for last in (False, True):
        with reading(out) as tracked:
            tracked.ready()
            try:
                return read()
            except Exception:
                if last or not tracked.live or answers(tracked.uri):
                    raise


@contextlib.contextmanager
def _given(uri: str):
    import mlflow

    try:
        yield Tracking(uri)
    finally:
        mlflow.set_tracking_uri(None)
        _forget_artifact_repos()


@contextlib.contextmanager
def _served(server: LocalServer, quiet: bool):
    import mlflow

    server.launch()
    try:
        yield Tracking(server=server, quiet=quiet)
    finally:
        server.stop()
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        mlflow.set_tracking_uri(None)
        _forget_artifact_repos()


def _forget_artifact_repos() -> None:
    """MLflow caches each run's artifact client by run id alone, with the server's address
    inside; a later server for the same store (another port) must not reuse it."""
    try:
        from mlflow.tracking._tracking_service import utils

        utils._artifact_repos_cache.clear()
    except (ImportError, AttributeError):
        pass


# Keeps the console for the study while it logs: no run URLs per run, no warning about the
# pickle format we chose on purpose (see log_model); and no usage reports from this client.
CLIENT_SWITCHES = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}
QUIET_LOGGERS = ("mlflow.pytorch", "mlflow.utils.environment", "mlflow.models.model", "mlflow.utils.uv_utils")


def quiet_mlflow():
    """The switches and logger levels above while a block runs (a user's own setting of a
    switch wins); as they were after it."""
    return switched(CLIENT_SWITCHES, QUIET_LOGGERS, keep=True)


def quiet_worker() -> None:
    """The same, for the rest of a Ray worker's life (a Tune trial, an analysis actor): the
    worker is the run's for as long as it lives."""
    import logging

    for k, v in CLIENT_SWITCHES.items():
        os.environ.setdefault(k, v)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
