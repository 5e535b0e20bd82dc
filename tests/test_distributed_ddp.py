"""Data-parallel training in the library (`model.parallel.DataParallel`, DistributedDataParallel), without Ray.

Oracles, all computed here in one process:
- two Gloo ranks on a batch that does not divide evenly (7 images: shares of 4 and 3) make the
  single-process update on the whole batch, step after step, and record the whole batch's loss;
  the plain average of the two share means (what the weighting corrects) is shown to differ;
- one rank in a Gloo group trains exactly as no process group at all, with one all_reduce per
  step (the loss) and one broadcast per re-selection: no collective per parameter;
- with an NCCL group on a CUDA rank every tensor handed to a collective is on that CUDA device
  (checked without a GPU: the backend's name is replaced and the tensors are fake CUDA tensors).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.distributed as dist

from medsclean.config import DistillConfig, SelectConfig
from medsclean.errors import MedscleanError
from medsclean.model.losses import map_regression_loss
from medsclean.model.decoder import ModelConfig, ReconstructionModel
from medsclean.model.loop import TrainContext
from medsclean.model.parallel import DataParallel, collective_device
from medsclean.model.training import compute_maps, distill, progressive_select

N_IMAGES, TOKENS, WIDTH = 20, 1 + 16, 16
UNEVEN = DistillConfig(iters=4, batch_size=7, dropout=0.0, warmup=1, checkpoint_every=0, lr=5e-3)


def _problem(seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Two float16 groups (N, 1 + 16, 16) and (N, 16) target maps."""
    gen = torch.Generator().manual_seed(seed)
    groups = [torch.randn(N_IMAGES, TOKENS, WIDTH, generator=gen).half() for _ in range(2)]
    return groups, torch.rand(N_IMAGES, TOKENS - 1, generator=gen) * 0.5


def _model(dropout: float = 0.0) -> ReconstructionModel:
    return ReconstructionModel(ModelConfig((WIDTH, WIDTH), n_prefix=1, depth=2, heads=2, dropout=dropout), seed=1)


def _gloo_rank(rank: int, world: int, folder: str) -> None:
    """A spawned rank: join a Gloo group through a file, distill with DataParallel, save its weights."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        groups, targets = _problem()
        model = _model()
        context = TrainContext(seed=2, parallel=DataParallel(rank, world, "cpu"))
        history = distill(model, groups, targets, UNEVEN, context)
        torch.save({"state": model.state_dict(), "loss": history["loss"]}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_on_an_uneven_batch_make_the_whole_batch_update(tmp_path):
    torch.set_num_threads(1)
    groups, targets = _problem()
    one = _model()
    whole = distill(one, groups, targets, UNEVEN, TrainContext(seed=2))  # the single-process oracle
    torch.multiprocessing.start_processes(_gloo_rank, args=(2, str(tmp_path)), nprocs=2, join=True,
                                          start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, value in one.state_dict().items():
        for rank in ranks:
            assert torch.allclose(rank["state"][name], value, atol=5e-6, rtol=1e-5), name  # weight 1: 1e-2 off
    assert ranks[0]["loss"] == pytest.approx(whole["loss"], rel=1e-5)  # the whole batch's loss, every step
    assert not torch.allclose(_model().state_dict()["blocks.0.attn.qkv.weight"],
                              one.state_dict()["blocks.0.attn.qkv.weight"])  # the updates moved the weights

    # The weighting matters at these sizes: the plain mean of the share means is another loss.
    batch = torch.arange(7)
    shares = [batch[0::2], batch[1::2]]
    maps = compute_maps(_model(), [g[batch] for g in groups])
    share_means = [map_regression_loss(maps[s], targets[s]).item() for s in shares]
    whole_mean = map_regression_loss(maps, targets[batch]).item()
    assert abs(np.mean(share_means) - whole_mean) > 100 * 1e-5 * whole_mean
    weighted = [DataParallel(r, 2).share(batch)[1] * m for r, m in enumerate(share_means)]
    assert np.mean(weighted) == pytest.approx(whole_mean, rel=1e-6)


def test_shares_cover_the_batch_and_their_weighted_means_average_to_its_mean():
    for size in (1, 2, 7, 8, 13):
        batch = torch.arange(100, 100 + size)
        parts = [DataParallel(r, 3).share(batch) for r in range(3)]
        if size < 3:
            assert all(torch.equal(p, batch) and w == 1.0 for p, w in parts)
            continue
        assert sorted(torch.cat([p for p, _ in parts]).tolist()) == batch.tolist()
        values = torch.rand(200, dtype=torch.float64)
        ranks_mean = sum(w * values[p].mean() for p, w in parts) / 3  # what DDP's average makes of them
        assert ranks_mean.item() == pytest.approx(values[batch].mean().item(), rel=1e-12)


@pytest.fixture
def single_rank_group(tmp_path):
    """A one-rank Gloo process group in this process."""
    torch.set_num_threads(1)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _recording(monkeypatch) -> list[tuple[str, torch.device]]:
    """Wrap torch.distributed's all_reduce and broadcast to record (name, tensor device) and run them."""
    calls = []
    for name in ("all_reduce", "broadcast"):
        original = getattr(dist, name)

        def wrapper(tensor, *args, _original=original, _name=name, **kwargs):
            calls.append((_name, tensor.device))
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(dist, name, wrapper)
    return calls


