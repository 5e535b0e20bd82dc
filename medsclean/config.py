"""Frozen run configurations and the presets that fill them.

A stage's cache key is the digest of the fields that change its result (`key_fields`); options
that only change speed (device, batch size, workers) are left out so that reruns on another
machine reuse the cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .errors import UsageError

PRESETS = ("auto", "cpu", "paper")


@dataclass(frozen=True)
class DataConfig:
    """Which images a run reads."""

    images: Path
    layout: str = "auto"
    split: str = "train"
    masks: Path | None = None
    class_from: str = "top"
    strict: bool = False


@dataclass(frozen=True)
class ExtractConfig:
    """The frozen encoder and how images are fed to it."""

    backbone: str = "tf_efficientnet_lite0"
    weights: Path | None = None
    random_init: bool = False
    resize: int | None = None
    crop: int | None = None
    batch_size: int = 8
    num_workers: int = 2
    device: str = "auto"
    shard_size: int = 64

    def key_fields(self) -> dict:
        return {"backbone": self.backbone, "weights": str(self.weights) if self.weights else None,
                "random_init": self.random_init, "resize": self.resize, "crop": self.crop}


@dataclass(frozen=True)
class ScoreConfig:
    """Step 1: the random-memory ensemble."""

    banks: int = 100
    ratio: float = 0.1
    k: int = 1
    replace: bool = True
    per_class: bool = True
    include_self: bool = False
    engine: str = "auto"
    aggregate: str = "top1pct"
    seed: int = 0
    device: str = "auto"
    min_bank: int = 1
    refine_rounds: int = 0
    refine_drop: float = 0.1

    def key_fields(self) -> dict:
        fields = asdict(self)
        fields.pop("device")
        fields.pop("engine")  # every engine gives the same scores (to float32 round-off) except IVF
        if self.engine == "ivf":
            fields["engine"] = "ivf"
        return fields

    def __post_init__(self) -> None:
        if self.banks < 1:
            raise UsageError(f"--banks must be at least 1, not {self.banks}")
        if not 0.0 < self.ratio <= 1.0:
            raise UsageError(f"--ratio must be in (0, 1], not {self.ratio}")
        if self.k < 1:
            raise UsageError(f"--k must be at least 1, not {self.k}")
        if self.aggregate not in ("top1pct", "max"):
            raise UsageError(f"--aggregate must be top1pct or max, not {self.aggregate!r}")
        if self.engine not in ("auto", "exact", "faiss", "ivf"):
            raise UsageError(f"--engine must be auto, exact, faiss or ivf, not {self.engine!r}")
        if self.min_bank < 1:
            raise UsageError(f"--min-bank must be at least 1, not {self.min_bank}")
        if self.refine_rounds < 0 or not 0.0 < self.refine_drop < 1.0 or self.refine_rounds * self.refine_drop >= 1.0:
            raise UsageError(f"iterative refinement needs rounds >= 0 and 0 < drop < 1 with rounds * drop < 1, "
                             f"not {self.refine_rounds} rounds of {self.refine_drop}")


@dataclass(frozen=True)
class DistillConfig:
    """Step 2: the reconstruction model's size and the distillation schedule."""

    iters: int
    width: int | None
    depth: int
    heads: int
    batch_size: int = 16
    loss: str = "mse"
    lr: float = 2e-3
    final_lr: float = 2e-4
    warmup: int = 100
    dropout: float = 0.2
    checkpoint_every: int = 200


METHODS = ("meds", "memory", "knn", "iterative")
CUTS = ("mixture", "mad", "otsu")
REFINE_ROUNDS = 3
REFINE_DROP = 0.1


