"""Stage `features`: run the frozen encoder over every image once and store what later stages need.

Per image the artifact holds the memory features `memory` (P, D) and the reconstruction groups
`group<g>` (L, C_g), all float16, in shards of `shard_size` consecutive images (with `index`,
the rows of the image table each shard holds).

The encoder's output is first cached per image, in the work folder's image cache
(`<work>/image-features/<encoder key>/<hh>/<sha256>.safetensors`, see `store.ImageCache`), keyed
by the SHA-256 of the file's bytes and by the encoder set-up. Each entry is written as soon as
its batch is encoded; a run encodes only the images without an entry (new, edited, or not
reached by an interrupted run) and then assembles the artifact from the entries. Adding,
removing or editing a few images therefore re-encodes only those.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from medsclean.config import ExtractConfig
from medsclean.errors import DataError
from medsclean.stages.encoding import EncodeJob, LazyEncoder, strict_error
from medsclean.stages.loader import encode_locally
from medsclean.ui import Reporter
from medsclean.values import resolve_device
from medsclean.workdir.artifacts import Artifact, digest, file_sha256, save_tensors, tensor_specs
from medsclean.workdir.data import Dataset
from medsclean.workdir.image_cache import IMAGE_CACHE, ImageCache
from medsclean.workdir.store import Store

STAGE = "extract"
ENTRY_FORMAT = "medsclean-image-features/1"


@dataclass(frozen=True)
class ExtractResult:
    """What `run_extract` did.

    Attributes:
        n_images: images in the artifact (decoded, or taken from the image cache).
        n_skipped: unreadable images, left out.
        seconds: wall time of the call.
        n_extracted: images encoded by this call (0 when the artifact was cached).
        n_reused: images taken from the per-image cache (0 when the artifact was cached).
    """

    artifact: Artifact
    cached: bool
    n_images: int
    n_skipped: int
    seconds: float
    n_extracted: int = 0
    n_reused: int = 0


def _sha256_or_none(path: Path) -> str | None:
    try:
        return file_sha256(path)
    except OSError:
        return None


def hash_images(paths: Sequence[Path], workers: int | None = None) -> list[str | None]:
    """SHA-256 (hex) of each file, None where the file cannot be read; hashed on `workers` threads
    (default: the CPU count, at most 8)."""
    workers = workers or min(8, os.cpu_count() or 1)
    if workers <= 1 or len(paths) < 2:
        return [_sha256_or_none(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_sha256_or_none, paths, chunksize=16))


def encoder_fields(cfg: ExtractConfig) -> dict:
    """What the features of one image depend on besides its bytes: the encoder options and the
    SHA-256 of a `weights` file."""
    weights_sum = file_sha256(Path(cfg.weights)) if cfg.weights is not None else None
    return {"encoder": cfg.key_fields(), "weights_sha256": weights_sum}


def encoder_key(cfg: ExtractConfig, fields: dict | None = None) -> str:
    """The key of the image cache that `cfg`'s encoder fills (16 hex)."""
    return digest({"format": ENTRY_FORMAT, **(fields or encoder_fields(cfg))})


def image_rows(dataset: Dataset, hashes: Sequence[str | None]) -> list[dict]:
    """The image table (`Dataset.table()`) with each image's `sha256`."""
    return [{**row, "sha256": sha} for row, sha in zip(dataset.table(), hashes, strict=True)]


def _keyed_rows(rows: list[dict]) -> list[dict]:
    """The rows as the features key sees them: identity and content, not size or mtime."""
    return [{k: row[k] for k in ("id", "path", "class", "label", "sha256")} for row in rows]


def _features_key(rows: list[dict], fields: dict) -> str:
    return digest({"images": _keyed_rows(rows), **fields})


def _shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


def _shard_name(start: int) -> str:
    return f"part-{start:07d}.safetensors"