def test_one_rank_trains_as_no_group_with_one_collective_per_step(single_rank_group, monkeypatch):
    groups, targets = _problem(3)
    cfg = DistillConfig(iters=3, batch_size=8, warmup=1, checkpoint_every=0)  # dropout on: same stream at world 1
    plain, ranked = _model(0.1), _model(0.1)
    expected = distill(plain, groups, targets, cfg, TrainContext(seed=5))
    calls = _recording(monkeypatch)
    history = distill(ranked, groups, targets, cfg, TrainContext(seed=5, parallel=DataParallel(0, 1, "cpu")))
    assert calls == [("all_reduce", torch.device("cpu"))] * cfg.iters  # the loss mean; gradients are DDP's
    assert history["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    for name, value in plain.state_dict().items():
        assert torch.allclose(ranked.state_dict()[name], value, atol=1e-6), name

    calls.clear()
    classes = ["a"] * 10 + ["b"] * 10
    base = compute_maps(plain, groups)
    here = TrainContext(seed=6, device="cpu")
    select = SelectConfig(iters=4)
    alone = progressive_select(_model(0.1), groups, classes, base, select, cfg, here)
    together = progressive_select(_model(0.1), groups, classes, base, select, cfg,
                                  replace(here, parallel=DataParallel(0, 1, "cpu")))
    rounds = len(together.rounds)
    assert sorted(calls) == sorted([("all_reduce", torch.device("cpu"))] * select.iters
                                   + [("broadcast", torch.device("cpu"))] * rounds)
    assert np.array_equal(together.keep, alone.keep) and together.keep.dtype == np.bool_
    assert np.allclose(together.eta, alone.eta, rtol=1e-5)


class _Collective(Exception):
    """Raised by a fake collective once it has recorded its tensor (a fake tensor has no data)."""


def test_nccl_collectives_get_tensors_on_the_ranks_cuda_device(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    seen = []

    def fake(tensor, *args, **kwargs):
        seen.append(tensor.device)
        raise _Collective

    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "all_reduce", fake)
    monkeypatch.setattr(dist, "broadcast", fake)
    rank = DataParallel(1, 2, "cuda:1")
    with FakeTensorMode():
        loss = torch.zeros((), device="cuda:1")
        with pytest.raises(_Collective):
            rank.mean(loss)
        with pytest.raises(_Collective):
            rank.from_rank0(np.array([True, False, True]))
    assert seen == [torch.device("cuda", 1)] * 2
    assert collective_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(MedscleanError, match="NCCL process group needs CUDA ranks"):
        collective_device("cpu")

    wrapped = {}
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel",
                        lambda module, **kwargs: wrapped.update(kwargs) or module)
    rank.wrap(_model(), torch.device("cuda:1"))
    assert wrapped["device_ids"] == [1] and wrapped["output_device"] == 1

    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert collective_device("cuda:1") == torch.device("cpu")  # Gloo takes CPU tensors
    seen.clear()
    with pytest.raises(_Collective):
        DataParallel(0, 2, "cpu").mean(torch.tensor(1.0))
    assert seen == [torch.device("cpu")]
    rank.wrap(_model(), torch.device("cpu"))
    assert wrapped["device_ids"] is None
