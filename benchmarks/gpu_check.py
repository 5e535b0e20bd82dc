"""Checks and times every CUDA path of medsclean in one run on one GPU machine; prints one table.

For the day a GPU machine is lent: one run of under 8 minutes on one GPU, installing nothing (it
uses what the environment has: faiss-gpu rows are skipped without faiss-gpu, Ray rows without ray).
Each row is one check, its device, its wall time and its verdict: `ok` (with what was compared),
`FAIL` (with why), or `skipped` (with why). The exit code is 1 when a row failed.

| row | what runs | compared with |
|---|---|---|
| extract cpu | `medsclean extract --device cpu` | (the reference of the next row) |
| extract cuda | `medsclean extract --device cuda` | the CPU features (max abs difference) |
| Step 1 exact cuda | `step1.classes.score_classes` (engine exact, device cuda) | the exact engine on the CPU |
| Step 1 faiss-gpu | `score_classes` (engine faiss) with faiss-gpu | the exact engine on the CPU |
| pytest -m gpu | the GPU tests of tests/test_memory.py | their oracles |
| distill + select cuda | `medsclean select --device cuda` (meds) | finite scores; the same stages on the CPU ran |
| DDP on NCCL, 1 rank | `training.distill` / `progressive_select` with DataParallel in a one-rank NCCL group | the same run without a process group |
| --train-workers 2 cuda | `medsclean distill --executor ray --train-workers 2 --device cuda` | needs 2 GPUs (NCCL puts one rank on a GPU), else skipped |
| Ray extract + Step 1 cuda | `medsclean score --executor ray --device cuda` | the local CUDA run's maps |
| --preset paper | `medsclean select --preset paper --random-init` on a small folder, few iterations | finite scores |

`--smoke` runs the same checks on the CPU on tiny sizes (every CUDA row reads
"skipped: no GPU" after its code ran on the CPU in its place; the Ray rows and the paper preset
only with `--all-rows`, as they take a minute on two cores), so tests/test_benchmarks.py keeps the
script working on a machine without a GPU. Without `--smoke` on a machine without a GPU, the
CUDA rows also run on the CPU and read "skipped: no GPU" (the paper row is skipped).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu_check.py --work /tmp/gpu-check
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu_check.py --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import smoke_mode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FEATURE_TOLERANCE = 5e-2  # float16 features of one encoder on two devices (TF32 / kernel choice)
MAP_TOLERANCE = 1e-3  # Step-1 maps of one feature set: exact on two devices, faiss vs exact
SMOKE = {"images": 6, "size": 64, "iters": 2}
NO_GPU = "no GPU"


class Skip(Exception):
    """A check that cannot run here; its message says why."""


def _command(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m medsclean ARGS` offline; raises with the command's last stderr lines on failure."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "medsclean", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"exit {done.returncode}: {tail}")
    return done


def make_images(folder: Path, n: int, size: int) -> Path:
    """Two classes of `n` random crops each of scikit-image's CC0 textures, as RGB PNGs."""
    from skimage import data

    rng = np.random.default_rng(0)
    for name in ("brick", "gravel"):
        base = getattr(data, name)()
        for i in range(n):
            y, x = rng.integers(0, base.shape[0] - size, size=2)
            patch = np.stack([base[y:y + size, x:x + size]] * 3, axis=-1)
            (folder / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(patch)).save(folder / name / f"{i:03d}.png")
    return folder


