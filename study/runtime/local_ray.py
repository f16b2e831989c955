"""The Ray a run uses (``LocalRay``: a cluster's, or a local one on the loopback that the run
starts and stops) and the set-up of every process of that local Ray
(``quiet_ray_process``). A run's ``Runtime`` holds its ``LocalRay``; nothing here holds
state of its own."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from study.runtime.environ import numba_quiet_hook, switched


@dataclass
class LocalRay:
    """The Ray a run uses, as an object the run owns (``Runtime.ray``): a cluster's (the job's
    address, or $RAY_ADDRESS as under ``ray job submit``), or a local Ray it starts on the
    loopback and stops (``release``). While the local one runs, RAY_ADDRESS points this
    process and its children at it."""

    started: bool = False  # a local Ray this run started (not a cluster's, not the tests')
    address: str | None = None  # that Ray's GCS address, in RAY_ADDRESS while it runs
    filtered: bool = False  # this driver's logger filter below, added by ``ensure``

    def ensure(self, address: str | None = None, num_cpus: int | None = None) -> None:
        """Connects to the cluster, else starts a local Ray; nothing when Ray is already up."""
        import os

        import ray

        if ray.is_initialized():
            return
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            with _own_environment():
                ray.init(address=address)
            return
        self.filtered = _filter_autoscaling_noise()
        with _own_environment(), _on_loopback():
            ray.init(
                address="local",
                num_cpus=num_cpus,
                _node_ip_address="127.0.0.1",
                # the dashboard serves Ray's state API, which Ray Train's clean-up polls
                dashboard_host="127.0.0.1",
                runtime_env={"worker_process_setup_hook": "study.runtime.local_ray.quiet_ray_process"},
            )
        self.started = True
        if ray.is_initialized():
            os.environ["RAY_ADDRESS"] = self.address = ray.get_runtime_context().gcs_address

    def release(self) -> None:
        """Stops the local Ray this run started, once no stage needs it: its idle daemons
        (dashboard, agents) otherwise take a share of a small machine's CPUs from the stages
        that follow (docs/guide/stage1.md, "On a small machine"). A Ray this run did not
        start (a cluster, or the tests') is left alone."""
        import os

        import ray

        if self.started and ray.is_initialized():
            ray.shutdown()
        if self.address is not None and os.environ.get("RAY_ADDRESS") == self.address:
            del os.environ["RAY_ADDRESS"]  # that Ray is gone
        if self.filtered:
            logging.getLogger(AUTOSCALING_LOGGER).removeFilter(_not_autoscaling_noise)
        self.started, self.address, self.filtered = False, None, False


@contextlib.contextmanager
def _own_environment():
    """Under `uv run`, Ray by default rebuilds the driver's uv environment for every job in a
    copy of the working directory. The workers of a Ray that study starts here use this very
    environment; a cluster's nodes get theirs from their set-up commands (cluster.yaml). The
    driver reads the switch from Ray's constants (read once, when Ray is imported) while it
    starts; its child processes from the environment."""
    from ray._private import ray_constants

    saved = ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV
    ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False
    try:
        with switched({"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}):
            yield
    finally:
        ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = saved


@contextlib.contextmanager
def _on_loopback():
    """A local Ray whose every process (GCS, raylet, workers, the dashboard's agents and
    this driver) listens on 127.0.0.1 only. Ray replaces a node address of 127.0.0.1 by
    the machine's outward one, except where it is told that it runs no cluster (as on
    macOS and Windows): its switch for that, read by each process Ray starts from its
    environment and by this one from its constants, holds while Ray starts. A cluster
    run keeps what its own ``ray start`` says."""

    from ray._private import ray_constants

    # and Ray's documented switch for its usage reports: no machine here reports home
    switches = {ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0", "RAY_USAGE_STATS_ENABLED": "0"}
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with switched(switches):
            yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag


# Ray Train's controller asks the cluster's autoscaler for its workers' resources every
# 20 s and, when the answer takes over 5 s (a busy small machine), logs a warning with a
# traceback that Ray itself calls safe to ignore when transient. A local Ray has no
# autoscaler to ask, so the study's console drops exactly that record; every other
# warning and error of Ray's still shows.
AUTOSCALING_LOGGER = "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"
AUTOSCALING_NOISE = "Failed to send resource request"


def _not_autoscaling_noise(record) -> bool:
    return not str(record.msg).startswith(AUTOSCALING_NOISE)


def _filter_autoscaling_noise() -> bool:
    """The filter on this process's logger; False when it was there already."""
    logger = logging.getLogger(AUTOSCALING_LOGGER)
    if _not_autoscaling_noise in logger.filters:
        return False
    logger.addFilter(_not_autoscaling_noise)
    return True


def quiet_ray_process() -> None:
    """The local Ray's ``worker_process_setup_hook`` (and the driver's): drops the
    autoscaling request's transient warning above (no other record); points each of the
    local Ray's workers at that Ray (RAY_ADDRESS: Ray's state API, which Ray Train's
    clean-up polls, otherwise looks for a Ray on the machine and, where two jobs run, says
    "Found multiple active Ray instances" and talks to the newest, maybe the other job's);
    keeps their torch.distributed on the loopback; and drops numba's finalizer noise of
    FFCV's loaders (study.runtime.environ). For the life of that worker process."""
    import os
    import sys

    import ray

    if ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        # a local Ray's workers: torch.distributed on the loopback too (gloo's pair sockets
        # bind the interface named here; its rendezvous store, _store_on_loopback)
        if sys.platform == "linux":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        _store_on_loopback()

    _filter_autoscaling_noise()
    sys.unraisablehook = numba_quiet_hook(sys.unraisablehook)


def _store_on_loopback() -> None:
    """PyTorch's rendezvous store (the ``TCPStore`` that rank 0 serves while
    ``init_process_group`` runs, as Ray Train calls it) binds every interface, and PyTorch
    has no setting for its address; it does take a socket already bound. In a local Ray's
    workers rank 0 hands it one bound to 127.0.0.1 (the master address is the loopback
    there: the local Ray's node address)."""
    import importlib
    import socket

    # the module: torch.distributed's namespace has a function of the same name
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    plain = rendezvous.TCPStore
    if getattr(plain, "on_loopback", False):
        return

    def store(*args, **kw):
        if not args and kw.get("is_master") and kw.get("master_listen_fd") is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", int(kw["port"])))
            sock.listen(socket.SOMAXCONN)
            kw["master_listen_fd"] = sock.detach()
        return plain(*args, **kw)

    store.on_loopback = True
    rendezvous.TCPStore = store
