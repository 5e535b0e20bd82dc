"""Data-parallel training of `distill` and `select` on Ray Train (`--executor ray --train-workers N`).

Ray Train starts N workers (one GPU each with `use_gpu`, else one CPU each), joins them in a torch
process group (NCCL on GPUs, Gloo on CPUs) and runs a function on every rank; the function is
`stages.distill.distill_on_rank` or `stages.select.select_on_rank`, which train with
`model.parallel.DataParallel` (torch's DistributedDataParallel) and have rank 0 write the weights
into the stage's partial folder. Each rank trains on the device Ray Train gives it
(`ray.train.torch.get_device`: its own GPU among those of its node, or the CPU). The features are read by every rank from the work
folder, which every node must see.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medsclean.errors import DataError, MedscleanError
from medsclean.distributed.session import RaySession


class DataParallelTrainer:
    """Runs a function on `workers` Ray Train ranks.

    Attributes:
        workers: the world size.
        use_gpu: one GPU per rank (else one CPU, torch on one thread).
        storage: where Ray Train keeps its run folder (removed after each run).
    """

    def __init__(self, session: RaySession, workers: int, use_gpu: bool, storage: Path):
        self.session = session
        self.workers = workers
        self.use_gpu = use_gpu
        self.storage = storage

    def run(self, function: Callable[[dict, Any], None], payload: dict) -> None:
        """`function(payload, DataParallel(rank, workers, device))` on every rank; returns when all are done.

        Raises:
            DataError: `use_gpu` on a private instance with fewer GPUs than ranks (NCCL puts one rank
                on each GPU; Ray Train would wait for GPUs that never come).
            MedscleanError: what a rank raised (a medsclean error as is), or Ray Train's failure.
        """
        import logging

        import ray

        gpus = int(ray.cluster_resources().get("GPU", 0))
        if self.use_gpu and self.session.private and gpus < self.workers:
            raise DataError(f"--train-workers {self.workers} --device cuda needs {self.workers} GPUs, one per "
                            f"rank, and this machine has {gpus}: lower --train-workers, or join a cluster "
                            f"with --ray-address")

        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        logging.getLogger("ray.train").setLevel(logging.WARNING)
        name = f"medsclean-train-{uuid.uuid4().hex[:12]}"
        self.storage.mkdir(parents=True, exist_ok=True)
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={"function": function, "payload": payload, "use_gpu": self.use_gpu},
            scaling_config=ScalingConfig(num_workers=self.workers, use_gpu=self.use_gpu,
                                         resources_per_worker={"CPU": 1, **({"GPU": 1} if self.use_gpu else {})}),
            run_config=RunConfig(storage_path=str(self.storage), name=name),
        )
        try:
            trainer.fit()
        except Exception as exc:  # Ray wraps what a rank raised
            raise _rank_error(exc) from None
        finally:
            shutil.rmtree(self.storage / name, ignore_errors=True)
            try:
                self.storage.rmdir()  # when no other run is using it
            except OSError:
                pass


def _train_loop(config: dict) -> None:
    import ray.train
    import torch

    context = ray.train.get_context()
    config["function"](config["payload"], _rank(context.get_world_rank(), context.get_world_size(),
                                                config["use_gpu"]))


def _rank(rank: int, world: int, use_gpu: bool):
    """This worker's `model.parallel.DataParallel`: on a GPU worker the CUDA device Ray Train assigned it
    (made current, so that NCCL and the CUDA RNG use it), else the CPU with torch on one thread
    (the rank owns one CPU)."""
    import torch

    from medsclean.model.parallel import DataParallel

    if not use_gpu:
        torch.set_num_threads(1)
        return DataParallel(rank, world, "cpu")
    from ray.train.torch import get_device

    device = get_device()
    torch.cuda.set_device(device)
    return DataParallel(rank, world, str(device))


def _rank_error(exc: BaseException) -> MedscleanError:
    """The medsclean error a rank raised, found in Ray's chain of causes, or one naming Ray's failure."""
    seen = exc
    for _ in range(10):
        if isinstance(seen, MedscleanError):
            return seen
        nested = getattr(seen, "worker_failures", None) or {}
        for failure in (nested.values() if isinstance(nested, dict) else nested):
            if isinstance(failure, MedscleanError):
                return failure
        seen = seen.__cause__ or getattr(seen, "cause", None)
        if seen is None:
            break
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return MedscleanError(f"data-parallel training on Ray Train failed: {first}")
