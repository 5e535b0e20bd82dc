"""Stage `extract` on Ray: the missing images decoded by Ray Data tasks and encoded by an actor pool.

`extract_missing` has the contract of `medsclean.stages.loader.encode_locally` (the local
executor): it encodes the images of an `EncodeJob`, writes one image-cache entry per image as soon
as its batch is encoded (by `medsclean.stages.encoding.encode_batch`, in the actor), and returns the errors of the unreadable images by
dataset index. Only indices and error strings come back to the driver, never features; the
artifact is then assembled from the cache by `run_extract`, exactly as for the local executor.

    from_items: one block per batch of `todo`, (index, path, sha256) lists
      -> map_batches, tasks: decode, resize, crop (uint8 pixels; the unreadable get their error)
      -> map_batches, an actor pool, one encoder each: normalise, forward, write the entries
      -> iter_batches on the driver: (index, error) per image; progress, errors, --strict

Ray Data streams the blocks with back-pressure, so neither the pixels nor the features of the
whole dataset are ever held at once. An interrupted run leaves the entries of the batches it
finished; a rerun encodes only the images without one.
"""

from __future__ import annotations

import pickle

import numpy as np

from medsclean.config import ExtractConfig
from medsclean.errors import DataError, MedscleanError, UsageError, WeightsError
from medsclean.stages.encoding import (EncodeJob, ImageFolderDataset, LazyEncoder, encode_batch, hash_error,
                                      load_seeded_encoder, strict_error)
from medsclean.workdir.images import Preprocess
from medsclean.workdir.image_cache import ImageCache
from medsclean.distributed.session import RaySession

DECODE_CPUS = 0.25
"""CPUs a decode task reserves. On CPU the encoder actors hold the rest of each worker's CPU (the
forward pass is most of the work), so that decoding runs beside them instead of waiting for a
free CPU that a pool of `workers` actors would never leave."""


def extract_missing(session: RaySession, job: EncodeJob, task) -> dict[int, str]:
    """Encode the images `job.todo` on the session's workers, writing each image's cache entry as
    soon as its batch is done; `task` advances by one per image.

    Returns:
        The errors of the unreadable images, by index.

    Raises:
        DataError: with `strict`, for the first unreadable image reported by a worker.
        MedscleanError: what an encoder actor raised (e.g. WeightsError: a node without the
            weights file), as the local executor would have raised it.
    """
    if not job.todo:
        return {}
    import ray

    _quiet(ray)
    spec = _preprocess(job.encoder)
    cuda = job.encoder.device.startswith("cuda")
    batches = _batches(ray, job)
    decoded = batches.map_batches(
        _decode, fn_args=(spec,), batch_size=None, batch_format="numpy", num_cpus=1 if cuda else DECODE_CPUS,
        compute=ray.data.TaskPoolStrategy(size=min(2 * session.workers, batches.num_blocks())))
    encoded = decoded.map_batches(
        _Encode, fn_constructor_args=(job.cfg, "cuda" if cuda else "cpu", job.cache), batch_size=None,
        batch_format="numpy", zero_copy_batch=True, num_cpus=1 if cuda else 1 - DECODE_CPUS,
        num_gpus=1 if cuda else None,
        compute=ray.data.ActorPoolStrategy(size=min(_pool_size(ray, session, cuda), batches.num_blocks())))
    errors: dict[int, str] = {}
    for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
        for failure in batch["failure"].tolist():
            if failure:
                raise pickle.loads(failure)
        for i, err in zip(batch["index"].tolist(), batch["error"].tolist(), strict=True):
            if err and job.strict:
                raise strict_error(err)
            if err:
                errors[i] = err
        task.advance(len(batch["index"]))
    return dict(sorted(errors.items()))


def _quiet(ray) -> None:
    """No Ray Data progress bars or execution log lines on this process's stderr: the command
    reports its own progress (Ray Data's full logs stay in the session's log folder)."""
    import logging

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"


