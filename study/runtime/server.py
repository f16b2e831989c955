"""The MLflow server processes a run supervises: ``mlflow server`` on 127.0.0.1 for OUT's
sqlite store (``LocalServer``), its record in OUT so that a later run can stop a dead
run's server (``stop_orphan``), and ``study ui``. No MLflow API here: which server a
process logs to is study.tracking's. Every process logs over HTTP to
that one server, so no two processes ever write the sqlite file directly."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from study.files import atomic_write_text

DB_NAME = "mlflow.db"
ARTIFACTS_NAME = "mlartifacts"
LOG_NAME = "mlflow-server.log"


class TrackingError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# MLflow's documented switches, for every server the study starts (`study ui`'s too): no
# usage reports from a private machine (and no banner asking for them in the UI), and no
# job runner (GenAI scorers, trace archival: of no use to the study, and it would spend a
# run's first minute starting worker processes on our cores).
SERVER_SWITCHES = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def server_env() -> dict:
    return {**os.environ, **SERVER_SWITCHES}


def server_command(out: Path, port: int) -> list[str]:
    out = Path(out).resolve()
    executable = Path(sys.executable).with_name("mlflow")
    return [
        str(executable) if executable.exists() else "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{out / DB_NAME}",
        "--artifacts-destination",
        str(out / ARTIFACTS_NAME),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]


# Runs the server with the parent-death signal set (Linux): it gets SIGTERM the moment the
# study process that started it dies, however it dies (a SIGKILL too), and its uvicorn
# worker goes with it; then it becomes mlflow itself (the signal survives the exec).
_GUARD = (
    "import ctypes, os, signal, sys\n"
    "if sys.platform == 'linux':\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "    if os.getppid() != int(sys.argv[1]):\n"
    "        sys.exit(0)  # the parent died before the signal was set\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)
SERVER_RECORD = "mlflow-server.json"


def guarded(command: list[str]) -> list[str]:
    """``command`` run so that it ends when this process does (see _GUARD)."""
    import shutil

    program = command[0] if os.path.isabs(command[0]) else (shutil.which(command[0]) or command[0])
    return [sys.executable, "-c", _GUARD, str(os.getpid()), program, *command[1:]]


def _recorded(out: Path):
    """(OUT's server record, its process) while the process it names is alive on this host
    (the same pid and start time: not a later process given that pid); None otherwise."""
    import psutil

    try:
        rec = json.loads((Path(out) / SERVER_RECORD).read_text())
        proc = psutil.Process(int(rec["pid"]))
        same = proc.create_time() == rec["created"] and rec.get("host") == socket.gethostname()
        return (rec, proc) if same else None
    except (OSError, ValueError, KeyError, TypeError, psutil.Error):
        return None


def stop_orphan(out: Path, hold, log=print) -> None:
    """Stops the MLflow server a dead run left behind on this store (its record names it).
    ``hold``: this process's hold on OUT (``study.runtime.locks.exclusive``), the proof that no
    live run owns that server; a reader never stops anything."""
    import psutil

    if hold is None or Path(hold.out) != Path(out).resolve():
        raise TrackingError(f"{out}: only the process holding it may stop a server there")
    found = _recorded(out)
    try:
        if found is None or "mlflow" not in " ".join(found[1].cmdline()):
            return
    except psutil.Error:
        return
    rec, proc = found
    log(f"[study] stopping the MLflow server (pid {rec['pid']}) a killed run left on {Path(out) / DB_NAME}")
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(psutil.Error):
        proc.wait(15)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def live_server(out: Path) -> str | None:
    """The URI of the MLflow server OUT's record names, if that process is alive on this
    host (it may still be starting); None otherwise."""
    found = _recorded(out)
    try:
        return None if found is None else f"http://127.0.0.1:{int(found[0]['port'])}"
    except (KeyError, TypeError, ValueError):
        return None


def answers(uri: str) -> bool:
    import http.client

    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
            return r.status == 200
    except (OSError, http.client.HTTPException):  # not up yet, or another program's port (no HTTP)
        return False


def stop_group(proc: subprocess.Popen) -> None:
    """Stops a child started in its own session and every process of that session (the
    MLflow server's uvicorn workers): SIGTERM, then SIGKILL after 15 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class LocalServer:
    """``mlflow server`` on 127.0.0.1 for the store under ``out``; a context manager."""

    def __init__(self, out: Path, port: int | None = None, timeout: float = 120.0, owner: bool = True):
        """``owner``: started by the process that holds OUT, which records the server in
        OUT (SERVER_RECORD, for a later run to stop it should this one die) and logs there;
        a reader's server leaves OUT as it is (its log goes to a temporary file)."""
        self.out, self.port, self.timeout, self.owner = Path(out), port or free_port(), timeout, owner
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalServer:
        return self.launch().wait()

    def launch(self) -> LocalServer:
        """Starts the server and returns at once (``wait`` for it to answer): its start-up,
        mostly imports, can run beside the caller's own work."""
        if self.owner:
            self.out.mkdir(parents=True, exist_ok=True)
            self.log_path = self.out / LOG_NAME
        else:
            fd, name = tempfile.mkstemp(prefix="study-mlflow-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        log = open(self.log_path, "ab")
        # Its own session, so stop() takes down the server's worker processes too.
        self.proc = subprocess.Popen(
            guarded(server_command(self.out, self.port)),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=server_env(),
        )
        log.close()  # the child has its own copy
        if self.owner:
            import psutil

            record = {"pid": self.proc.pid, "port": self.port, "host": socket.gethostname()}
            with contextlib.suppress(psutil.Error):
                record["created"] = psutil.Process(self.proc.pid).create_time()
            atomic_write_text(self.out / SERVER_RECORD, json.dumps(record))
        self.deadline = time.monotonic() + self.timeout
        return self

    def wait(self) -> LocalServer:
        while time.monotonic() < self.deadline:
            if self.proc.poll() is not None:
                raise TrackingError(f"mlflow server exited with {self.proc.returncode}; see {self.log_path}")
            if answers(self.uri):
                return self
            time.sleep(0.3)
        self.stop()
        raise TrackingError(f"mlflow server did not answer within {self.timeout:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            if not self.owner:
                self.log_path.unlink(missing_ok=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def serve_ui(out: Path, port: int = 5000) -> int:
    """`study ui`: the MLflow UI over OUT's store, in the foreground, on 127.0.0.1. While a
    live run holds OUT its own server already serves the UI: its address is printed and
    nothing else starts (two servers writing one sqlite file is what the study never does).
    Otherwise the UI holds OUT for as long as it serves (the UI can edit the store), so a
    run into OUT meanwhile is refused, naming it."""
    from study.runtime import locks

    out = Path(out)
    if not (out / DB_NAME).exists():
        raise TrackingError(f"no MLflow store at {out / DB_NAME}; run a job with --out {out} first")
    if locks.held(out):
        uri = live_server(out)
        if uri is None:
            raise locks.Busy(f"{out} is held by a live process that runs no MLflow server yet; try again in a minute")
        print(f"[study] {out} is in use by a live run; its MLflow server serves the UI: {uri}", flush=True)
        return 0
    from study.runtime import Runtime

    with Runtime.holding(out, "study ui") as runtime:
        stop_orphan(out, runtime.hold)
        server = LocalServer(out, port=port, owner=True)
        print(f"[study] MLflow UI on {server.uri} (Ctrl-C to stop)", flush=True)
        # its own session, stopped as a whole however study ends (Ctrl-C, SIGTERM, an error):
        # stopping only the mlflow command would leave its uvicorn workers serving the port
        server.launch()
        try:
            return server.proc.wait()
        finally:
            server.stop()
