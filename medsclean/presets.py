"""Presets: values laid over the stage configs' defaults, and the run-wide defaults.

A preset restates no default: it names only the fields it changes (`Preset.overlays`), and
`Preset.value` reads every other value from the stage config (`medsclean.config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Mapping

from medsclean.choices import PresetName
from medsclean.config import STAGE_CONFIGS, ScoreConfig
from medsclean.values import one_of


@dataclass(frozen=True)
class Preset:
    """Values laid over the stage configs' defaults: `overlays[stage][field] = value`."""

    name: str
    overlays: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for stage, values in self.overlays.items():
            known = {f.name for f in fields(STAGE_CONFIGS[stage])}
            unknown = set(values) - known
            if unknown:
                raise ValueError(f"preset {self.name}: {stage} has no field {sorted(unknown)[0]!r}")
        object.__setattr__(self, "overlays", MappingProxyType({k: MappingProxyType(dict(v))
                                                               for k, v in self.overlays.items()}))

    def build(self, cls: type, **given: Any):
        """`cls` with this preset's overlay, then `given` on top; a None in `given` means unset."""
        values = {**self.overlays.get(cls.STAGE, {}), **{k: v for k, v in given.items() if v is not None}}
        return cls(**values)

    def value(self, cls: type, name: str) -> Any:
        """The value a field takes under this preset when the user sets nothing."""
        overlay = self.overlays.get(cls.STAGE, {})
        return overlay[name] if name in overlay else next(f.default for f in fields(cls) if f.name == name)


PAPER = Preset(name="paper", overlays={"extract": {"backbone": "vit_base_patch14_reg4_dinov2"}})
"""The paper's settings: its backbone; every other paper value is a stage config's default."""

# Chosen by measurement on a 2-core CPU, on the tuning part of benchmarks/bench_suite.py only
# (docs/bench-accuracy.md): Lite0 on the whole 256 px image (a defect at the border stays visible;
# 32×32 grid); a 64-wide, 4-block decoder on the 2×2-pooled token grid (16×16: a quarter of the
# tokens, so 600 + 600 steps cost less than 300 + 300 on the full grid and rank better); a peak
# learning rate of 8e-3 (best of 1e-3 ... 8e-3 for so few steps; the paper's 2e-3 is for 10k); the
# mixture cut (best mean F1 of the rejected set for memory and MeDS scores).
CPU = Preset(name="cpu", overlays={
    "distill": {"iters": 600, "width": 64, "depth": 4, "heads": 4, "token_pool": 2, "lr": 8e-3},
    "select": {"iters": 600},
    "cut": {"rule": "mixture"},
})

PRESETS = {"paper": PAPER, "cpu": CPU}

METHOD_ADVICE = ("meds (the default) is the method that holds up when a defect can occur more than once "
                 "(repeated defects, held-out photos: 0.85 ranking AUROC vs 0.61 for knn); when every defect "
                 "is unique, --method knn ranked defective images better on held-out textures and scenes "
                 "(0.90 vs 0.84 overall; all methods tie on aligned objects). See docs/bench-accuracy.md.")
"""Which method to try for which data, as measured by the project's benchmark; shown by `--help` and
on the review page."""
DEFAULT_PRESET = PresetName.AUTO.value
DEFAULT_SEED = ScoreConfig.seed


def resolve_preset(name: str, *, cuda: bool) -> Preset:
    """`auto` is the paper preset on a GPU and the CPU preset otherwise."""
    one_of("run", "preset", name, PresetName)
    if name == PresetName.AUTO:
        return PAPER if cuda else CPU
    return PRESETS[name]
