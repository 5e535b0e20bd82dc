"""Stage `scores`: Step 1, the random-memory ensemble score of every patch of every image.

Artifact: `scores.safetensors` with `maps` (N, H·W) float32 patch maps and `image_scores` (N,)
float32, plus `scores.csv` (path, class, anomaly_score, rank_in_class; higher score = more
anomalous, rank 1 = most anomalous of its class).
"""

from __future__ import annotations

import csv
import io
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from medsclean.choices import Engine
from medsclean.config import ScoreConfig
from medsclean.workdir.artifacts import Artifact, digest
from medsclean.workdir.store import Store
from medsclean.ui import Reporter

STAGE = "score"


@dataclass(frozen=True)
class ScoreResult:
    artifact: Artifact
    cached: bool
    seconds: float


def scores_key(features: Artifact, cfg: ScoreConfig, *, device: str = "cpu") -> str:
    """The scores key: the features key and the Step-1 options that change the maps. Engine auto
    scores every class exactly, so only engine approx (and ivf) names its engine in the key."""
    # the payload keeps the 0.1 stage names (features, scores): changing them would change every stored key
    return digest({"features": features.key, "score": cfg.key_fields(approx=cfg.engine == "approx")})


def approx_command(argv: Sequence[str] | None = None) -> str:
    """The command to rerun with the approximate engine: this command line with `--engine approx`
    in place of any `--engine` given; outside the `medsclean` program, the library option."""
    argv = list(sys.argv if argv is None else argv)
    program = Path(argv[0]).name if argv else ""
    if program not in ("medsclean", "__main__.py"):
        return "engine='approx' (medsclean ... --engine approx)"
    args, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
        elif arg == "--engine":
            skip = True
        elif not arg.startswith("--engine="):
            args.append(arg)
    return shlex.join(["medsclean", *args, "--engine", "approx"])


def engine_line(label, n_images: int, choice, device: str, bound_seconds: float, command: str) -> str:
    """The line `engine auto` prints for a class whose exact pass is projected past the bound."""
    return (f"{STAGE}: class {label!r} ({n_images} images): the exact pass is projected at "
            f"{_duration(choice.projected_seconds)} on {device}, over the {_duration(bound_seconds)} bound; it is "
            f"scored exactly ({choice.name}). The approximate engine does about a tenth of the work with other "
            f"scores (docs/scaling.md): {command}")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def ranks_within_class(scores, classes: list[str]) -> list[int]:
    """1-based rank of each score inside its class, highest score first (ties by input order)."""
    ranks = [0] * len(classes)
    by_class: dict[str, list[int]] = {}
    for i, c in enumerate(classes):
        by_class.setdefault(c, []).append(i)
    for idx in by_class.values():
        for r, i in enumerate(sorted(idx, key=lambda j: (-float(scores[j]), j)), start=1):
            ranks[i] = r
    return ranks


def scores_csv(images: list[dict], scores) -> str:
    classes = [row["class"] for row in images]
    ranks = ranks_within_class(scores, classes)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "class", "anomaly_score", "rank_in_class"])
    for row, s, r in zip(images, scores, ranks):
        writer.writerow([row["path"], row["class"], f"{float(s):.6f}", r])
    return buf.getvalue()


def step1_maps(memory, classes: list[str], cfg: ScoreConfig, *, device: str, exclude=(), **runtime):
    """(N, P) Step-1 maps and the banks per class for `cfg` on `device`; `exclude`: positions of images
    left out of every memory; `runtime` are the other fields of `step1.runtime.Runtime` (callbacks,
    executor, precomputed `tables`)."""
    from medsclean.step1.classes import score_classes
    from medsclean.step1.runtime import Runtime

    return score_classes(memory, classes, cfg, Runtime(device=device, **runtime), exclude=exclude)


def run_score(features: Artifact, store: Store, cfg: ScoreConfig, *, device: str, force: bool = False,
              reporter: Reporter, executor=None, advice_seconds: float | None = None) -> ScoreResult:
    """Compute (or reuse) the Step-1 maps for every extracted image.

    `executor`: None, or a function returning the `step1.runtime.TaskExecutor` (e.g. Ray workers) that
    runs the exact engine's block tasks, to the same maps; it is called only when the maps are computed.
    `advice_seconds`: under engine auto, the projected exact time past which a class gets one line
    naming the `--engine approx` command (default `step1.plan.APPROX_ADVICE_SECONDS`); it is still scored
    exactly. The manifest's `engines` records every class's engine, reason and projection.
    """
    t0 = time.perf_counter()
    key = scores_key(features, cfg, device=device)
    if (art := store.cached(STAGE, key, reporter, force=force)) is not None:
        return ScoreResult(art, True, time.perf_counter() - t0)
    from medsclean.step1.banks import ALL_CLASSES
    from medsclean.maps import AGGREGATE_RATIOS, image_scores
    from medsclean.step1.engines import ENGINES
    from medsclean.step1.plan import APPROX_ADVICE_SECONDS

    bound = APPROX_ADVICE_SECONDS if advice_seconds is None else advice_seconds

    # Only an engine that runs block tasks uses an executor (auto may choose one): do not start one for the others.
    uses_tasks = cfg.engine == Engine.AUTO or ENGINES[cfg.engine].runs_tasks
    executor = executor() if executor is not None and uses_tasks else None
    memory = features.rows("memory")  # read class by class (or block by block), never all at once
    images = features.manifest["images"]
    classes = [row["class"] for row in images]
    chosen = []
    engines: dict[str, dict] = {}
    sizes: dict[str, int] = {}
    for name in classes if cfg.per_class else [ALL_CLASSES] * len(classes):
        sizes[name] = sizes.get(name, 0) + 1

    def on_engine(name, choice) -> None:
        if cfg.engine == Engine.AUTO and not chosen:
            reporter.info(f"{STAGE}: engine {choice.name} ({choice.reason})")
        if choice.over_bound:
            reporter.warn(engine_line(name, sizes.get(name, 0), choice, device, bound, approx_command()))
        chosen.append(choice.name)
        engines[str(name)] = {"engine": choice.name, "reason": choice.reason,
                              "projected_exact_s": round(choice.projected_seconds, 3),
                              "over_bound": choice.over_bound}

    finished: dict = {}  # images done per class, so that the bar advances block by block

    def on_progress(name, done: int, total: int) -> None:
        task.update(completed=sum(finished.values()) + done, description=f"score {name}")
        if done == total:
            finished[name] = total

    with reporter.task("score", total=len(images)) as task:
        maps, banks = step1_maps(memory, classes, cfg, device=device, on_engine=on_engine, on_progress=on_progress,
                                 executor=executor, advice_seconds=bound)
    engine = cfg.engine
    if chosen:
        engine = chosen[0] if len(set(chosen)) == 1 else "+".join(sorted(set(chosen)))
    per_image = image_scores(maps, ratio=AGGREGATE_RATIOS[cfg.aggregate])
    import torch

    tensors = {"maps": maps.float().contiguous(), "image_scores": per_image.float().contiguous()}
    bank_tensors = {f"banks/{c}": torch.as_tensor(b) for c, b in banks.items()}
    manifest = {"images": images, "grid": features.manifest["encoder"]["grid"], "config": asdict(cfg),
                "engine": engine, "engines": engines, "parents": {"extract": features.key}, "root": features.manifest["root"]}
    art = store.write_stage(STAGE, key, {"scores.safetensors": tensors, "banks.safetensors": bank_tensors},
                            manifest, extra_files={"scores.csv": scores_csv(images, per_image.tolist())})
    return ScoreResult(art, False, time.perf_counter() - t0)
