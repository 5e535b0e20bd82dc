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

import functools
import hashlib
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsclean.config import ExtractConfig
from medsclean.values import resolve_device
from medsclean.workdir.data import Dataset
from medsclean.errors import DataError
from medsclean.workdir.images import Preprocess, decode_image, normalise, resize_crop
from medsclean.workdir.artifacts import Artifact, digest, save_tensors, tensor_specs
from medsclean.workdir.image_cache import IMAGE_CACHE, ImageCache
from medsclean.workdir.store import Store
from medsclean.ui import Reporter

STAGE = "features"
ENTRY_FORMAT = "medsclean-image-features/1"
RANDOM_INIT_SEED = 0
_HASH_CHUNK_BYTES = 1 << 20


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


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks of 1 MiB."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_CHUNK_BYTES):
            h.update(block)
    return h.hexdigest()


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


def features_key(dataset: Dataset, cfg: ExtractConfig, hashes: Sequence[str | None] | None = None,
                 fields: dict | None = None) -> str:
    """Digest of everything the features depend on: each image's path, class, label and content
    (SHA-256 of its bytes, `hash_images`), and the encoder set-up (`encoder_fields`)."""
    if hashes is None:
        hashes = hash_images([r.path for r in dataset.records])
    return _features_key(image_rows(dataset, hashes), fields or encoder_fields(cfg))


def _features_key(rows: list[dict], fields: dict) -> str:
    return digest({"images": _keyed_rows(rows), **fields})


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


class _LazyEncoder:
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
            self._encoder = _load_encoder(self.cfg, self.device)
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


def _load_encoder(cfg: ExtractConfig, device: str):
    """The encoder; random-init weights are drawn from a fixed seed, so that the image cache's
    entries of one key all come from the same weights."""
    import torch

    from medsclean.model.encoder import load_encoder

    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(RANDOM_INIT_SEED)
        return load_encoder(cfg.backbone, weights=cfg.weights, random_init=cfg.random_init,
                            resize=cfg.resize, crop=cfg.crop, device=device, stages=cfg.stages)


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
            raise _strict_error(art.manifest["skipped"][0]["error"])
        return ExtractResult(art, True, len(art.manifest["images"]), len(art.manifest["skipped"]),
                             time.perf_counter() - t0)
    why = _recompute_reason(store, stage, dataset, rows, force)
    if why:
        reporter.info(f"{stage}: recomputing ({why})")
    cache = store.image_cache(encoder_key(cfg, fields))
    with store.in_use(IMAGE_CACHE, cache.key):  # its new entries are no artifact's until the commit
        return _extract_into(dataset, store, cfg, stage, key, rows, hashes, cache, force=force, strict=strict,
                             reporter=reporter, executor=executor, t0=t0)


def _extract_into(dataset: Dataset, store: Store, cfg: ExtractConfig, stage: str, key: str, rows: list[dict],
                  hashes: list[str | None], cache: ImageCache, *, force: bool, strict: bool,
                  reporter: Reporter, executor, t0: float) -> ExtractResult:
    """The rest of `run_extract` once the artifact is known to be missing: encode what the image
    cache lacks, then assemble the artifact."""
    encoder = _LazyEncoder(cfg, resolve_device(cfg.device), cache)
    todo = [i for i, sha in enumerate(hashes) if force or not cache.has(sha)]
    with reporter.task(f"extract {cfg.backbone}", total=len(todo)) as task:
        session = executor() if callable(executor) and todo else executor
        if session is None or not todo:
            errors = _extract_missing(encoder, dataset, hashes, todo, cache, cfg, strict, task)
        else:
            from medsclean.distributed.extract import extract_missing

            errors = extract_missing(session, encoder, dataset, hashes, todo, cache, cfg, strict, task)
    n_extracted = len(todo) - len(errors)
    reporter.info(f"{stage}: {n_extracted} of {len(dataset)} images extracted, {len(dataset) - len(todo)} reused "
                  f"from the image cache" + (f", {len(errors)} unreadable" if errors else ""))
    art = _assemble(dataset, store, stage, key, rows, errors, cache, encoder.describe(), cfg)
    return ExtractResult(art, False, len(art.manifest["images"]), len(errors), time.perf_counter() - t0,
                         n_extracted=n_extracted, n_reused=len(dataset) - len(todo))