def run_extract(dataset: Dataset, store: Store, cfg: ExtractConfig, *, stage: str = STAGE, force: bool = False,
                strict: bool = False, reporter: Reporter, executor=None) -> ExtractResult:
    """Extract features for `dataset` into `store`, reusing a valid cached artifact unless `force`.

    Images whose entry is in the image cache are neither decoded nor encoded (unless `force`,
    which re-encodes every image and rewrites its entry); unreadable images are skipped and
    listed in the manifest (with `strict`, the first one raises DataError). `executor` (a
    `distributed.RaySession`, or a function returning one, called only when images are missing)
    encodes the missing images on Ray workers instead of this process; the cache entries, artifact
    and key are the same.
    """
    t0 = time.perf_counter()
    hashes = hash_images([r.path for r in dataset.records])
    fields = encoder_fields(cfg)
    rows = image_rows(dataset, hashes)
    key = _features_key(rows, fields)
    art = store.cached(stage, key, reporter, force=force)
    if art is not None:
        if strict and art.manifest["skipped"]:
            # the same answer as a fresh work folder gives: the artifact was made without --strict
            raise strict_error(art.manifest["skipped"][0]["error"])
        return ExtractResult(art, True, len(art.manifest["images"]), len(art.manifest["skipped"]),
                             time.perf_counter() - t0)
    why = _recompute_reason(store, stage, dataset, rows, force)
    if why:
        reporter.info(f"{stage}: recomputing ({why})")
    cache = store.image_cache(encoder_key(cfg, fields))
    with store.in_use(IMAGE_CACHE, cache.key):  # its new entries are no artifact's until the commit
        job = EncodeJob(LazyEncoder(cfg, resolve_device(cfg.device), cache), [r.path for r in dataset.records],
                        hashes, [i for i, sha in enumerate(hashes) if force or not cache.has(sha)], strict)
        errors = _encode(job, executor, reporter)
        n_extracted = len(job.todo) - len(errors)
        reporter.info(f"{stage}: {n_extracted} of {len(dataset)} images extracted, {len(dataset) - len(job.todo)} "
                      f"reused from the image cache" + (f", {len(errors)} unreadable" if errors else ""))
        art = _assemble(dataset, store, (stage, key), rows, errors, job)
    return ExtractResult(art, False, len(art.manifest["images"]), len(errors), time.perf_counter() - t0,
                         n_extracted=n_extracted, n_reused=len(dataset) - len(job.todo))


def _encode(job: EncodeJob, executor, reporter: Reporter) -> dict[int, str]:
    """Encode what the image cache lacks, here or on the Ray session `executor` gives; the errors
    of the unreadable images, by index."""
    with reporter.task(f"extract {job.cfg.backbone}", total=len(job.todo)) as task:
        session = executor() if callable(executor) and job.todo else executor
        if session is None or not job.todo:
            return encode_locally(job, task)
        from medsclean.distributed.extract import extract_missing

        return extract_missing(session, job, task)


def _assemble(dataset: Dataset, store: Store, artifact: tuple[str, str], rows: list[dict], errors: dict[int, str],
              job: EncodeJob) -> Artifact:
    """Write the artifact (stage, key): the image-cache entries of the readable images, in table
    order, as shards of `cfg.shard_size` table rows."""
    stage, key = artifact
    cache, cfg = job.cache, job.cfg
    kept = [i for i in range(len(dataset)) if i not in errors]
    if not kept:
        raise DataError(f"{dataset.root}: none of the {len(dataset)} images could be decoded; check the files")
    with store.staged(stage) as staging:
        shard_rows, specs = [], {}
        for s, e in _shard_ranges(len(dataset), cfg.shard_size):
            index = [i for i in range(s, e) if i not in errors]
            tensors = _stack_entries(cache, [rows[i] for i in index], index)
            name = _shard_name(s)
            save_tensors(staging / name, tensors)
            if index:
                specs[name] = tensor_specs(tensors)
            shard_rows.append({"file": name, "start": s, "end": e, "rows": len(index)})
        skipped = [{"path": dataset.records[i].rel_path, "error": err} for i, err in sorted(errors.items())]
        manifest = {
            "root": str(dataset.root), "layout": dataset.layout, "split": dataset.split,
            "images_digest": digest(_keyed_rows(rows)), "images": [rows[i] for i in kept], "skipped": skipped,
            "encoder": job.encoder.describe(), "image_cache_key": cache.key,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
            "shards": shard_rows, "tensors": specs,
        }
        return store.commit(stage, key, staging, manifest)