def _preprocess(encoder: LazyEncoder) -> Preprocess:
    """The decode spec. Without the image cache's record of the encoder (the first run of this
    encoder set-up) the encoder is loaded once here, on the CPU (never the driver's GPU), to
    describe it; `encoder` then reads that record instead of loading it again."""
    if encoder.cache.record() is None:
        encoder.cache.write_record(load_seeded_encoder(encoder.cfg, "cpu").describe())
    return encoder.preprocess


def _batches(ray, job: EncodeJob):
    """The images to encode as a Ray dataset of one block per batch, each a row of (index, path,
    sha256) lists: `todo` cut every `batch_size` images, as the local executor cuts it.

    Each batch stays one block through both steps (`map_batches` without a batch size neither
    splits nor bundles blocks), so the encoder sees the local executor's batches: the forward
    pass's float rounding depends on the batch, and an image's features must not depend on which
    images Ray happened to put beside it.
    """
    items = []
    for b in range(0, len(job.todo), job.cfg.batch_size):
        chunk = job.todo[b:b + job.cfg.batch_size]
        items.append({"index": chunk, "path": [str(job.paths[i]) for i in chunk],
                      "sha256": [job.hashes[i] or "" for i in chunk]})
    return ray.data.from_items(items, override_num_blocks=len(items))


def _pool_size(ray, session: RaySession, cuda: bool) -> int:
    """One encoder actor per CPU worker; on CUDA one per GPU of the cluster (at most `workers`)."""
    if not cuda:
        return session.workers
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus < 1:
        raise DataError("device cuda: the Ray cluster offers no GPU; use --device cpu, or add GPU nodes")
    return max(1, min(session.workers, gpus))


def _decode(batch: dict[str, np.ndarray], spec: Preprocess) -> dict[str, np.ndarray]:
    """A Ray Data task: decode, resize and crop a batch of images as the local loader workers do
    (`ImageFolderDataset`), to (crop, crop, 3) uint8; one row in, one row per image out. An
    unreadable image (or one that could not be hashed) gets its error and zero pixels, which are
    never encoded."""
    index, paths, hashes = (np.concatenate(batch[c]).tolist() for c in ("index", "path", "sha256"))
    images = ImageFolderDataset(paths, spec)
    pixels = np.zeros((len(paths), spec.crop, spec.crop, 3), np.uint8)
    errors = []
    for j, path in enumerate(paths):
        _, array, err = images[j]
        if err is None and not hashes[j]:
            err = hash_error(path)
        if err is None:
            pixels[j] = array
        errors.append(err or "")
    return {"index": np.array(index, dtype=np.int64), "sha256": np.array(hashes, dtype=object), "pixels": pixels,
            "error": np.array(errors, dtype=object)}


class _Encode:
    """A Ray Data actor: one encoder, loaded on first use (not at all when every image of its
    batches is unreadable); torch on one thread on CPU (the actor owns one worker)."""

    def __init__(self, cfg: ExtractConfig, device: str, cache: ImageCache):
        if device == "cpu":
            import torch

            torch.set_num_threads(1)
        self.cache = cache
        self.encoder = LazyEncoder(cfg, device, cache)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = [j for j, err in enumerate(batch["error"].tolist()) if not err]
        failure = b""
        if ok:
            try:
                encode_batch(self.encoder.get(), [(int(batch["index"][j]), batch["pixels"][j]) for j in ok],
                              [str(batch["sha256"][j]) for j in ok], self.cache)
            except MedscleanError as exc:  # for the driver to raise as is, not wrapped in a Ray task error
                failure = _portable(exc)
        return {"index": batch["index"], "error": batch["error"],
                "failure": np.array([failure] * len(batch["index"]), dtype=object)}


def _portable(exc: MedscleanError) -> bytes:
    """`exc` pickled; as its plain base class (same message and exit code) when it does not
    unpickle (an error with more constructor arguments than its message, e.g. ConfigError)."""
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)
        return data
    except Exception:
        plain = next(c for c in type(exc).__mro__ if c in (DataError, WeightsError, UsageError, MedscleanError))
        return pickle.dumps(plain(str(exc)))


__all__ = ["extract_missing"]
