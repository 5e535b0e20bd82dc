"""Turning images into image-cache entries: what the local loader (`medsclean.stages.loader`) and
the Ray executor (`medsclean.distributed.extract`) share.

An `EncodeJob` names the images to encode; `ImageFolderDataset` decodes, resizes and crops them
(in loader workers or Ray tasks); `encode_batch` runs the encoder on a batch of them and writes
one cache entry per image. The encoder is loaded only when an image needs it (`LazyEncoder`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsclean.config import ExtractConfig
from medsclean.errors import DataError
from medsclean.workdir.image_cache import ImageCache
from medsclean.workdir.images import Preprocess, decode_image, normalise, resize_crop

RANDOM_INIT_SEED = 0


class ImageFolderDataset:
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


class LazyEncoder:
    """The encoder of `cfg`, loaded on first use.

    With the image cache's record of the encoder, its preprocessing and description are known
    without loading it, so a run whose images are all cached (or unreadable) never loads it.
    """

    def __init__(self, cfg: ExtractConfig, device: str, cache: ImageCache):
        self.cfg, self.device, self.cache = cfg, device, cache
        self._encoder = None
        self._record = cache.record()

    def _known(self) -> dict | None:
        if self._record is None:
            self._record = self.cache.record()  # written since (by Ray workers, or a Ray run's driver)
        return self._record

    def get(self):
        if self._encoder is None:
            self._encoder = load_seeded_encoder(self.cfg, self.device)
            self._record = self._encoder.describe()
            self.cache.write_record(self._record)
        return self._encoder

    @property
    def preprocess(self) -> Preprocess:
        if self._known() is None:
            return self.get().preprocess
        spec = self._record["preprocess"]
        return Preprocess(**{**spec, "mean": tuple(spec["mean"]), "std": tuple(spec["std"])})

    def describe(self) -> dict:
        if self._known() is None:
            self.get()
        return self._record


def load_seeded_encoder(cfg: ExtractConfig, device: str):
    """The encoder; random-init weights are drawn from a fixed seed, so that the image cache's
    entries of one key all come from the same weights."""
    import torch

    from medsclean.model.encoder import load_encoder

    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(RANDOM_INIT_SEED)
        return load_encoder(cfg.backbone, weights=cfg.weights, random_init=cfg.random_init,
                            resize=cfg.resize, crop=cfg.crop, device=device, stages=cfg.stages)


def encode_batch(encoder, ok: list[tuple[int, np.ndarray]], hashes: list[str], cache: ImageCache) -> None:
    """Encode (crop, crop, 3) uint8 images and write one cache entry per image: memory (P, D) and
    group<g> (L, C_g), float16."""
    import torch

    x = torch.from_numpy(normalise(np.stack([a for _, a in ok]), encoder.preprocess)).to(encoder.device)
    with torch.inference_mode():
        out = encoder(x)
    memory = out.memory.to("cpu", torch.float16)
    groups = [grp.to("cpu", torch.float16) for grp in out.groups]
    for j, sha in enumerate(hashes):
        tensors = {"memory": memory[j].clone(), **{f"group{g}": grp[j].clone() for g, grp in enumerate(groups)}}
        cache.write(sha, tensors)


def hash_error(path) -> str:
    """The error of an image whose file could not be read for hashing (it gets no cache entry)."""
    return f"{path}: could not be read for hashing; check the file"


def strict_error(err: str) -> DataError:
    """The error raised under --strict for an unreadable image whose skip-message is `err`."""
    return DataError(err.replace("or skip it (the default without --strict)", "or drop --strict"))


@dataclass(frozen=True)
class EncodeJob:
    """The images one extraction encodes: `todo` (indices into `paths`), each with its file's
    SHA-256 (`hashes`, None where the file could not be read), by `encoder` into its cache.
    With `strict`, the first unreadable image raises instead of being skipped."""

    encoder: "LazyEncoder"
    paths: list[Path]
    hashes: list[str | None]
    todo: list[int]
    strict: bool

    @property
    def cfg(self) -> ExtractConfig:
        return self.encoder.cfg

    @property
    def cache(self) -> ImageCache:
        return self.encoder.cache
