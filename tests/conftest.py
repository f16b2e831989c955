import os

import pytest

os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# The session's own Ray (ray_local, the cluster) under `uv run`: Ray would rebuild this uv
# environment per job in a copy of the working directory (a run switches it off for the
# Ray it starts: study.runtime.local_ray); read by Ray once, when it is imported.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

# The suite runs on two pytest-xdist workers (pyproject: -n 2 --dist loadscope) and keeps
# both cores busy: most of its CPU goes to processes starting (Ray's daemons, Ray Train and
# Tune workers importing torch, MLflow servers) and to the few whole runs. The modules that
# share costly state go to one worker as one unit: the two-node cluster, the local Ray
# (SessionRay: started once per unit, stopped when its tests are done), the trained
# ResNet-18. A worker holds at most two queued units: the two longest go first, one to each
# worker, then the single tests, then the trained model's unit, taken by whichever worker
# frees up first. The tests that run two whole jobs side by side (test_safety's fixture,
# on the session's Ray; test_sweep's two local runs, each with a Ray and an MLflow server of
# its own) share the local Ray's unit: on two workers at once they put four jobs, four Rays
# and their servers on 2 cores, and a slow host missed their deadlines. (The ConvNeXt
# study, a single test, starts a session Ray where it runs, and stops it after.)
GROUPS = {
    "test_pipeline.py": "ray_cluster",
    "test_distributed.py": "ray_local",
    "test_sweep.py": "ray_local",
    "test_replicates.py": "ray_local",
    "test_safety.py": "ray_local",  # its module fixture: one job run twice at once
    "test_attacks.py": "trained",
    "test_evaluate.py": "trained",
    "test_objectives.py": "trained",
}
ORDER = ["ray_cluster", "ray_local", None, "trained"]

# a job of the simulated studies' unit (study.simulate: job "sim", target "target"), for
# `study plan --evidence` on a simulated pilot; nothing of it ever trains
SIM_JOB = {
    "name": "sim",
    "device": "cpu",
    "datasets": {
        "source": {"name": "shapes", "params": {"train_per_class": 2, "test_per_class": 1}},
        "target": {"name": "alphabet", "params": {"train_per_class": 4, "test_per_class": 20}},
    },
    "pretrain": {"dataset": "source", "train": {"epochs": 1}},
    "finetune": {"datasets": ["target"], "methods": ["scratch", "full"], "train": {"epochs": 2}},
    "eval": {"attacks": ["pgd10_linf_0.5"]},
}


def _group(nodeid: str) -> str | None:
    return GROUPS.get(nodeid.split("::", 1)[0].rsplit("/", 1)[-1])


