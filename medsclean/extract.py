"""Stage `features`: run the frozen encoder over every image once and store what later stages need.

Per image the artifact holds the memory features `memory` (P, D) and the reconstruction groups
`group<g>` (L, C_g), all float16, in shards of `shard_size` consecutive images. Shards are
written as they complete into a partial folder, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ExtractConfig, resolve_device
from .data import Dataset
from .errors import DataError
from .images import Preprocess, decode_image, normalise, resize_crop
from .store import Artifact, Store, digest, load_tensors_with_metadata, save_tensors, tensor_specs
from .ui import Reporter

STAGE = "features"


@dataclass(frozen=True)
class ExtractResult:
    artifact: Artifact
    cached: bool
    n_images: int
    n_skipped: int
    seconds: float


def features_key(dataset: Dataset, cfg: ExtractConfig) -> str:
    """Digest of everything the features depend on: the image table and the encoder set-up."""
    weights_sum = None
    if cfg.weights is not None:
        from .backbone import file_sha256

        weights_sum = file_sha256(Path(cfg.weights))
    return digest({"images": dataset.table(), "encoder": cfg.key_fields(), "weights_sha256": weights_sum})


class _ImageFolderDataset:
    """Decodes, resizes and crops images in loader workers; a bad file yields its error, not a crash.

    Workers return 8-bit pixels (a quarter of the float32 bytes to pass between processes);
    the main process normalises whole batches.
    """

    def __init__(self, paths: list[Path], spec: Preprocess):
        self.paths, self.spec = paths, spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, resize_crop(decode_image(self.paths[i]), self.spec), None
        except DataError as exc:
            return i, None, str(exc)


def _collate(batch):
    return batch


def _shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


def _shard_name(start: int) -> str:
    return f"part-{start:07d}.safetensors"


def run_extract(dataset: Dataset, store: Store, cfg: ExtractConfig, *, stage: str = STAGE, force: bool = False,
                strict: bool = False, reporter: Reporter) -> ExtractResult:
    """Extract features for `dataset` into `store`, reusing a valid cached artifact unless `force`."""
    t0 = time.perf_counter()
    key = features_key(dataset, cfg)
    if not force:
        art = store.cached(stage, key)
        if art is not None:
            return ExtractResult(art, True, len(art.manifest["images"]), len(art.manifest["skipped"]),
                                 time.perf_counter() - t0)

    from .backbone import load_encoder

    device = resolve_device(cfg.device)
    encoder = load_encoder(cfg.backbone, weights=cfg.weights, random_init=cfg.random_init,
                           resize=cfg.resize, crop=cfg.crop, device=device)
    partial = store.partial_dir(stage, key)
    if force:
        for f in partial.glob("part-*.safetensors"):
            f.unlink()
    shards = _shard_ranges(len(dataset), cfg.shard_size)
    todo = [(s, e) for s, e in shards if not (partial / _shard_name(s)).is_file()]
    if len(todo) < len(shards):
        reporter.info(f"resuming {stage}: {len(shards) - len(todo)} of {len(shards)} shards already written")
    paths = [r.path for r in dataset.records]
    with reporter.task(f"extract {cfg.backbone}", total=len(dataset)) as task:
        task.update(completed=sum(e - s for s, e in shards) - sum(e - s for s, e in todo))
        _extract_shards(encoder, paths, todo, partial, cfg, device, strict, task)
    return _commit(dataset, store, stage, key, partial, shards, encoder, cfg, t0)


def _extract_shards(encoder, paths, todo, partial: Path, cfg: ExtractConfig, device: str, strict: bool, task) -> None:
    import torch
    from torch.utils.data import DataLoader

    if not todo:
        return
    batches = [list(range(b, min(b + cfg.batch_size, e))) for s, e in todo for b in range(s, e, cfg.batch_size)]
    loader = DataLoader(_ImageFolderDataset(paths, encoder.preprocess), batch_sampler=batches,
                        num_workers=cfg.num_workers, collate_fn=_collate,
                        pin_memory=device.startswith("cuda"), persistent_workers=False)
    shard_iter = iter(todo)
    start, end = next(shard_iter)
    buffer: dict[str, list] = {}
    skipped: list[dict] = []
    for batch in loader:
        ok = [(i, arr) for i, arr, err in batch if err is None]
        for i, _, err in batch:
            if err is not None:
                if strict:
                    raise DataError(err.replace("or skip it (the default without --strict)", "or drop --strict"))
                skipped.append({"index": i, "path": str(paths[i]), "error": err})
        if ok:
            x = torch.from_numpy(normalise(np.stack([a for _, a in ok]), encoder.preprocess)).to(device)
            with torch.inference_mode():
                out = encoder(x)
            buffer.setdefault("index", []).append(torch.tensor([i for i, _ in ok], dtype=torch.int64))
            buffer.setdefault("memory", []).append(out.memory.to("cpu", torch.float16))
            for g, grp in enumerate(out.groups):
                buffer.setdefault(f"group{g}", []).append(grp.to("cpu", torch.float16))
        task.advance(len(batch))
        if batch[-1][0] == end - 1:
            _write_shard(partial / _shard_name(start), buffer, skipped, encoder)
            buffer, skipped = {}, []
            start, end = next(shard_iter, (None, None))


def _write_shard(path: Path, buffer: dict[str, list], skipped: list[dict], encoder) -> None:
    import torch

    if buffer:
        tensors = {k: torch.cat(v) for k, v in buffer.items()}
    else:  # every image of the shard was unreadable
        tensors = {"index": torch.zeros(0, dtype=torch.int64)}
    save_tensors(path, tensors, metadata={"skipped": json.dumps(skipped)})


def _commit(dataset: Dataset, store: Store, stage: str, key: str, partial: Path, shards, encoder,
            cfg: ExtractConfig, t0: float) -> ExtractResult:
    shard_rows, skipped, kept_index = [], [], []
    specs = {}
    for s, e in shards:
        name = _shard_name(s)
        tensors, meta = load_tensors_with_metadata(partial / name)
        index = tensors["index"]
        if index.numel():
            specs[name] = tensor_specs(tensors)
        skipped.extend(json.loads(meta.get("skipped", "[]")))
        kept_index.extend(index.tolist())
        shard_rows.append({"file": name, "start": s, "end": e, "rows": int(index.numel())})
    if not kept_index:
        raise DataError(f"{dataset.root}: none of the {len(dataset)} images could be decoded; check the files")
    table = dataset.table()
    images = [table[i] for i in kept_index]
    for row in skipped:
        row["path"] = dataset.records[row.pop("index")].rel_path
    manifest = {
        "root": str(dataset.root), "layout": dataset.layout, "split": dataset.split,
        "images_digest": digest(table), "images": images, "skipped": skipped,
        "encoder": encoder.describe(), "config": {k: (str(v) if isinstance(v, Path) else v)
                                                   for k, v in vars(cfg).items()},
        "shards": shard_rows, "tensors": specs,
    }
    art = store.commit(stage, key, partial, manifest)
    return ExtractResult(art, False, len(images), len(skipped), time.perf_counter() - t0)


__all__ = ["ExtractResult", "features_key", "run_extract", "STAGE", "tensor_specs"]
