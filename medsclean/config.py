"""One frozen config per stage: its defaults and its validation.

Each stage config is the single home of its defaults (the paper's values where the paper gives
one); a preset (`medsclean.presets`) is an overlay of field values on those configs, and nothing
else restates a default; the checks and parsers the configs share live in `medsclean.values`.
Configs name their own parameters in errors (`ConfigError.param`); the CLI maps them to flags.
A stage's cache key is the digest of the fields that change its result (`key_fields`); options
that only change speed (device, batch size of the encoder, workers) are left out so that reruns
on another machine reuse the cache.

This module must stay light (no numpy, no torch): the CLI validates options with it before
anything heavy is imported.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

from medsclean.choices import (Aggregate, ClassFrom, Cut, Engine, EvalModel, Executor, FinalScore, Layout, Loss,
                               Method, Split)
from medsclean.errors import ConfigError
from medsclean.values import (DEVICE_PATTERN, check_seed, divisor_near, installed, one_of, parse_size, require,
                              stride_pair)


@dataclass(frozen=True)
class DataConfig:
    """Which images a run reads."""

    STAGE: ClassVar[str] = "data"

    images: Path
    layout: str = "auto"
    split: str = "train"
    masks: Path | None = None
    class_from: str = "top"
    strict: bool = False

    def __post_init__(self) -> None:
        one_of(self.STAGE, "layout", self.layout, Layout)
        one_of(self.STAGE, "split", self.split, Split)
        one_of(self.STAGE, "class_from", self.class_from, ClassFrom)


CNN_STAGES = (8, 16)
"""Strides of the two CNN stages the encoder taps: memory on the finer grid, one reconstruction group each."""


@dataclass(frozen=True)
class ExtractConfig:
    """The frozen encoder and how images are fed to it.

    `resize`/`crop` None: the backbone kind's own input size (backbone.py: 448/392 for ViTs, as
    the paper; 256/256 for CNNs). The default backbone is EfficientNet-Lite0, whose ImageNet
    weights install with the package; the paper preset sets the paper's DINOv2-R ViT-B/14.
    `stages` picks a CNN's two tapped stages by stride (ViTs have their own rule and take only the
    default).
    """

    STAGE: ClassVar[str] = "extract"

    backbone: str = "tf_efficientnet_lite0"
    stages: tuple[int, int] | str = CNN_STAGES
    weights: Path | None = None
    random_init: bool = False
    resize: int | None = None
    crop: int | None = None
    batch_size: int = 8
    num_workers: int = 2
    device: str = "auto"
    shard_size: int = 64

    def __post_init__(self) -> None:
        s = self.STAGE
        object.__setattr__(self, "stages", stride_pair(self.stages, s, example=CNN_STAGES))
        require(not (self.weights is not None and self.random_init), s, ("weights", "random_init"),
                "weights and random_init contradict each other; pass only one")
        for name in ("resize", "crop"):
            value = getattr(self, name)
            require(value is None or value >= 1, s, name, f"{name} must be at least 1 pixel, not {value}")
        require(self.batch_size >= 1, s, "batch_size", f"batch_size must be at least 1, not {self.batch_size}")
        require(self.num_workers >= 0, s, "num_workers", f"num_workers must be 0 or more, not {self.num_workers}")
        require(self.shard_size >= 1, s, "shard_size", f"shard_size must be at least 1, not {self.shard_size}")
        require(re.fullmatch(DEVICE_PATTERN, self.device) is not None, s, "device",
                f"device must be auto, cpu or cuda[:N], not {self.device!r}")

    def key_fields(self) -> dict:
        fields_ = {"backbone": self.backbone, "weights": str(self.weights) if self.weights else None,
                   "random_init": self.random_init, "resize": self.resize, "crop": self.crop}
        if self.stages != CNN_STAGES:  # so folders made before the option keep their keys
            fields_["stages"] = list(self.stages)
        return fields_


MIN_MAX_MEMORY = 64 * 10**6
"""Smallest `ScoreConfig.max_memory`: below it the torch runtime alone does not fit."""


@dataclass(frozen=True)
class ScoreConfig:
    """Step 1: the random-memory ensemble (the paper: B = 100 memories of rho = 10 % of a class)."""

    STAGE: ClassVar[str] = "score"

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
    coreset: float = 0.1
    max_memory: int | str | None = None

    def key_fields(self, *, approx: bool | None = None) -> dict:
        """The fields that change the scores. `approx`: whether the approximate engine scores the
        classes (None: when engine is approx; engine auto never uses it)."""
        fields_ = asdict(self)
        fields_.pop("device")
        fields_.pop("max_memory")  # block sizes change the speed, never the scores
        fields_.pop("engine")  # every engine gives the same scores (to float32 round-off) except IVF and approx
        coreset = fields_.pop("coreset")
        if self.engine == "ivf":
            fields_["engine"] = "ivf"
        if approx or (approx is None and self.engine == "approx"):
            if coreset < 1.0:  # a coreset of every patch is the exact engine
                fields_["engine"], fields_["coreset"] = "approx", coreset
        return fields_

    @property
    def max_memory_bytes(self) -> int | None:
        """`max_memory` in bytes (None: no bound)."""
        return None if self.max_memory is None else parse_size(self.max_memory)

    def __post_init__(self) -> None:
        s = self.STAGE
        require(self.banks >= 1, s, "banks", f"banks must be at least 1, not {self.banks}")
        require(0.0 < self.ratio <= 1.0, s, "ratio", f"ratio must be in (0, 1], not {self.ratio}")
        require(self.k >= 1, s, "k", f"k must be at least 1, not {self.k}")
        one_of(s, "aggregate", self.aggregate, Aggregate)
        one_of(s, "engine", self.engine, Engine)
        require(self.engine not in (Engine.FAISS, Engine.IVF) or installed("faiss"), s, "engine",
                f"engine {self.engine} needs the faiss package: pip install faiss-cpu (or faiss-gpu-cu12 on a "
                f"CUDA machine, in its place), or use engine exact")
        require(self.min_bank >= 1, s, "min_bank", f"min_bank must be at least 1, not {self.min_bank}")
        check_seed(self.seed, s)
        require(0.0 < self.coreset <= 1.0, s, "coreset", f"coreset must be in (0, 1], not {self.coreset}")
        if self.max_memory is not None:
            try:
                size = parse_size(self.max_memory)
            except ValueError as error:
                raise ConfigError("max_memory", str(error), stage=s) from None
            require(size >= MIN_MAX_MEMORY, s, "max_memory",
                     f"max_memory must be at least 64MB, not {self.max_memory}")
        require(self.refine_rounds >= 0 and 0.0 < self.refine_drop < 1.0
                and self.refine_rounds * self.refine_drop < 1.0, s, ("refine_rounds", "refine_drop"),
                f"iterative refinement needs rounds >= 0 and 0 < drop < 1 with rounds * drop < 1, "
                f"not {self.refine_rounds} rounds of {self.refine_drop}")


@dataclass(frozen=True)
class DistillConfig:
    """Step 2: the reconstruction model, the distillation schedule, and the optimiser both
    training steps share (Step 3 fine-tunes with these settings and its own iteration count).

    `width` None: a ViT encoder's own token width (the paper); CNN stages are projected to
    `model.CNN_WIDTH`. `warmup` is the paper's linear warm-up (100 steps, 1 % of 10k); shorter
    runs warm up for 1 % of their steps, at least 10 and at most half (`warmup_for`).
    `token_pool` 2 averages the decoder's token grid over 2 x 2 windows (the stride-8 grid of a
    CNN becomes stride 16: a quarter of the tokens, 3.6x cheaper steps measured); its maps are resized
    back to the encoder's grid. The paper's decoder sees the encoder's grid (1).
    """

    STAGE: ClassVar[str] = "distill"

    iters: int = 10_000
    width: int | None = None
    depth: int = 8
    heads: int = 12
    batch_size: int = 16
    loss: str = "mse"
    lr: float = 2e-3
    final_lr: float = 2e-4
    warmup: int = 100
    weight_decay: float = 1e-4
    eps: float = 1e-10
    grad_clip: float = 0.1
    dropout: float = 0.2
    token_pool: int = 1
    checkpoint_every: int = 200

    def __post_init__(self) -> None:
        s = self.STAGE
        for name in ("iters", "depth", "heads", "batch_size", "token_pool"):
            value = getattr(self, name)
            require(value >= 1, s, name, f"{name} must be at least 1, not {value}")
        require(self.width is None or self.width >= 1, s, "width", f"width must be at least 1, not {self.width}")
        require(self.width is None or self.width % self.heads == 0, s, ("heads", "width"),
                f"heads {self.heads} must divide width {self.width}; try heads "
                f"{divisor_near(self.width or 1, self.heads)}")
        one_of(s, "loss", self.loss, Loss)
        require(self.warmup >= 0, s, "warmup", f"warmup must be 0 or more, not {self.warmup}")
        require(0.0 <= self.dropout < 1.0, s, "dropout", f"dropout must be in [0, 1), not {self.dropout}")
        require(self.checkpoint_every >= 0, s, "checkpoint_every",
                f"checkpoint_every must be 0 (only at the end) or more, not {self.checkpoint_every}")

    def warmup_for(self, iters: int) -> int:
        """Warm-up steps of a run of `iters` steps."""
        return min(self.warmup, max(10, iters // 100), max(1, iters // 2))


ITERATIVE_ROUNDS = 3
"""Rounds of the iterative baseline, each dropping `ScoreConfig.refine_drop` of the class."""


def check_self_out(method: str, include_self: bool) -> None:
    """knn and iterative always leave the image itself out: with it, every patch's nearest neighbour
    is itself at distance 0 and every score is 0.

    Raises:
        ConfigError: `include_self` with one of them.
    """
    if include_self and str(getattr(method, "value", method)) in (Method.KNN, Method.ITERATIVE):
        raise ConfigError(("include_self", "method"), f"include_self does not apply to method "
                          f"{getattr(method, 'value', method)}: it always leaves the image itself out (its own "
                          f"patches would be every patch's nearest neighbour, at distance 0); drop include_self",
                          stage="select")


MAD_MARGIN = 3.0
"""k of the MAD rule median + k·MAD (Step 3's re-selection and the final `mad` cut): the one
default of the margin, `SelectConfig.k`'s."""


@dataclass(frozen=True)
class SelectConfig:
    """Step 3 and the final cut.

    Methods: "meds" (Steps 1-3), "memory" (Step-1 ensemble scores only), "knn" (full-bank
    leave-self-out nearest neighbour, PatchCore-style) and "iterative" (kNN re-scored against
    a memory that drops the most suspicious share each round, SROC-style). Step 3 re-selects
    before every pass with median + k·(t/T)·MAD per class; the hard-mining share p rises
    linearly to `p_final` over `ramp_steps`; easy points keep `mining_factor` of their gradient.
    Its result is the final score η of every image; the clean list is `CutConfig`'s cut of η.
    """

    STAGE: ClassVar[str] = "select"

    method: str = "meds"
    iters: int = 10_000
    k: float = MAD_MARGIN
    p_final: float = 0.5
    p_ramp: int | None = None
    mining_factor: float = 0.1

    @property
    def ramp_steps(self) -> int:
        """Steps over which p rises: 1000 (10 % of the paper's T) unless set, 10 % of shorter runs."""
        return self.p_ramp if self.p_ramp is not None else min(1000, max(1, self.iters // 10))

    def __post_init__(self) -> None:
        s = self.STAGE
        one_of(s, "method", self.method, Method)
        require(self.iters >= 1, s, "iters", f"iters must be at least 1, not {self.iters}")
        require(self.k >= 0, s, "k", f"k must be 0 or more, not {self.k}")
        require(0.0 <= self.p_final <= 1.0, s, "p_final", f"p_final must lie in [0, 1], not {self.p_final}")
        require(self.p_ramp is None or self.p_ramp >= 0, s, "p_ramp", f"p_ramp must be 0 or more, not {self.p_ramp}")

    def step1(self, score: ScoreConfig) -> ScoreConfig:
        """The Step-1 scores this method reads: the ensemble as given, or one full bank for kNN.

        Raises:
            ConfigError: include_self with method knn or iterative (`check_self_out`).
        """
        check_self_out(self.method, score.include_self)
        if self.method in (Method.MEDS, Method.MEMORY):
            return score
        return replace(score, banks=1, ratio=1.0, replace=False, min_bank=1,
                       refine_rounds=ITERATIVE_ROUNDS if self.method == Method.ITERATIVE else 0)


@dataclass(frozen=True)
class CutConfig:
    """The final cut of the final scores η, per class: the clean images are those below the cut.

    rule: "mixture" (two Gaussians on log η, median + k·MAD when the class shows no second
        component), "mad" (median + k·MAD: with method meds, the paper's Step-3 rule at t = T)
        or "otsu". k: the MAD margin; None means Step 3's own `SelectConfig.k`.
    reject_fraction: instead of the rule, reject exactly this share of each class.
    threshold: instead of the rule, keep the images with η below this value, in every class.
    score: what is cut: "eta", the final score of Step 3 (the paper), or "eta+memory", the
        geometric mean of η and the Step-1 image score, each divided by its class median
        (`selection.combine_class_scores`; for the Step-1 methods η is that score already).
    A cut needs no training: changing it re-cuts the stored scores in seconds.
    """

    STAGE: ClassVar[str] = "cut"

    rule: str = "mad"
    k: float | None = None
    reject_fraction: float | None = None
    threshold: float | None = None
    score: str = "eta"

    def __post_init__(self) -> None:
        s = self.STAGE
        one_of(s, "rule", self.rule, Cut)
        one_of(s, "score", self.score, FinalScore)
        require(self.k is None or self.k >= 0, s, "k", f"k must be 0 or more, not {self.k}")
        require(self.reject_fraction is None or 0.0 <= self.reject_fraction < 1.0, s, "reject_fraction",
                f"reject_fraction must lie in [0, 1), not {self.reject_fraction}")
        require(self.reject_fraction is None or self.threshold is None, s, ("reject_fraction", "threshold"),
                "reject_fraction and threshold contradict each other; pass only one")
        require(self.threshold is None or math.isfinite(self.threshold), s, "threshold",
                f"threshold must be a finite number, not {self.threshold}")

    def describe(self) -> str:
        """The rule as shown to users: "mixture", "mad", "otsu", "top 0.1" or "eta < 0.42"; with the
        combined score, "mixture of eta+memory", "top 0.1 of eta+memory", "eta+memory < 0.42"."""
        if self.threshold is not None:
            return f"{self.score} < {self.threshold:g}"
        rule = f"top {self.reject_fraction:g}" if self.reject_fraction is not None else self.rule
        return rule if self.score == FinalScore.ETA else f"{rule} of {self.score}"


@dataclass(frozen=True)
class EvalConfig:
    """The evaluation protocol; the defaults are the paper's (256 px maps, Gaussian blur sigma 4
    with a 5-pixel support, image score = mean of the top 1 % of pixels, masks > 0.5, AUPRO to a
    false-positive rate of 0.3)."""

    STAGE: ClassVar[str] = "eval"

    model: str = "select"
    size: int = 256
    sigma: float = 4.0
    kernel: int = 5
    top_ratio: float = 0.01
    mask_threshold: float = 0.5
    fpr_limit: float = 0.3
    report_top: int = 24

    def __post_init__(self) -> None:
        s = self.STAGE
        one_of(s, "model", self.model, EvalModel)
        require(self.size >= 1, s, "size", f"size must be at least 1 pixel, not {self.size}")
        require(self.sigma >= 0, s, "sigma", f"sigma must be 0 (no blur) or more, not {self.sigma}")
        require(self.kernel >= 1 and self.kernel % 2 == 1, s, "kernel", f"kernel must be odd and positive, not {self.kernel}")
        require(0.0 <= self.top_ratio <= 1.0, s, "top_ratio", f"top_ratio must lie in [0, 1], not {self.top_ratio}")
        require(0.0 < self.fpr_limit <= 1.0, s, "fpr_limit", f"fpr_limit must lie in (0, 1], not {self.fpr_limit}")
        require(self.report_top >= 0, s, "report_top", f"report_top must be 0 or more, not {self.report_top}")

    def protocol(self) -> dict:
        """The settings that define the metrics (everything but which model is measured)."""
        return {k: v for k, v in asdict(self).items() if k not in ("model", "report_top")}


@dataclass(frozen=True)
class NoiseConfig:
    """`make-noisy`: how many anomalous test images are injected into train, and how they are placed."""

    STAGE: ClassVar[str] = "noise"

    ratio: float = 0.1
    overlap: bool = True

    def __post_init__(self) -> None:
        require(math.isfinite(self.ratio) and self.ratio >= 0, self.STAGE, "ratio",
                f"ratio must be a finite number >= 0 (e.g. 0.1), not {self.ratio!r}")


@dataclass(frozen=True)
class DemoConfig:
    """`demo`: the generated dataset and its contamination; the defaults finish in minutes on 2 CPU cores."""

    STAGE: ClassVar[str] = "demo"

    categories: tuple[str, ...] = ("brick", "grass", "gravel", "coins")
    n_train: int = 40
    n_test_good: int = 10
    n_test_defect: int = 18
    size: int = 256
    noise_ratio: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_train", "n_test_good", "n_test_defect"):
            value = getattr(self, name)
            require(value >= 0, self.STAGE, name, f"{name} must be 0 or more, not {value}")
        require(self.noise_ratio >= 0, self.STAGE, "noise_ratio",
                f"noise_ratio must be 0 or more, not {self.noise_ratio}")
        check_seed(self.seed, self.STAGE)


@dataclass(frozen=True)
class ClusterConfig:
    """Where the stages run: in this process (`local`) or on a Ray cluster (`ray`).

    The executor changes where the work is done, never its result: it is not part of any cache key.

    address: None starts a private Ray instance on this machine (stopped when the command ends);
        "auto" joins the cluster this machine belongs to; "ray://host:port" a remote one.
    workers: CPU workers of a private instance (None: every core); ignored when joining a cluster.
    train_workers: ranks of data-parallel training for `distill` and `select` on Ray Train (one GPU
        each on a CUDA device); 1 trains in this process.
    """

    STAGE: ClassVar[str] = "cluster"

    executor: str = "local"
    address: str | None = None
    workers: int | None = None
    train_workers: int = 1

    def __post_init__(self) -> None:
        s = self.STAGE
        one_of(s, "executor", self.executor, Executor)
        require(self.train_workers >= 1, s, "train_workers",
                f"train_workers must be at least 1, not {self.train_workers}")
        require(self.executor == Executor.RAY or self.train_workers == 1, s, "train_workers",
                "train_workers above 1 is an option of executor ray; add --executor ray or drop train_workers")
        for name in ("address", "workers"):
            require(self.executor == Executor.RAY or getattr(self, name) is None, s, name,
                     f"{name} is an option of executor ray; add --executor ray or drop {name}")
        require(self.workers is None or self.workers >= 1, s, "workers",
                f"workers must be at least 1, not {self.workers}")
        require(self.executor != Executor.RAY or installed("ray"), s, "executor",
                "executor ray needs the ray package: pip install 'medsclean[ray]'")


STAGE_CONFIGS = {c.STAGE: c for c in (DataConfig, ExtractConfig, ScoreConfig, DistillConfig, SelectConfig,
                                      CutConfig, EvalConfig, NoiseConfig, DemoConfig, ClusterConfig)}