class Check:
    """The run's rows, its folders and the device CUDA rows use (cpu in smoke mode or without a GPU)."""

    def __init__(self, args: argparse.Namespace, work: Path):
        import torch

        self.args = args
        self.work = work
        self.gpus = torch.cuda.device_count()
        self.cuda = "cuda" if self.gpus else "cpu"
        self.rows: list[dict] = []
        self.images = make_images(work / "images", args.images, args.size)
        self.encoder = [str(self.images), "--resize", str(args.size), "--crop", str(args.size), "--num-workers", "0"]
        self.score_opts = ["--engine", "exact", "--banks", "10"]
        self.iters = ["--distill-iters", str(args.iters), "--select-iters", str(args.iters)]
        self.decoder = ["--width", "32", "--depth", "2", "--heads", "2"]
        self.model = [*self.score_opts, *self.iters, *self.decoder]

    def row(self, name: str, device: str, body: Callable[[], str]) -> None:
        """Run one check and record its row. A CUDA row on a machine without a GPU runs `body` on
        the CPU (the plumbing) and reads "skipped: no GPU" when it passed."""
        start = time.perf_counter()
        try:
            verdict = f"ok: {body()}"
            if device == "cuda" and not self.gpus:
                verdict = f"skipped: {NO_GPU} (its code ran on the CPU: {verdict})"
        except Skip as why:
            verdict = f"skipped: {why}"
        except Exception as exc:  # every failure is a row, the run goes on
            verdict = f"FAIL: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            if self.args.verbose:
                traceback.print_exc()
        self.rows.append({"check": name, "device": device, "seconds": time.perf_counter() - start,
                          "result": verdict})
        print(f"{name}: {verdict}", file=sys.stderr, flush=True)

    def work_for(self, name: str) -> list[str]:
        return ["--work", str(self.work / name)]

    # ------------------------------------------------------------------------------------ rows

    def extract(self, device: str) -> str:
        _command("extract", *self.encoder, "--device", device, "--quiet", *self.work_for(device))
        features = self.features(device)
        if device == "cpu" or self.cuda == "cpu":
            return f"{features.shape[0]} images, features {tuple(features.shape[1:])}"
        diff = (features.float() - self.features("cpu").float()).abs().max().item()
        if diff > FEATURE_TOLERANCE:
            raise AssertionError(f"features differ from the CPU's by {diff:.3g} > {FEATURE_TOLERANCE}")
        return f"max abs difference to the CPU features {diff:.2g}"

    def features(self, name: str):
        """(N, P, D) float16 memory features and the class of each image, of work folder `name`."""
        from medsclean.workdir.store import Store

        art = Store(self.work / name).load("extract")
        return art.sharded_tensors(["memory"])["memory"]

    def classes(self, name: str) -> list[str]:
        from medsclean.workdir.store import Store

        return [row["class"] for row in Store(self.work / name).load("extract").manifest["images"]]

    def step1(self, engine: str, device: str) -> str:
        from medsclean.step1 import faiss_index as knn
        from medsclean.config import ScoreConfig
        from medsclean.step1.classes import score_classes
        from medsclean.step1.runtime import Runtime

        if engine == "faiss" and importlib.util.find_spec("faiss") is None:
            raise Skip("faiss is not installed")
        if engine == "faiss" and self.gpus and knn.gpu_count() == 0:
            raise Skip("faiss-gpu is not installed (faiss-cpu is): pip install 'medsclean[gpu]' in its place")
        source = self.cuda
        features, classes = self.features(source), self.classes(source)
        options = dict(banks=10, ratio=0.3, k=1, seed=0)
        reference, _ = score_classes(features, classes, ScoreConfig(engine="exact", **options), Runtime(device="cpu"))
        maps, _ = score_classes(features, classes, ScoreConfig(engine=engine, **options),
                                Runtime(device=device if engine == "exact" else "cpu"))
        diff = (maps - reference).abs().max().item()
        if diff > MAP_TOLERANCE:
            raise AssertionError(f"maps differ from the CPU exact engine's by {diff:.3g} > {MAP_TOLERANCE}")
        return f"maps of {len(classes)} images, max abs difference to CPU exact {diff:.2g}"

    def gpu_tests(self) -> str:
        if not self.gpus:
            raise Skip(NO_GPU)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                               str(ROOT / "tests" / "test_memory.py")], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-200:]
        if done.returncode != 0:
            raise AssertionError(last)
        return last

    def select(self, device: str, name: str, *options: str, encoder: list[str] | None = None) -> str:
        done = _command("select", *(encoder or self.encoder), *(options or self.model), "--device", device,
                        "--json", "--quiet", "--out", str(self.work / f"{name}-clean.txt"), *self.work_for(name),
                        timeout=600)
        from medsclean.workdir.store import Store

        eta = Store(self.work / name).load("select").tensors("eta.safetensors")["eta"]
        if not bool(np.isfinite(eta.numpy()).all()):
            raise AssertionError("non-finite final scores")
        kept = len((self.work / f"{name}-clean.txt").read_text().splitlines())
        json.loads(done.stdout)
        return f"{kept} of {len(eta)} images kept, final scores finite"

    def ddp_nccl(self) -> str:
        """One-rank NCCL group (or Gloo on the CPU) in this process: DDP and the collectives on the GPU."""
        import torch
        import torch.distributed as dist

        from medsclean.config import DistillConfig, SelectConfig
        from medsclean.model.decoder import ModelConfig, ReconstructionModel
        from medsclean.model.loop import TrainContext
        from medsclean.model.parallel import DataParallel
        from medsclean.model.training import compute_maps, distill, progressive_select

        device = "cuda:0" if self.gpus else "cpu"
        gen = torch.Generator().manual_seed(0)
        groups = [torch.randn(16, 17, 16, generator=gen).half() for _ in range(2)]
        targets = torch.rand(16, 16, generator=gen)
        cfg = DistillConfig(iters=3, batch_size=8, warmup=1, checkpoint_every=0)
        model = lambda: ReconstructionModel(ModelConfig((16, 16), n_prefix=1, depth=2, heads=2), seed=1)  # noqa: E731
        alone, ranked = model(), model()
        expected = distill(alone, groups, targets, cfg, TrainContext(seed=2, device=device))
        store = dist.FileStore(str(self.work / "nccl-store"), 1)
        dist.init_process_group("nccl" if self.gpus else "gloo", store=store, rank=0, world_size=1)
        try:
            rank = DataParallel(0, 1, device)
            got = distill(ranked, groups, targets, cfg, TrainContext(seed=2, device=device, parallel=rank))
            base = compute_maps(ranked, groups, device=device)
            result = progressive_select(ranked, groups, ["a"] * 8 + ["b"] * 8, base, SelectConfig(iters=3), cfg,
                                        TrainContext(seed=3, device=device, parallel=rank))
        finally:
            dist.destroy_process_group()
        if not np.allclose(got["loss"], expected["loss"], rtol=1e-4):
            raise AssertionError(f"losses {got['loss']} differ from the run without a group {expected['loss']}")
        return f"{dist.Backend.NCCL if self.gpus else 'gloo'}: distill = no group, select kept {int(result.keep.sum())}"

    def need_ray(self) -> None:
        if self.args.smoke and not self.args.all_rows:
            raise Skip(f"{NO_GPU} (smoke mode runs the Ray rows only with --all-rows)")
        if importlib.util.find_spec("ray") is None:
            raise Skip("ray is not installed")

    def train_workers(self) -> str:
        self.need_ray()
        if self.gpus == 1:
            raise Skip("one GPU: NCCL takes one GPU per rank (two ranks on one GPU is an NCCL error)")
        _command("distill", *self.encoder, *self.score_opts, *self.iters[:2], *self.decoder, "--device", self.cuda,
                 "--executor", "ray", "--ray-workers", "2", "--train-workers", "2", "--quiet",
                 *self.work_for(f"{self.cuda}-ranks"), timeout=600)
        return "2 ranks trained"

    def ray_score(self) -> str:
        self.need_ray()
        from medsclean.workdir.artifacts import load_tensors
        from medsclean.workdir.store import Store

        _command("score", *self.encoder, *self.score_opts, "--device", self.cuda, "--quiet",
                 *self.work_for(f"{self.cuda}-local"))
        _command("score", *self.encoder, *self.score_opts, "--device", self.cuda, "--executor", "ray",
                 "--ray-workers", "2", "--quiet", *self.work_for(f"{self.cuda}-ray"))
        maps = [load_tensors(Store(self.work / f"{self.cuda}-{w}").load("score").file("scores.safetensors"))["maps"]
                for w in ("local", "ray")]
        diff = (maps[0] - maps[1]).abs().max().item()
        if diff > MAP_TOLERANCE:
            raise AssertionError(f"Ray's maps differ from the local run's by {diff:.3g}")
        return f"Ray Data extract + Ray tasks, max abs difference to the local run {diff:.2g}"

    def paper(self) -> str:
        if not self.gpus and not (self.args.smoke and self.args.all_rows):
            raise Skip(f"{NO_GPU} (smoke mode runs this row only with --all-rows: ViT-B on the CPU takes 30 s)")
        side = str(self.args.size // 14 * 14)  # the ViT's patches are 14 px
        encoder = [*self.encoder[:1], "--resize", side, "--crop", side, *self.encoder[5:]]
        return self.select(self.cuda, f"{self.cuda}-paper", *self.score_opts, *self.iters, "--preset", "paper",
                           "--random-init", encoder=encoder)


def table(rows: list[dict]) -> str:
    lines = ["| check | device | time (s) | result |", "|---|---|---|---|"]
    lines += [f"| {r['check']} | {r['device']} | {r['seconds']:.1f} | {r['result']} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed after)")
    parser.add_argument("--images", type=int, default=16, help="images per class (two classes)")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--iters", type=int, default=50, help="Step-2 and Step-3 iterations of the training rows")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--all-rows", action="store_true",
                        help="in smoke mode, also run the Ray rows and the paper preset on the CPU (slow)")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of a failed row")
    args = smoke_mode.parse_args(parser, SMOKE, argv)
    t0 = time.perf_counter()
    with smoke_mode.work_folder(args.work, "medsclean-gpu-check-") as work:
        check = Check(args, work)
        check.row("extract", "cpu", lambda: check.extract("cpu"))
        check.row("extract", "cuda", lambda: check.extract(check.cuda))
        check.row("Step 1 exact", "cuda", lambda: check.step1("exact", check.cuda))
        check.row("Step 1 faiss-gpu", "cuda", lambda: check.step1("faiss", check.cuda))
        check.row("pytest -m gpu (test_memory.py)", "cuda", check.gpu_tests)
        check.row("distill + select (meds)", "cuda", lambda: check.select(check.cuda, f"{check.cuda}-select"))
        check.row("DDP, one-rank NCCL group", "cuda", check.ddp_nccl)
        check.row("--train-workers 2", "cuda", check.train_workers)
        check.row("Ray extract + Step 1 tasks", "cuda", check.ray_score)
        check.row("--preset paper --random-init", "cuda", check.paper)
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(f"device: {name}; torch {torch.__version__}; total {time.perf_counter() - t0:.0f} s")
    print(table(check.rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"device": name, "rows": check.rows}, indent=2) + "\n")
    return 1 if any(r["result"].startswith("FAIL") for r in check.rows) else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
