"""Speed of Steps 2-3 training on the CPU, side by side in one run.

Parts (all by default; choose with --parts):
  decoders - training steps/s (batch 16) of candidate decoder shapes on synthetic stored
             features: Lite0-like groups (C = 40, 112) on 28x28 and 32x32 grids, and
             ViT-S-like groups (C = 384, 5 prefix tokens, 16x16). Step 2 (map loss), Step 3
             (hard-mining cosine loss) and eval maps/s, with a projected wall time for a
             training set of --images images.
  encoder  - Step-2 steps/s on stored features against the same model re-running the
             frozen encoder (tf_efficientnet_lite0, packaged ImageNet weights) every step on
             the same batch of images: what storing the features saves.
  learn    - does the CPU preset still learn? Real Lite0 features of texture crops, some
             with a planted defect; Step-1 memory maps; distill + progressive_select with
             the preset; ranking AUROC of the contaminated images at each stage.

Step times are per-step wall times taken inside the real training loops (`distill`,
`progressive_select`) after one warm-up step, reported as median and minimum: on a shared
machine the minimum is the closer estimate of an idle one.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_train.py --threads 2,1
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_train.py --smoke

--smoke: every part on tiny sizes (a decoder of width 16 on an 8x8 grid and 16 stored images, Lite0
at 64 px, 9 images and 4 + 4 iterations in the learn part), one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

import smoke_mode
from medsclean.model.decoder import ModelConfig, ReconstructionModel
from medsclean.config import DistillConfig, SelectConfig
from medsclean.model.loop import TrainContext
from medsclean.model.training import compute_maps, distill, progressive_select

LITE0_DIMS = (40, 112)
DECODERS = {
    # name: (group_dims, n_prefix, grid side, width, heads, depth[, token pool])
    "lite0-28 w64 h4 d4": (LITE0_DIMS, 0, 28, 64, 4, 4),
    "lite0-28 w128 h4 d4": (LITE0_DIMS, 0, 28, 128, 4, 4),
    "lite0-32 w64 h4 d2": (LITE0_DIMS, 0, 32, 64, 4, 2),
    "lite0-32 w64 h4 d4": (LITE0_DIMS, 0, 32, 64, 4, 4),
    "lite0-32 w128 h4 d4": (LITE0_DIMS, 0, 32, 128, 4, 4),
    "lite0-32 w128 h4 d8": (LITE0_DIMS, 0, 32, 128, 4, 8),
    "lite0-32 p2 w64 h4 d2": (LITE0_DIMS, 0, 32, 64, 4, 2, 2),
    "lite0-32 p2 w64 h4 d4": (LITE0_DIMS, 0, 32, 64, 4, 4, 2),
    "lite0-32 p2 w64 h4 d6": (LITE0_DIMS, 0, 32, 64, 4, 6, 2),
    "lite0-32 p2 w128 h4 d4": (LITE0_DIMS, 0, 32, 128, 4, 4, 2),
    "lite0-32 p2 w192 h4 d4": (LITE0_DIMS, 0, 32, 192, 4, 4, 2),
    "lite0-32 p2 w256 h4 d4": (LITE0_DIMS, 0, 32, 256, 4, 4, 2),
    "vits-16 w384 h6 d4": ((384, 384), 5, 16, None, 6, 4),
    "vits-16 w384 h6 d8": ((384, 384), 5, 16, None, 6, 8),
}
SMOKE_DECODERS = {"smoke lite0-8 w16 h2 d2": (LITE0_DIMS, 0, 8, 16, 2, 2),
                  "smoke lite0-8 p2 w16 h2 d2": (LITE0_DIMS, 0, 8, 16, 2, 2, 2)}  # --smoke only, not in the default run
SMOKE = {"threads": "1", "steps": 2, "images": 16, "train_images": 16, "decoders": ",".join(SMOKE_DECODERS),
         "crop": 64, "preset": "16,2,2", "learn_images": 9, "learn_iters": "4,4"}


def _step_times(run) -> dict:
    """Per-step times of a training loop that reports through on_step; the first (warm-up) step is dropped.

    The machine is shared, so wall times are summarised by their median (as observed) and
    their minimum (closest to an idle machine), next to CPU seconds of this process per step.
    """
    walls, cpus = [time.perf_counter()], [time.process_time()]

    def on_step(step, record):
        walls.append(time.perf_counter())
        cpus.append(time.process_time())

    run(on_step)
    wall, cpu = np.diff(walls)[1:], np.diff(cpus)[1:]
    return {"median_s": float(np.median(wall)), "min_s": float(wall.min()), "cpu_s": float(np.median(cpu))}


def _synthetic_features(dims, n_prefix, side, n_images, seed=0):
    gen = torch.Generator().manual_seed(seed)
    length = n_prefix + side * side
    groups = [torch.randn(n_images, length, c, generator=gen).half() for c in dims]
    maps = 0.1 + 0.05 * torch.rand(n_images, side * side, generator=gen)
    return groups, maps


def bench_decoder(name: str, spec, steps: int, images: int, train_images: int = 256) -> dict:
    dims, n_prefix, side, width, heads, depth, *pool = spec
    config = ModelConfig(dims, n_prefix, width=width, heads=heads, depth=depth, token_pool=pool[0] if pool else 1)
    # 256 images: Step 3's first pass (about half of them) outlasts the timed steps, so no
    # re-scoring pass falls between them; eval speed is measured on its own below.
    groups, maps = _synthetic_features(dims, n_prefix, side, n_images=train_images)
    cfg = DistillConfig(iters=steps + 1, warmup=1, checkpoint_every=0)
    model = ReconstructionModel(config, seed=0)
    step2 = _step_times(lambda cb: distill(model, groups, maps, cfg, TrainContext(seed=0, on_step=cb)))
    classes = ["a"] * train_images
    step3 = _step_times(lambda cb: progressive_select(model, groups, classes, maps, SelectConfig(iters=cfg.iters), cfg,
                                                      TrainContext(seed=0, on_step=cb)))
    compute_maps(model, [g[:16] for g in groups])  # warm-up
    eval_s = []
    for _ in range(2):
        t0 = time.perf_counter()
        compute_maps(model, [g[:32] for g in groups], batch_size=16)
        eval_s.append((time.perf_counter() - t0) / 32)
    params = sum(p.numel() for p in model.parameters())
    return {
        "decoder": name, "params_M": round(params / 1e6, 3), "distill": step2, "select": step3,
        "eval_images_per_s": 1 / min(eval_s),
        "distill_steps_per_s_best": 1 / step2["min_s"], "distill_steps_per_s_median": 1 / step2["median_s"],
        f"minutes_{images}_images_1000_plus_1000_best": projected_minutes(
            1000, 1000, step2["min_s"], step3["min_s"], 1 / min(eval_s), images),
    }


def projected_minutes(distill_iters, select_iters, distill_s, select_s, eval_images_per_s, n_images) -> float:
    """Wall time of Steps 2+3 for n_images images, batch 16.

    Step 3 re-scores all images before each pass; a pass over S_t (on average about 3/4
    of the images between t = 0, half, and the end, nearly all) lasts |S_t|/16 steps.
    """
    passes = select_iters / max(1.0, 0.75 * n_images / 16)
    seconds = distill_iters * distill_s + select_iters * select_s + passes * n_images / eval_images_per_s
    return seconds / 60


def bench_encoder(steps: int, crop: int, width: int, heads: int, depth: int) -> dict:
    """Step-2 steps on stored groups vs the same steps re-running the encoder first."""
    from medsclean.model.encoder import load_encoder
    from medsclean.model.losses import map_regression_loss
    from medsclean.model.optim import StableAdamW

    encoder = load_encoder("tf_efficientnet_lite0", resize=crop, crop=crop)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, crop, crop, generator=gen)  # content does not change speed
    with torch.inference_mode():
        stored = [g.half().clone() for g in encoder(images).groups]
    config = ModelConfig(encoder.group_dims, encoder.n_prefix, width=width, heads=heads, depth=depth)
    targets = 0.1 + 0.05 * torch.rand(16, stored[0].shape[1], generator=gen)

    def run(source) -> np.ndarray:
        model = ReconstructionModel(config, seed=0).train()
        optimizer = StableAdamW(model.parameters(), lr=1e-3)
        times = []
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            groups = source()
            loss = map_regression_loss(model.anomaly_map(groups), targets)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            optimizer.step()
            times.append(time.perf_counter() - t0)
        return np.array(times[1:])

    def from_store():
        return [g.float() for g in stored]

    def from_encoder():
        with torch.inference_mode():
            out = encoder(images)
        return [g.clone() for g in out.groups]  # leave inference mode: autograd needs normal tensors

    stored_times, encoder_times = [], []
    for _ in range(2):  # interleaved, so that a busy spell of the machine hits both
        stored_times.append(run(from_store))
        encoder_times.append(run(from_encoder))
    stored_s, encoder_s = np.concatenate(stored_times), np.concatenate(encoder_times)
    return {"crop": crop, "grid": list(encoder.grid), "group_dims": list(encoder.group_dims),
            "decoder": f"w{width} h{heads} d{depth}",
            "stored_steps_per_s": {"best": 1 / stored_s.min(), "median": 1 / np.median(stored_s)},
            "encoder_steps_per_s": {"best": 1 / encoder_s.min(), "median": 1 / np.median(encoder_s)},
            "speedup_stored_over_encoder": {"best": encoder_s.min() / stored_s.min(),
                                            "median": float(np.median(encoder_s) / np.median(stored_s))}}


def _texture_set(n_images: int, size: int, contamination: float, seed: int):
    """Images of three textures; a share of each class carries one painted defect."""
    from medsclean.demo.defects import DEFECTS, make_defect
    from medsclean.demo.good_images import make_good

    categories = ("brick", "grass", "gravel")
    rng = np.random.default_rng(seed)
    images, classes, defective = [], [], []
    per_class = n_images // len(categories)
    n_bad = max(1, round(contamination * per_class))
    for category in categories:
        for index in range(per_class):
            good = make_good(category, size, rng)
            if index < n_bad:
                good, _ = make_defect(good, DEFECTS[index % len(DEFECTS)], rng, category=category)
            images.append(good)
            classes.append(category)
            defective.append(index < n_bad)
    return images, classes, np.array(defective)


def _mean_class_auroc(scores, classes, defective) -> float:
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(classes)
    return float(np.mean([roc_auc_score(defective[labels == c], scores[labels == c]) for c in sorted(set(classes))]))


def short_run_config(iters: int) -> DistillConfig:
    """The paper's schedule shrunk with the run: warm-up 1 % (at least 10 steps); Step 3's p ramp is
    10 % of its steps (SelectConfig.ramp_steps)."""
    return DistillConfig(iters=iters, warmup=max(10, iters // 100), checkpoint_every=0)


def learn_check(n_images: int, crop: int, preset: tuple[int, int, int], distill_iters: int, select_iters: int,
                contamination: float = 0.15, seed: int = 0) -> dict:
    """Contaminated-image ranking AUROC after Step 1, Step 2 and Step 3 with a CPU preset."""
    from PIL import Image

    from medsclean.model.encoder import load_encoder
    from medsclean.workdir.images import normalise, resize_crop
    from medsclean.config import ScoreConfig
    from medsclean.step1.classes import score_classes
    from medsclean.maps import image_scores

    width, heads, depth = preset
    images, classes, defective = _texture_set(n_images, crop, contamination, seed)
    encoder = load_encoder("tf_efficientnet_lite0", resize=crop, crop=crop)
    x = torch.from_numpy(np.stack([normalise(resize_crop(Image.fromarray(im), encoder.preprocess), encoder.preprocess) for im in images]))
    t0 = time.perf_counter()
    memory, groups = [], [[] for _ in encoder.group_dims]
    with torch.inference_mode():
        for start in range(0, len(x), 16):
            out = encoder(x[start:start + 16])
            memory.append(out.memory)
            for stored, g in zip(groups, out.groups):
                stored.append(g.half())
    memory, groups = torch.cat(memory), [torch.cat(g) for g in groups]
    extract_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    step1_maps, _ = score_classes(memory, classes, ScoreConfig(seed=seed))
    score_s = time.perf_counter() - t0
    config = ModelConfig(encoder.group_dims, encoder.n_prefix, width=width, heads=heads, depth=depth)
    model = ReconstructionModel(config, seed=seed)
    t0 = time.perf_counter()
    history = distill(model, groups, step1_maps, short_run_config(distill_iters), TrainContext(seed=seed))
    distill_s = time.perf_counter() - t0
    base_maps = compute_maps(model, groups)
    t0 = time.perf_counter()
    result = progressive_select(model, groups, classes, base_maps, SelectConfig(iters=select_iters),
                                short_run_config(distill_iters), TrainContext(seed=seed))
    select_s = time.perf_counter() - t0
    return {
        "images": len(images), "defective": int(defective.sum()), "grid": list(encoder.grid),
        "preset": {"width": width, "heads": heads, "depth": depth, "distill_iters": distill_iters,
                   "select_iters": select_iters, "warmup": short_run_config(distill_iters).warmup,
                   "p_ramp": SelectConfig(iters=select_iters).ramp_steps},
        "seconds": {"extract": extract_s, "step1": score_s, "distill": distill_s, "select": select_s},
        "distill_loss_first_last_50": [float(np.mean(history["loss"][:50])), float(np.mean(history["loss"][-50:]))],
        "auroc_step1": _mean_class_auroc(image_scores(step1_maps, dtype=torch.float64).numpy(), classes, defective),
        "auroc_distilled": _mean_class_auroc(image_scores(base_maps, dtype=torch.float64).numpy(), classes, defective),
        "auroc_selected_eta": _mean_class_auroc(result.eta, classes, defective),
        "final_keep": {"defective_rejected": int((~result.keep & defective).sum()),
                       "normal_kept": int((result.keep & ~defective).sum()), "normal": int((~defective).sum())},
        "rounds": len(result.rounds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="decoders,encoder,learn")
    parser.add_argument("--threads", default="2,1",
                        help="torch threads; decoders are timed at each, the rest at the first")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per measurement (median)")
    parser.add_argument("--images", type=int, default=300, help="training-set size for projected times")
    parser.add_argument("--decoders", default=",".join(DECODERS), help="comma-separated names from DECODERS")
    parser.add_argument("--train-images", type=int, default=256, help="decoders part: stored images trained on")
    parser.add_argument("--crop", type=int, default=256, help="encoder part: Lite0 input side")
    parser.add_argument("--preset", default="64,4,4", help="CPU preset width,heads,depth (encoder and learn parts)")
    parser.add_argument("--learn-images", type=int, default=120)
    parser.add_argument("--learn-iters", default="300,300", help="learn part: distill,select iterations")
    args = smoke_mode.parse_args(parser, SMOKE)
    threads = [int(t) for t in args.threads.split(",")]
    parts = set(args.parts.split(","))
    width, heads, depth = (int(v) for v in args.preset.split(","))
    report: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                    "load_average_at_start": os.getloadavg(), "torch": torch.__version__, "args": vars(args)}
    if "decoders" in parts:
        report["decoders"] = []
        shapes = {**DECODERS, **SMOKE_DECODERS}
        for name in args.decoders.split(","):
            for n_threads in threads:
                torch.set_num_threads(n_threads)
                timed = bench_decoder(name, shapes[name], args.steps, args.images, args.train_images)
                row = {"threads": n_threads, **timed}
                report["decoders"].append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    torch.set_num_threads(threads[0])
    if "encoder" in parts:
        report["encoder"] = bench_encoder(args.steps, args.crop, width, heads, depth)
        print(json.dumps(report["encoder"]), file=sys.stderr, flush=True)
    if "learn" in parts:
        distill_iters, select_iters = (int(v) for v in args.learn_iters.split(","))
        report["learn"] = learn_check(args.learn_images, args.crop, (width, heads, depth), distill_iters, select_iters)
    report["load_average_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