def pytest_collection_modifyitems(config, items):
    # stable: within a unit, and among the single tests, collection order is kept, but for
    # the tests on the session's local Ray, which go first: it starts once and stops when
    # they are done (SessionRay)
    items.sort(key=lambda item: (ORDER.index(_group(item.nodeid)), "ray_local" not in item.fixturenames))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's load-scope scheduler with this suite's units (a group, else the test).
    Not `--dist loadgroup` with xdist_group marks: with pytest 9.2 those marks are
    silently ignored (pytest-xdist issue #1386)."""
    from xdist.scheduler import LoadScopeScheduling

    class Units(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid) or nodeid

    return Units(config, log)


@pytest.fixture(scope="session")
def small_alphabet(tmp_path_factory):
    """A small alphabet prepared once per session: {split: Prepared}."""
    from study.data.beton import prepare

    out = tmp_path_factory.mktemp("data")
    return prepare("alphabet", out, params=dict(train_per_class=12, test_per_class=4), workers=1)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A ResNet-18 trained for a few epochs on a small alphabet, and its test batches."""
    import torch

    from study.data.beton import prepare
    from study.data.loaders import make_loader
    from study.engine import Trainer, TrainSettings
    from study.models import build_model

    data = prepare(
        "alphabet", tmp_path_factory.mktemp("attack-data"), params=dict(train_per_class=60, test_per_class=4), workers=1
    )
    torch.manual_seed(0)
    train = make_loader(data["train"].beton, train=True, resolution=32, batch_size=64, workers=1, seed=0)
    test = make_loader(data["test"].beton, train=False, resolution=32, batch_size=104, workers=1)
    model = build_model("resnet18", 26)
    Trainer(model, TrainSettings(epochs=6, lr_f=0.05, lr_g=0.05), "f+g", len(train)).fit(train, progress=False)
    return model.eval(), [(x.clone(), y.clone()) for x, y in test]  # FFCV reuses its buffers


@pytest.fixture(autouse=True, scope="session")
def numba_quiet():
    """What a run's Runtime does while it runs: the harmless KeyError numba's finalizer
    prints when an FFCV loader is collected is dropped (study.runtime.environ)."""
    import gc

    from study.runtime.environ import numba_quiet

    with numba_quiet():
        yield
        gc.collect()  # the session's loaders go while the hook still holds


class SessionRay:
    """This worker's local Ray (2 CPUs), started when a test first needs it and stopped as
    soon as the next test does not (``pytest_runtest_teardown``): an idle Ray's daemons take
    about 8 % of a core, which the suite's other worker needs (the suite is CPU-bound)."""

    started = False

    def up(self):
        import ray

        if not ray.is_initialized():
            ray.init(address="local", num_cpus=2, dashboard_host="127.0.0.1")  # never a stale cluster
            self.started = True
        return ray

    def down(self) -> None:
        import ray

        if self.started and ray.is_initialized():
            ray.shutdown()
        self.started = False


SESSION_RAY = pytest.StashKey[SessionRay]()


@pytest.fixture(scope="session")
def session_ray(pytestconfig):
    holder = pytestconfig.stash[SESSION_RAY] = SessionRay()
    yield holder
    holder.down()


@pytest.fixture(scope="module")
def ray_local(session_ray):
    """The local Ray, up for a module's tests that ask for it (and their module fixtures)."""
    return session_ray.up()


@pytest.fixture(autouse=True)
def _ray_up_when_asked(request):
    """Up again for a later test of a module whose Ray was stopped between its tests."""
    if "ray_local" in request.fixturenames:
        request.getfixturevalue("session_ray").up()


@pytest.hookimpl(trylast=True)  # after the test's fixtures are torn down
def pytest_runtest_teardown(item, nextitem):
    if "ray_local" in item.fixturenames and (nextitem is None or "ray_local" not in nextitem.fixturenames):
        item.config.stash[SESSION_RAY].down()


@pytest.fixture
def run_study(ray_local, mlflow_server):
    """``study run JOB --out OUT --quiet`` in a fresh process on the session's local Ray and
    MLflow server; asserts that it exits 0 and returns what it printed."""
    import subprocess
    import sys

    def run(job, out, timeout: int = 600) -> str:
        env = {
            **os.environ,
            "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
            "MLFLOW_TRACKING_URI": mlflow_server,
        }
        cmd = [sys.executable, "-m", "study.cli", "run", str(job), "--out", str(out), "--quiet"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    return run


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (sqlite backend) on 127.0.0.1 for the session."""
    from study.tracking import LocalServer

    root = tmp_path_factory.mktemp("mlflow")
    with LocalServer(root) as server:
        yield server.uri


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(ok, seconds: float, what: str, procs=()) -> None:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ok():
            return
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: `ray start` exited with {p.returncode}")
        time.sleep(1)
    raise TimeoutError(f"{what} did not come up in {seconds} s")


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _kill_with_token(token: str) -> None:
    """SIGKILLs every process that carries this cluster's auth token in its environment:
    the nodes' daemons and workers, whatever process group they ended up in."""
    import psutil

    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get("RAY_AUTH_TOKEN") == token:
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A real two-node Ray cluster on 127.0.0.1, the way a cluster is made by hand: a head
    (`ray start --head`, 1 CPU) and a second node joined to it (`ray start --address`,
    1 CPU), with Ray's token authentication (a token of this cluster's own). Each
    `ray start --block` runs in its own process group, so the clean-up stops exactly these
    two nodes (never the session's local Ray), also when a test fails. The second node has
    a temp dir of its own: two raylets on one machine would otherwise unpack and
    garbage-collect the job's working directory in the same folder, and a worker's
    cwd vanishes under it (FileNotFoundError in os.getcwd). Every node's agents get free
    ports of their own: on the defaults (52365 ...) a second node, or the session's local
    Ray, holds the head's job-agent port, the head's agent never registers, and every
    submission is refused with "No available agent to submit job"."""
    import secrets
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    bin_dir = Path(sys.executable).parent
    ray_cli = str(bin_dir / "ray")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    )
    root = tmp_path_factory.mktemp("ray-cluster")
    short = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))  # Unix socket paths: at most 107 bytes
    port, dash = _free_port(), _free_port()
    common = ["--block", "--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    procs = []

    def start(name, *args):
        ports = [
            f"--{flag}={_free_port()}"
            for flag in (
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "runtime-env-agent-port",
                "metrics-export-port",
                "node-manager-port",
                "object-manager-port",
            )
        ]
        with open(root / f"{name}.log", "w") as log:
            procs.append(
                subprocess.Popen(
                    [ray_cli, "start", *args, *common, *ports],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def alive_nodes() -> int:
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import ray; ray.init(address={f'127.0.0.1:{port}'!r}, logging_level='ERROR'); "
                "print('NODES', sum(n['Alive'] for n in ray.nodes()))",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = [x for x in probe.stdout.splitlines() if x.startswith("NODES ")]
        return int(lines[-1].split()[1]) if lines else 0

    address = f"http://127.0.0.1:{dash}"
    try:
        start(
            "head",
            "--head",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--ray-client-server-port={_free_port()}",
            f"--temp-dir={short / 'head'}",
        )
        _wait_for(lambda: _port_open(port), 120, "the head's GCS", procs)
        start(
            "node2", f"--address=127.0.0.1:{port}", f"--temp-dir={short / 'node2'}"
        )  # joins while the head's dashboard starts
        _wait_for(
            lambda: (
                subprocess.run([ray_cli, "job", "list", "--address", address], env=env, capture_output=True).returncode
                == 0
            ),
            180,
            "the head's job API",
            procs,
        )
        _wait_for(lambda: alive_nodes() == 2, 180, "the second node", procs)

        def submit(*entrypoint, cwd, timeout=900):
            """`ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- ...`,
            followed to its end. The job API answers before the head's job agent has
            registered; until then a submission is refused (and nothing is submitted)."""
            cmd = [
                ray_cli,
                "job",
                "submit",
                "--address",
                address,
                "--working-dir",
                ".",
                "--runtime-env",
                "jobs/runtime_env.yaml",
                "--",
                *entrypoint,
            ]
            deadline = time.monotonic() + 120
            while True:
                done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
                if "No available agent to submit job" not in done.stdout + done.stderr:
                    return done
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        "the head's job agent never registered:\n" + (root / "head.log").read_text()[-3000:]
                    )
                time.sleep(2)

        yield {
            "address": address,
            "gcs": f"127.0.0.1:{port}",
            "env": env,
            "ray": ray_cli,
            "logs": root,
            "submit": submit,
        }
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        _kill_with_token(env["RAY_AUTH_TOKEN"])  # whatever is left of these two nodes, and only of them
        for p in procs:
            p.wait(timeout=30)
        shutil.rmtree(short, ignore_errors=True)


def tracked_checkout(dest):
    """A copy of the checkout's tracked files (as they are in the working tree) at
    ``dest``: what `ray job submit --working-dir .` uploads in tests, so that nothing
    untracked lying in a developer's checkout (an OUT, data) changes what the suite does."""
    import shutil
    import subprocess
    from pathlib import Path

    from study import cli

    root = cli.jobs_dir().parent
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True)
    if listed.returncode != 0:  # not a git checkout: everything but the environment
        shutil.copytree(root, dest, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__"))
        return Path(dest)
    for rel in filter(None, listed.stdout.decode().split("\0")):
        src = root / rel
        if src.is_file():
            (Path(dest) / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, Path(dest) / rel)
    return Path(dest)