@dataclass(frozen=True)
class SelectConfig:
    """Step 3 and the final cut.

    Methods: "meds" (Steps 1-3), "memory" (Step-1 ensemble scores only), "knn" (full-bank
    leave-self-out nearest neighbour, PatchCore-style) and "iterative" (kNN re-scored against
    a memory that drops the most suspicious share each round, SROC-style). The final clean set
    is the cut `cut` (or `reject_fraction`) applied per class to the final scores; with
    cut "mad" and method meds that is the paper's Step-3 rule at t = T.
    """

    method: str = "meds"
    iters: int = 10_000
    k: float = 3.0
    p_final: float = 0.5
    p_ramp: int | None = None
    batch_size: int = 16
    checkpoint_every: int = 200
    cut: str = "mad"
    reject_fraction: float | None = None

    @property
    def ramp_steps(self) -> int:
        """Steps over which the hard-mining share p rises: 1000 (10 % of the paper's T) unless set."""
        return self.p_ramp if self.p_ramp is not None else min(1000, max(1, self.iters // 10))

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"--method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.k < 0:
            raise UsageError(f"--k must be >= 0, not {self.k}")
        if self.cut not in CUTS:
            raise UsageError(f"--cut must be one of {', '.join(CUTS)}, not {self.cut!r}")
        if self.reject_fraction is not None and not 0.0 <= self.reject_fraction < 1.0:
            raise UsageError(f"--reject-fraction must lie in [0, 1), not {self.reject_fraction}")

    def step1(self, score: ScoreConfig) -> ScoreConfig:
        """The Step-1 scores this method reads: the ensemble as given, or one full bank for kNN."""
        if self.method in ("meds", "memory"):
            return score
        return replace(score, banks=1, ratio=1.0, replace=False, min_bank=1,
                       refine_rounds=REFINE_ROUNDS if self.method == "iterative" else 0, refine_drop=REFINE_DROP)


@dataclass(frozen=True)
class Preset:
    """Defaults that depend on the hardware: backbone, input size, decoder size, iterations."""

    name: str
    backbone: str
    resize: int | None
    crop: int | None
    width: int | None
    depth: int
    heads: int
    distill_iters: int
    select_iters: int
    batch_size: int = 16
    min_bank: int = 1
    cut: str = "mad"
    extra: dict = field(default_factory=dict)

    def score_config(self, **overrides) -> ScoreConfig:
        """Step-1 options: the preset's bank floor unless overridden; None in `overrides` means unset."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return ScoreConfig(**{"min_bank": self.min_bank, **given})

    def distill_config(self, **overrides) -> DistillConfig:
        """Step-2 options: the preset's decoder and iterations; None in `overrides` means unset."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return DistillConfig(**{"iters": self.distill_iters, "width": self.width, "depth": self.depth,
                                "heads": self.heads, "batch_size": self.batch_size, **given})

    def select_config(self, **overrides) -> SelectConfig:
        """Step-3 options and the final cut: the preset's iterations and cut; None means unset."""
        given = {k: v for k, v in overrides.items() if v is not None or k == "reject_fraction"}
        return SelectConfig(**{"iters": self.select_iters, "batch_size": self.batch_size, "cut": self.cut,
                               **given})


PAPER = Preset(name="paper", backbone="vit_base_patch14_reg4_dinov2", resize=448, crop=392, width=None,
               depth=8, heads=12, distill_iters=10_000, select_iters=10_000)

# Chosen by measurement on a 2-core CPU, on the tuning part of benchmarks/bench_suite.py only
# (docs/bench-accuracy.md): Lite0 on the whole 256 px image (no centre crop: a defect at the border
# stays visible; 32×32 grid; every method ranked contaminants better than with the 224 crop); no
# floor on the memory size (larger memories hurt repeated defects); a 64-wide, 4-block decoder with
# 300 + 300 steps; the mixture cut (best mean F1 of the rejected set for memory and MeDS scores).
CPU = Preset(name="cpu", backbone="tf_efficientnet_lite0", resize=256, crop=256, width=64,
             depth=4, heads=4, distill_iters=300, select_iters=300, cut="mixture")


def parse_duration(text: str) -> float:
    """Seconds in "90s", "10m", "1.5h" or a bare number of seconds; UsageError otherwise."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not match or float(match.group(1)) <= 0:
        raise UsageError(f"--budget must be a positive duration such as 90s, 10m or 1h, not {text!r}")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def resolve_preset(name: str, *, cuda: bool) -> Preset:
    """`auto` is the paper preset on a GPU and the CPU preset otherwise."""
    if name not in PRESETS:
        raise UsageError(f"--preset must be one of {', '.join(PRESETS)}, not {name!r}")
    if name == "auto":
        return PAPER if cuda else CPU
    return PAPER if name == "paper" else CPU


def resolve_device(device: str) -> str:
    """`auto` → cuda when a GPU is visible, else cpu; an unavailable cuda is a usage error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is visible; use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda[:N], not {device!r}")
    return device