def _stack_entries(cache: ImageCache, rows: list[dict], index: list[int]) -> dict:
    """One shard's tensors: `index` (n,) int64 and each entry tensor stacked, memory (n, P, D) and
    group<g> (n, L, C_g) float16."""
    import torch

    parts: dict[str, list] = {}
    for row in rows:
        if not cache.has(row["sha256"]):
            raise DataError(f"{cache.entry(row['sha256'])}: the cached features of {row['path']} vanished "
                            f"during the run (pruned?); rerun to extract them again")
        for name, tensor in cache.read(row["sha256"]).items():
            parts.setdefault(name, []).append(tensor)
    tensors = {"index": torch.tensor(index, dtype=torch.int64)}
    tensors.update({name: torch.stack(values) for name, values in parts.items()})
    return tensors


def _recompute_reason(store: Store, stage: str, dataset: Dataset, rows: list[dict], force: bool) -> str | None:
    """Why the stage is recomputed, compared with the newest artifact of the same image folder
    and split; None for a first run."""
    if force:
        return "--force"
    previous = _previous_artifact(store, stage, dataset)
    if previous is None:
        return None
    counts = _image_changes(previous.manifest, rows)
    if not any(counts.values()):
        return f"images unchanged since {previous.key}; the encoder options, classes or labels differ"
    return ", ".join(f"{n} {what}" for what, n in counts.items() if n) + f" since {previous.key}"


def _previous_artifact(store: Store, stage: str, dataset: Dataset) -> Artifact | None:
    for key in reversed(store.keys(stage)):
        art = store.load(stage, key)
        m = art.manifest if art is not None else {}
        if (m.get("root"), m.get("layout"), m.get("split")) == (str(dataset.root), dataset.layout, dataset.split):
            return art
    return None


def _image_changes(previous: dict, rows: list[dict]) -> dict[str, int]:
    """Counts of images added, removed and changed (another SHA-256 under the same path) between an
    earlier manifest and the current image rows; images skipped then count as present, unchanged."""
    before = {row["path"]: row.get("sha256") for row in previous.get("images", [])}
    before.update({row["path"]: None for row in previous.get("skipped", [])})
    now = {row["path"]: row["sha256"] for row in rows}
    changed = sum(1 for p in now.keys() & before.keys() if before[p] is not None and before[p] != now[p])
    return {"images added": len(now.keys() - before.keys()), "removed": len(before.keys() - now.keys()),
            "changed": changed}


def prune_image_cache(store: Store, keys: Sequence[str] | None = None) -> tuple[int, int]:
    """Delete the image-cache entries that no completed artifact of the work folder refers to.

    An artifact refers to the entries named by its manifest's `image_cache_key` and the `sha256`
    of its image rows (`extract`, `extract-test`, ...). Entries written by a run still in
    progress are not referred to yet: claim the caches first (`Store.claimed` with
    `(IMAGE_CACHE, key)`; an extraction holds its cache in use) and prune only those.

    Args:
        keys: the caches to prune (default: every cache of the work folder).

    Returns:
        (files removed, bytes freed).
    """
    referenced = _referenced_entries(store)
    removed = freed = 0
    for cache in store.image_caches():
        if keys is not None and cache.key not in keys:
            continue
        n, size = cache.remove_except(referenced.get(cache.key, set()))
        removed, freed = removed + n, freed + size
    return removed, freed


def _referenced_entries(store: Store) -> dict[str, set[str]]:
    """Image-cache key → the SHA-256s of its entries that completed artifacts refer to."""
    out: dict[str, set[str]] = {}
    for stage in store.stages():
        for key in store.keys(stage):
            art = store.load(stage, key)
            cache_key = art.manifest.get("image_cache_key") if art is not None else None
            if cache_key is not None:
                out.setdefault(cache_key, set()).update(
                    row["sha256"] for row in art.manifest["images"] if row.get("sha256"))
    return out


__all__ = ["ExtractResult", "encoder_fields", "encoder_key", "hash_images", "image_rows",
           "prune_image_cache", "run_extract", "STAGE"]
