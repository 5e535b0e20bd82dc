"""Stage `features` on Ray: the missing images decoded by Ray Data tasks and encoded by an actor pool.

`extract_missing` has the contract of `extract._extract_missing` (the local executor): it encodes
the images `todo`, writes one image-cache entry per image as soon as its batch is encoded (by
`extract._encode_batch`, in the actor), and returns the errors of the unreadable images by
dataset index. Only indices and error strings come back to the driver, never features; the
artifact is then assembled from the cache by `run_extract`, exactly as for the local executor.

    rows (index, path, sha256)  --from_items-->  decode (tasks: decode, resize, crop; uint8)
        --map_batches-->  encode (actors, one encoder each: normalise, forward, write entries)
        --iter_batches-->  driver (progress, errors)

Ray Data streams the blocks with back-pressure, so neither the pixels nor the features of the
whole dataset are ever held at once. An interrupted run leaves the entries of the batches it
finished; a rerun encodes only the images without one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..config import ExtractConfig
from ..data import Dataset
from ..extract import _encode_batch, _ImageFolderDataset, _LazyEncoder, _load_encoder, _strict_error
from ..images import Preprocess
from ..store import ImageCache
from .session import RaySession

DECODE_CPUS = 0.25
"""CPUs a decode task reserves. On CPU the encoder actors hold the rest of each worker's CPU (the
forward pass is most of the work), so that decoding runs beside them instead of waiting for a
free CPU that a pool of `workers` actors would never leave."""
MAX_ROWS_PER_BLOCK = 256
HASH_ERROR = "{path}: could not be read for hashing; check the file"


def extract_missing(session: RaySession, encoder: _LazyEncoder, dataset: Dataset, hashes: Sequence[str | None],
                    todo: list[int], cache: ImageCache, cfg: ExtractConfig, strict: bool, task) -> dict[int, str]:
    """Encode the images `todo` (indices into the dataset) on the session's workers, writing each
    image's cache entry as soon as its batch is done.

    Returns:
        The errors of the unreadable images, by index.

    Raises:
        DataError: with `strict`, for the first unreadable image reported by a worker.
    """
    if not todo:
        return {}
    import ray

    spec = _preprocess(encoder)
    cuda = encoder.device.startswith("cuda")
    decoded = _rows(ray, dataset, hashes, todo, cfg, session.workers).map_batches(
        _decode, fn_args=(spec,), batch_size=cfg.batch_size, batch_format="numpy",
        num_cpus=1 if cuda else DECODE_CPUS, compute=ray.data.TaskPoolStrategy(size=2 * session.workers))
    encoded = decoded.map_batches(
        _Encode, fn_constructor_args=(cfg, "cuda" if cuda else "cpu", cache), batch_size=cfg.batch_size,
        batch_format="numpy", zero_copy_batch=True, num_cpus=1 if cuda else 1 - DECODE_CPUS,
        num_gpus=1 if cuda else None, compute=ray.data.ActorPoolStrategy(size=_pool_size(ray, session, cuda)))
    errors: dict[int, str] = {}
    for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
        for i, err in zip(batch["index"].tolist(), batch["error"].tolist(), strict=True):
            if err and strict:
                raise _strict_error(err)
            if err:
                errors[i] = err
        task.advance(len(batch["index"]))
    return dict(sorted(errors.items()))


def _preprocess(encoder: _LazyEncoder) -> Preprocess:
    """The decode spec. Without the image cache's record of the encoder (the first run of this
    encoder set-up) the encoder is loaded once here, on the CPU (never the driver's GPU), to
    describe it; `encoder` then reads that record instead of loading it again."""
    if encoder.cache.record() is None:
        encoder.cache.write_record(_load_encoder(encoder.cfg, "cpu").describe())
    return encoder.preprocess


def _rows(ray, dataset: Dataset, hashes: Sequence[str | None], todo: list[int], cfg: ExtractConfig, workers: int):
    """The images to encode as a Ray dataset of (index, path, sha256) rows, in blocks of a few
    batches: enough blocks for every worker to decode, few enough to keep the per-task cost small."""
    rows = [{"index": i, "path": str(dataset.records[i].path), "sha256": hashes[i] or ""} for i in todo]
    per_block = min(MAX_ROWS_PER_BLOCK, max(cfg.batch_size, math.ceil(len(rows) / (4 * workers))))
    return ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / per_block))


def _pool_size(ray, session: RaySession, cuda: bool) -> int:
    """One encoder actor per CPU worker; on CUDA one per GPU of the cluster (at most `workers`)."""
    if not cuda:
        return session.workers
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus < 1:
        from ..errors import DataError

        raise DataError("device cuda: the Ray cluster offers no GPU; use --device cpu, or add GPU nodes")
    return max(1, min(session.workers, gpus))


def _decode(batch: dict[str, np.ndarray], spec: Preprocess) -> dict[str, np.ndarray]:
    """A Ray Data task: decode, resize and crop a batch of images as the local loader workers do
    (`_ImageFolderDataset`), to (crop, crop, 3) uint8. An unreadable image (or one that could not be
    hashed) gets its error and zero pixels, which are never encoded."""
    paths = batch["path"].tolist()
    images = _ImageFolderDataset(paths, spec)
    pixels = np.zeros((len(paths), spec.crop, spec.crop, 3), np.uint8)
    errors = []
    for j, path in enumerate(paths):
        _, array, err = images[j]
        if err is None and not batch["sha256"][j]:
            err = HASH_ERROR.format(path=path)
        if err is None:
            pixels[j] = array
        errors.append(err or "")
    return {"index": batch["index"], "sha256": batch["sha256"], "pixels": pixels,
            "error": np.array(errors, dtype=object)}


class _Encode:
    """A Ray Data actor: one encoder, loaded on first use (not at all when every image of its
    batches is unreadable); torch on one thread on CPU (the actor owns one worker)."""

    def __init__(self, cfg: ExtractConfig, device: str, cache: ImageCache):
        if device == "cpu":
            import torch

            torch.set_num_threads(1)
        self.cache = cache
        self.encoder = _LazyEncoder(cfg, device, cache)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = [j for j, err in enumerate(batch["error"].tolist()) if not err]
        if ok:
            _encode_batch(self.encoder.get(), [(int(batch["index"][j]), batch["pixels"][j]) for j in ok],
                          [str(batch["sha256"][j]) for j in ok], self.cache)
        return {"index": batch["index"], "error": batch["error"]}


__all__ = ["extract_missing"]