def _extract_missing(encoder: _LazyEncoder, dataset: Dataset, hashes: Sequence[str | None], todo: list[int],
                     cache: ImageCache, cfg: ExtractConfig, strict: bool, task) -> dict[int, str]:
    """Encode the images `todo` (indices into the dataset) in batches, writing each image's entry as
    soon as its batch is done. Returns the errors of the unreadable ones, by index."""
    from torch.utils.data import DataLoader

    if not todo:
        return {}
    paths = [r.path for r in dataset.records]
    batches = [todo[b:b + cfg.batch_size] for b in range(0, len(todo), cfg.batch_size)]
    loader = DataLoader(_ImageFolderDataset(paths, encoder.preprocess), batch_sampler=batches,
                        num_workers=cfg.num_workers, collate_fn=_collate,
                        pin_memory=encoder.device.startswith("cuda"), persistent_workers=False,
                        worker_init_fn=functools.partial(_init_worker, os.getpid()))
    errors: dict[int, str] = {}
    batches_iter = iter(loader)
    try:
        for batch in batches_iter:
            ok = []
            for i, pixels, err in batch:
                if err is None and hashes[i] is None:
                    err = f"{paths[i]}: could not be read for hashing; check the file"
                if err is None:
                    ok.append((i, pixels))
                elif strict:
                    raise _strict_error(err)
                else:
                    errors[i] = err
            if ok:
                _encode_batch(encoder.get(), ok, [hashes[i] for i, _ in ok], cache)
            task.advance(len(batch))
    finally:
        _stop_workers(batches_iter)
    return errors


def _strict_error(err: str) -> DataError:
    """The error raised under --strict for an unreadable image whose skip-message is `err`."""
    return DataError(err.replace("or skip it (the default without --strict)", "or drop --strict"))


# Loader workers. They are forked helpers of this process: they must neither outlive it (a kill -9
# of the main process left them blocked for good, holding the work folder's stage lock) nor take
# part in Ctrl-C (the terminal sends SIGINT to the whole process group; a worker interrupted between
# batches stalled in its exit, writing into a queue nobody read, and held up the main process's
# shutdown by 5 s per worker).

PR_SET_PDEATHSIG = 1
WORKER_STOP_GRACE_S = 1.0


def _init_worker(parent_pid: int, worker_id: int) -> None:
    """`worker_init_fn` of the loader: ignore SIGINT (the main process handles Ctrl-C and stops the
    workers), and on Linux die with the parent (SIGKILL when it exits, however it exits)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        _die_with_parent(parent_pid)


def _die_with_parent(parent_pid: int) -> None:
    """prctl(PR_SET_PDEATHSIG, SIGKILL) for this process; then, should the parent already have died
    before the call (the signal only comes for a death after it), exit at once."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


def _stop_workers(batches, grace_s: float = WORKER_STOP_GRACE_S) -> None:
    """Shut a DataLoader iterator's workers down now, rather than when the iterator is collected
    (which, after an exception, ran before the CLI's error line and took up to 5 s per worker).

    Workers finish the image in hand and exit; one still alive `grace_s` after it was told to stop
    (e.g. decoding a huge file) is terminated. A no-op for an iterator without workers or one that
    already finished.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is None or getattr(batches, "_shutdown", True):
        return
    workers = list(getattr(batches, "_workers", ()))
    told = getattr(batches, "_workers_done_event", None)
    finished = threading.Event()
    reaper = threading.Thread(target=_reap, args=(workers, told, finished, grace_s), daemon=True,
                              name="medsclean-loader-reaper")
    reaper.start()
    try:
        shutdown()
    finally:
        finished.set()
        reaper.join()


def _reap(workers: list, told, finished: threading.Event, grace_s: float) -> None:
    """Terminate the `workers` still alive `grace_s` after `told` is set (the loader sets it once
    its pin-memory thread has stopped, so no worker is killed while that thread reads), unless
    `finished` comes first."""
    while told is not None and not told.is_set():
        if finished.wait(0.02):
            return
    if finished.wait(grace_s):
        return
    for w in workers:
        w.terminate()  # a no-op for one already reaped


def _encode_batch(encoder, ok: list[tuple[int, np.ndarray]], hashes: list[str], cache: ImageCache) -> None:
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


def _assemble(dataset: Dataset, store: Store, stage: str, key: str, rows: list[dict], errors: dict[int, str],
              cache: ImageCache, encoder: dict, cfg: ExtractConfig) -> Artifact:
    """Write the artifact: the entries of the readable images, in table order, as shards of
    `cfg.shard_size` table rows."""
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
            "encoder": encoder, "image_cache_key": cache.key,
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
    of its image rows (`features`, `features-test`, ...). Entries written by a run still in
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


__all__ = ["ExtractResult", "encoder_fields", "encoder_key", "features_key", "file_sha256", "hash_images",
           "image_rows", "prune_image_cache", "run_extract", "STAGE", "tensor_specs"]
