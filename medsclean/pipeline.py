"""Stages wired together: each stage function runs its missing or stale predecessors first.

The CLI builds one `Run` from its options and calls one function here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import DataConfig, ExtractConfig, Preset, resolve_device, resolve_preset
from .data import Dataset, discover
from .extract import ExtractResult, run_extract
from .store import Store
from .ui import Reporter, RichReporter


@dataclass(frozen=True)
class Run:
    """Everything a command needs: data, encoder set-up, preset, work folder, seed, device."""

    data: DataConfig
    extract: ExtractConfig
    preset: Preset
    work: Path
    seed: int
    device: str
    reporter: Reporter = field(compare=False, repr=False)

    def dataset(self) -> Dataset:
        return discover(self.data.images, layout=self.data.layout, split=self.data.split,
                        masks=self.data.masks, class_from=self.data.class_from)

    def store(self) -> Store:
        return Store(self.work, images_root=self.data.images)


def build_run(*, images: Path, work: Path, backbone: str | None = None, weights: Path | None = None,
              random_init: bool = False, preset: str = "auto", resize: int | None = None, crop: int | None = None,
              batch_size: int | None = None, num_workers: int = 2, device: str = "auto", seed: int = 0,
              layout: str = "auto", split: str = "train", masks: Path | None = None, class_from: str = "top",
              strict: bool = False, quiet: bool = False, reporter: Reporter | None = None) -> Run:
    """Resolve presets and defaults into a frozen `Run`."""
    device = resolve_device(device)
    chosen = resolve_preset(preset, cuda=device.startswith("cuda"))
    use_preset_sizes = backbone is None or backbone == chosen.backbone
    extract_cfg = ExtractConfig(
        backbone=backbone or chosen.backbone,
        weights=Path(weights).expanduser().resolve() if weights else None,
        random_init=random_init,
        resize=resize if resize is not None else (chosen.resize if use_preset_sizes else None),
        crop=crop if crop is not None else (chosen.crop if use_preset_sizes else None),
        batch_size=batch_size or 8, num_workers=num_workers, device=device)
    data_cfg = DataConfig(images=Path(images).expanduser().resolve(), layout=layout, split=split,
                          masks=masks, class_from=class_from, strict=strict)
    return Run(data=data_cfg, extract=extract_cfg, preset=chosen, work=Path(work).expanduser().resolve(),
               seed=seed, device=device, reporter=reporter or RichReporter(quiet=quiet))


def extract_stage(run: Run, *, force: bool = False, stage: str = "features") -> ExtractResult:
    """Stage `features` for the run's images."""
    dataset = run.dataset()
    result = run_extract(dataset, run.store(), run.extract, stage=stage, force=force, strict=run.data.strict,
                         reporter=run.reporter)
    _log_extract(run.reporter, result)
    return result


def _log_extract(reporter: Reporter, result: ExtractResult) -> None:
    m = result.artifact.manifest
    if result.cached:
        reporter.info(f"features: cached ({result.n_images} images, {m['encoder']['name']}) at {result.artifact.path}")
        return
    rate = result.n_images / result.seconds if result.seconds > 0 else float("nan")
    reporter.info(f"features: {result.n_images} images with {m['encoder']['name']} in {result.seconds:.1f} s "
                  f"({rate:.1f} images/s), {result.n_skipped} skipped → {result.artifact.path}")
    for row in m["skipped"]:
        reporter.warn(f"skipped {row['path']}: {row['error']}")


def extract_summary(result: ExtractResult) -> dict:
    m = result.artifact.manifest
    return {"stage": "features", "path": str(result.artifact.path), "cached": result.cached,
            "images": result.n_images, "skipped": m["skipped"], "backbone": m["encoder"]["name"],
            "seconds": round(result.seconds, 3), "key": result.artifact.key}
