"""A Ray connection for one command: started on first use, shut down when the command ends.

With no address, `connect` starts a private Ray instance on this machine (`workers` CPUs, no
dashboard, no usage reporting) and `shutdown` stops it with every process it started, so nothing
is left running. With an address (`auto`, `ray://host:port`) it joins that cluster and leaves it
running. Joining a cluster first checks that every node sees the work folder: each node reads a
token file written there by this process.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from medsclean.config import ClusterConfig
from medsclean.errors import DataError

IN_FLIGHT_PER_WORKER = 2  # tasks submitted ahead per worker: keeps workers busy, bounds the object store
PROBE_TIMEOUT_S = 60.0

_SESSION: "RaySession | None" = None


class RaySession:
    """A live Ray connection: `workers` CPUs; `map_tasks` runs tasks on them.

    Attributes:
        address: the cluster's address ("local" for a private instance).
        private: whether this process started the instance (and stops it in `close`).
        workers: CPUs the cluster offers to tasks.
    """

    def __init__(self, cfg: ClusterConfig, work: Path, reporter: Any = None):
        import ray

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no reporting home
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        self.private = cfg.address is None
        options = dict(include_dashboard=False, log_to_driver=False, configure_logging=False,
                       ignore_reinit_error=True)
        if self.private:
            # Ray says on stderr that it turned its token authentication on: the default, kept, not news.
            logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
            ray.init(num_cpus=cfg.workers or os.cpu_count() or 1, **options)
        else:
            ray.init(address=cfg.address, **options)
        self._ray = ray
        self.address = "local" if self.private else cfg.address
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        if not self.private:
            check_shared_work_folder(work)
        if reporter is not None:
            where = "a private Ray instance" if self.private else f"the Ray cluster at {cfg.address}"
            reporter.info(f"executor: {where}, {self.workers} CPU workers")

    def map_tasks(self, function: Callable, job: Any, tasks: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        """Run `function(job, task)` for every task on the workers (one CPU each, and one GPU each when
        `job.device` is "cuda"); yield (task, result) as they finish. `job` is sent to the object store
        once. Results are torch tensors."""
        ray = self._ray
        gpus = 1 if getattr(job, "device", "cpu") == "cuda" else 0
        remote = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=2)(_call_single_threaded)
        job_ref = ray.put(job)
        pending: dict[Any, Any] = {}
        queue = list(tasks)
        limit = IN_FLIGHT_PER_WORKER * self.workers
        position = 0
        while position < len(queue) or pending:
            while position < len(queue) and len(pending) < limit:
                pending[remote.remote(function, job_ref, queue[position])] = queue[position]
                position += 1
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                yield pending.pop(ref), _as_tensor(ray.get(ref))

    def close(self) -> None:
        if self._ray.is_initialized():
            self._ray.shutdown()


def _call_single_threaded(function: Callable, job: Any, task: Any):
    """A task body: torch on one thread (the worker owns one CPU); the result as numpy for the store."""
    import torch

    torch.set_num_threads(1)
    return function(job, task).numpy()


def _as_tensor(array):
    import numpy as np
    import torch

    return torch.from_numpy(np.array(array))  # a writable copy of the object store's read-only buffer


def check_shared_work_folder(work: Path) -> int:
    """Every alive node of the cluster must read a token this process writes into `work`.

    Returns:
        The number of nodes that read it.

    Raises:
        DataError: naming the nodes that do not see it.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    work.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    probe = work / f".cluster-probe-{token}"
    probe.write_text(token, encoding="utf-8")
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        reader = ray.remote(num_cpus=0)(_read_probe)
        # One probe per node, keyed by node id: several nodes may share a host (and its address).
        refs = {f"{n['NodeManagerAddress']} (node {n['NodeID'][:8]})": reader.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(probe))
            for n in nodes}
        blind = [node for node, ref in refs.items() if ray.get(ref, timeout=PROBE_TIMEOUT_S) != token]
    finally:
        probe.unlink(missing_ok=True)
    if blind:
        raise DataError(f"{work}: the work folder is not visible from Ray node(s) {', '.join(sorted(blind))}; "
                        f"put it on storage every node mounts at the same path (e.g. NFS) and pass that path "
                        f"as --work")
    return len(refs)


def _read_probe(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError:
        return None


def connect(cfg: ClusterConfig, work: Path, reporter: Any = None) -> RaySession:
    """The command's Ray session, started on first use."""
    global _SESSION
    if _SESSION is None:
        _SESSION = RaySession(cfg, work, reporter)
    return _SESSION


def shutdown() -> None:
    """Stop what `connect` started (a private instance and its processes); a no-op without one."""
    global _SESSION
    if _SESSION is not None:
        session, _SESSION = _SESSION, None
        session.close()
