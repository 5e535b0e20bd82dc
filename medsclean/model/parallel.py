"""One process's place among data-parallel trainers, and the devices of its collectives.

`DataParallel` is what Steps 2 and 3 need to train as one rank of a torch.distributed process group
(started by `medsclean.distributed.train` on Ray Train, or by a test): its share of every batch,
the DistributedDataParallel wrapper, and the two collectives the loops use besides the gradient
average (the loss mean and rank 0's keep mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from medsclean.errors import MedscleanError
from medsclean.seeding import rng


def collective_device(device: str | torch.device) -> torch.device:
    """The device of the tensors this rank hands to `torch.distributed` collectives.

    NCCL takes CUDA tensors only: with it, the rank's own CUDA device (`device`, its index made
    explicit). Gloo (and any other backend) gets CPU tensors. Needs an initialised process group.

    Raises:
        MedscleanError: an NCCL-only group on a rank that does not train on CUDA.
    """
    import torch.distributed as dist

    device = torch.device(device)
    backend = str(dist.get_backend()).lower()
    if "nccl" in backend and device.type == "cuda":
        return torch.device("cuda", cuda_index(device))
    if backend == "nccl":
        raise MedscleanError(f"the NCCL process group needs CUDA ranks, but this rank trains on {device}")
    return torch.device("cpu")


@dataclass(frozen=True)
class DataParallel:
    """This process's place among `world` data-parallel trainers (torch.distributed is initialised).

    Every rank draws the same batch of image indices and trains on its share, `batch[rank::world]`,
    through `torch.nn.parallel.DistributedDataParallel`, which averages the gradients over the
    ranks during the backward pass, so all ranks keep identical weights. Each rank's loss is
    weighted by its share of the batch times the world size (`share`), so the averaged gradient
    of a mean loss is the gradient of the mean over the whole batch even when the batch does not
    divide evenly: the update is the single-process update on the whole batch (without dropout;
    each rank has its own dropout stream, seeded from the run seed and its rank, so a run is
    reproducible for a fixed world size). Step 3's hard mining picks its hard points among the
    rank's share, not the whole batch.

    The only collectives left here are the loss mean and the keep-mask broadcast; they run on
    tensors of `collective_device(device)`.

    Attributes:
        rank: this process's rank, 0 .. world - 1.
        world: the number of ranks.
        device: where this rank trains ("cpu", or its own "cuda:N").
    """

    rank: int
    world: int
    device: str = "cpu"

    def share(self, batch: Tensor) -> tuple[Tensor, float]:
        """This rank's share of a batch and the weight of its loss.

        Args:
            batch: (B,) image indices of the whole batch, the same on every rank.

        Returns:
            (B_r,) the rank's indices, `batch[rank::world]`, and B_r * world / B, so that the
            ranks' average of weighted share means is the whole batch's mean. A batch smaller
            than the world is trained whole by every rank, weight 1.
        """
        if len(batch) < self.world:
            return batch, 1.0
        mine = batch[self.rank :: self.world]
        return mine, len(mine) * self.world / len(batch)

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """`model` (already on `device`) in DistributedDataParallel: one device per rank, its index
        given on CUDA. DDP broadcasts rank 0's weights once (every rank built the same ones from the
        seed) and averages the gradients in buckets during the backward pass."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [cuda_index(device)] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)

    def rank_seed(self, seed: int) -> int:
        """The seed of this rank's own dropout stream: `seed` in a world of one, else one drawn from
        (seed, "rank", rank), so that ranks drop different units and a run stays reproducible."""
        if self.world == 1:
            return seed
        return int(rng(seed, "rank", self.rank).integers(2**62))

    def mean(self, value: Tensor) -> float:
        """The mean over the ranks of a scalar tensor (one all_reduce, on the collective device)."""
        import torch.distributed as dist

        total = value.detach().reshape(1).to(device=collective_device(self.device), dtype=torch.float64)
        dist.all_reduce(total)
        return float(total.item()) / self.world

    def from_rank0(self, array: np.ndarray) -> np.ndarray:
        """Rank 0's copy of a bool or numeric array on every rank (the selections must agree even if
        maps differ by a bit); one broadcast, on the collective device. Returns the array's dtype."""
        import torch.distributed as dist

        values = np.ascontiguousarray(array)
        carried = values.view(np.uint8) if values.dtype == np.bool_ else values
        tensor = torch.from_numpy(carried.copy()).to(collective_device(self.device))
        dist.broadcast(tensor, src=0)
        return tensor.cpu().numpy().view(values.dtype).reshape(values.shape)


def cuda_index(device: torch.device) -> int:
    """The index of a CUDA device; the current device for a bare "cuda"."""
    return device.index if device.index is not None else torch.cuda.current_device()
