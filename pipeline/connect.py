"""The Ray this run works on: the cluster of RAY_ADDRESS (or of ``ray job submit``), or an embedded one on this
machine's loopback; quiet unless asked."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger("pipeline")
ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"  # where an embedded Ray's node lives: reachable from this machine only


def init_ray(verbose: bool = False) -> bool:
    """Connects to RAY_ADDRESS's cluster or starts an embedded one; returns whether Ray is embedded (this machine
    alone). Quiet unless ``verbose``: no Ray Data progress blocks or INFO logs, and worker output stays in Ray's
    log files (``ray logs``, the dashboard)."""
    import ray

    embedded = not os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return embedded
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token files for an embedded local cluster
    level = logging.INFO if verbose else logging.WARNING
    if os.environ.get("RAY_ADDRESS"):  # a cluster, or the one `ray job submit` runs us on
        log.info("connecting to the Ray cluster at %s", os.environ["RAY_ADDRESS"])
        ray.init(log_to_driver=verbose, logging_level=level)
    else:  # embedded local Ray; workers must import this project even when it is not pip-installed
        log.info("starting an embedded local Ray on %s (set RAY_ADDRESS to use a cluster)", LOOPBACK)
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        # address="local": a new Ray of this run's own. Without it ray.init() joins the newest `ray start` cluster
        # on the machine (/tmp/ray/ray_current_cluster), and waits for ever when that cluster has gone.
        with single_machine_ray():
            ray.init(address="local", runtime_env={"env_vars": {"PYTHONPATH": path}}, include_dashboard=False,
                     log_to_driver=verbose, logging_level=level, _node_ip_address=LOOPBACK)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # Blocks leave in the order they finish: a late block holds up no other (pipeline/reorder.py puts the rows
    # back in plan order for the writer).
    ctx.execution_options.preserve_order = False
    ctx.enable_progress_bars = verbose
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(level)
    if not verbose:  # its one line saying that progress bars are off
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    return embedded


@contextmanager
def single_machine_ray() -> Iterator[None]:
    """Makes the Ray nodes (and drivers) started inside the block keep to the loopback. Ray replaces a node address
    of 127.0.0.1 with the machine's network address (so that other machines could join) unless it runs as a
    one-machine Ray, as it does on macOS and Windows: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which Ray reads when
    it is imported (and into the constant set here, for a process that imported it before). Both are restored
    after the block: a node, once started, keeps its address, and a later ray.init to a cluster in this process
    resolves addresses as Ray does by default."""
    import ray._private.ray_constants as constants  # ray 2.60's home of that switch

    name = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    env, constant = os.environ.get(name), constants.ENABLE_RAY_CLUSTER
    os.environ[name], constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = constant
        if env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = env
