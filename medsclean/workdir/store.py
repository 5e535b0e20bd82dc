"""The work folder: artifacts by stage and key, `<work>/<stage>/<key>/`, and who may write them.

`Store` is the only writer of artifact folders (in the format of `medsclean.workdir.artifacts`).
A stage folder is written under a temporary name and renamed into place only once complete, so a
folder that has a manifest is always whole. Work in progress (training checkpoints) lives in
`<work>/.partial/<stage>-<key>/` and is resumed only by a run with the same key. Features of
single images, the cache that the extract stage is assembled from, live in
`<work>/image-features/` (`medsclean.workdir.image_cache.ImageCache`). Locks under `<work>/.locks/`
keep two runs from computing the same artifact and `runs --remove` from deleting one in use.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from medsclean.errors import ConfigError, DataError, InUseError
from medsclean.workdir.artifacts import (FORMAT, LATEST, MANIFEST, Artifact, folder_bytes, read_manifest,
                                         safetensors_damage, save_tensors, tensor_specs, versions)
from medsclean.workdir.atomic import replace_folder, write_json_atomic, write_text_atomic
from medsclean.workdir.image_cache import IMAGE_CACHE, ImageCache
from medsclean.workdir.migrate import migrate_work_folder


_USES: dict[str, Any] = {}  # lock file -> open handle holding its shared lock (`Store.use`)
_USES_GUARD = threading.Lock()


def release_uses() -> None:
    """Give up every `Store.use` mark this process holds (the end of a command)."""
    with _USES_GUARD:
        handles = list(_USES.values())
        _USES.clear()
    for handle in handles:
        handle.close()


class Store:
    """A work folder holding artifacts by stage and key: `<work>/<stage>/<key>/`.

    Artifacts of different datasets and option sets live side by side; a later run never
    replaces an earlier one's. `<work>/<stage>/LATEST` names the stage's most recent artifact
    (for tools and tests); `medsclean.workdir.runs` keeps the per-dataset pointers. A work folder of an
    earlier layout (0.1.0's one artifact per stage folder, the stage folders `features/` and
    `scores/` of 0.1.x) is brought to this one when opened (`medsclean.workdir.migrate`).
    """

    def __init__(self, work: Path, images_root: Path | None = None, *, wait: bool = True, strict: bool = False):
        self.work = Path(work).expanduser().resolve()
        self.wait = wait
        self.strict = strict
        self._held: dict[tuple[str, str], Any] = {}
        if images_root is not None:
            images_root = Path(images_root).resolve()
            if self.work == images_root or images_root in self.work.parents:
                raise ConfigError("work", f"work {self.work} lies inside the image folder {images_root}; "
                                  f"choose a work folder outside it")
        self.work.mkdir(parents=True, exist_ok=True)
        migrate_work_folder(self.work)

    def stage_path(self, stage: str, key: str) -> Path:
        return self.work / stage / key

    def keys(self, stage: str) -> list[str]:
        """Keys of the completed artifacts of `stage`, oldest first."""
        folder = self.work / stage
        if not folder.is_dir():
            return []
        found = [(p.stat().st_mtime, p.name) for p in folder.iterdir() if (p / MANIFEST).is_file()]
        return [name for _, name in sorted(found)]

    def load(self, stage: str, key: str | None = None) -> Artifact | None:
        """The completed, undamaged artifact `key` of `stage` (by default the stage's latest), or None."""
        if key is None:
            key = self.latest_key(stage)
            if key is None:
                return None
        return self.inspect(stage, key)[0]

    def latest_key(self, stage: str) -> str | None:
        try:
            key = (self.work / stage / LATEST).read_text(encoding="utf-8").strip()
        except (OSError, ValueError):
            return None
        return key if re.fullmatch(r"[0-9A-Za-z._-]+", key) else None

    def inspect(self, stage: str, key: str) -> tuple[Artifact | None, str | None]:
        """(artifact, None) when (stage, key) is whole; (None, why) when its folder is damaged; (None, None)
        when there is none. Checks the manifest (a JSON object of this format, stage and key) and every
        file it lists (tensor files: readable header, the recorded names and shapes, no truncation)."""
        path = self.stage_path(stage, key)
        if not path.is_dir():
            return None, None
        manifest = read_manifest(path / MANIFEST)
        if manifest is None:
            return None, "its manifest.json is missing or not a medsclean manifest"
        if manifest.get("stage") != stage or manifest.get("key") != key:
            return None, f"its manifest describes {manifest.get('stage')!r} {manifest.get('key')!r}"
        tensors = manifest.get("tensors", {})
        if not isinstance(tensors, dict):
            return None, "its manifest lists no tensor files"
        for name, specs in tensors.items():
            damage = safetensors_damage(path / name, specs)
            if damage is not None:
                return None, f"{name}: {damage}"
        for name in manifest.get("files", []):
            if not (path / name).is_file():
                return None, f"{name} is missing"
        return Artifact(path=path, manifest=manifest), None

    def cached(self, stage: str, key: str, reporter: Any = None, *, force: bool = False) -> Artifact | None:
        """The artifact of `stage` made from exactly the inputs summarised by `key`, if there is a whole one.

        A damaged one is reported on `reporter` in one line, removed, and treated as missing. When
        none is there, the (stage, key) lock is taken before returning None, so that the caller
        computes it alone; a run that waited finds the artifact made meanwhile. With `force`, the
        lock is taken and None returned: the caller recomputes whatever is there.

        Either way the artifact is marked in use (`use`) for the rest of the command, first, so
        that `runs --remove` cannot delete it between this check and its reading."""
        self.use(stage, key)
        if force:
            self._acquire(stage, key, reporter)
            return None
        art = self._whole(stage, key, reporter)
        if art is not None:
            return art
        self._acquire(stage, key, reporter)
        art = self._whole(stage, key, reporter)
        if art is not None:
            self.release(stage, key)
        return art

    def _whole(self, stage: str, key: str, reporter: Any) -> Artifact | None:
        art, damage = self.inspect(stage, key)
        if damage is not None:
            if self.strict:
                path = self.stage_path(stage, key)
                raise DataError(f"{stage}: the stored artifact {key} is damaged ({damage}); remove it with "
                                f"`rm -r {path}` (or rerun without --strict to recompute it)")
            if reporter is not None:
                reporter.warn(f"{stage}: the stored artifact {key} is damaged ({damage}); recomputing it")
            shutil.rmtree(self.stage_path(stage, key), ignore_errors=True)
        return art

    def _acquire(self, stage: str, key: str, reporter: Any) -> None:
        import fcntl

        if (stage, key) in self._held:
            return
        folder = self.work / ".locks"
        folder.mkdir(exist_ok=True)
        handle = open(folder / f"{stage}-{key}.lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not self.wait:
                handle.close()
                raise DataError(f"{stage}: another run is computing the same {stage} in {self.work} now; "
                                f"wait for it or rerun without --no-wait") from None
            if reporter is not None:
                reporter.info(f"{stage}: another run is computing the same {stage}; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        self._held[(stage, key)] = handle

    def _lock_file(self, name: str) -> Path:
        folder = self.work / ".locks"
        folder.mkdir(exist_ok=True)
        return folder / name

    def use(self, stage: str, key: str) -> None:
        """Mark the artifact (stage, key) as used by this process until `release_uses()` (the CLI
        calls it when a command ends) or the process ends: a shared lock on
        `.locks/<stage>-<key>.use`, which `claimed` (`runs --remove`) must take alone. Waits only
        while a removal holds it, a moment."""
        import fcntl

        try:
            path = self._lock_file(f"{stage}-{key}.use")
        except OSError:  # a work folder this process may only read: nothing here can remove from it either
            return
        with _USES_GUARD:
            if str(path) in _USES:
                return
            try:
                handle = open(path, "a+")
            except OSError:
                return
            fcntl.flock(handle, fcntl.LOCK_SH)
            _USES[str(path)] = handle

    @contextlib.contextmanager
    def in_use(self, stage: str, key: str) -> Iterator[None]:
        """The shared lock of `use` for the block only (e.g. `(IMAGE_CACHE, key)` while an extraction
        writes entries that no artifact refers to yet)."""
        import fcntl

        with open(self._lock_file(f"{stage}-{key}.use"), "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_SH)
            yield

    @contextlib.contextmanager
    def claimed(self, things: list[tuple[str, str]]) -> Iterator[None]:
        """Hold the artifacts `things` ((stage, key) pairs; `(IMAGE_CACHE, key)` for an image cache)
        alone for the block, to delete them: each one's use lock and its stage lock, exclusively,
        without waiting. This process's own `use` of them does not count.

        Raises:
            InUseError: a running command uses or computes one of them; nothing is held then.
        """
        import fcntl

        handles = []
        try:
            for stage, key in things:
                for suffix in ("use", "lock"):
                    path = self._lock_file(f"{stage}-{key}.{suffix}")
                    with _USES_GUARD:
                        mine = _USES.pop(str(path), None)
                    if mine is not None:
                        mine.close()
                    handle = open(path, "a+")
                    handles.append(handle)
                    try:
                        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        where = self.work / stage / key
                        raise InUseError(f"{where}: in use by a running medsclean command; wait for it to end, "
                                         f"then retry") from None
            yield
        finally:
            for handle in handles:
                handle.close()

    def release(self, stage: str, key: str) -> None:
        """Let other runs compute or read (stage, key) (done by `commit`)."""
        handle = self._held.pop((stage, key), None)
        if handle is not None:
            handle.close()

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """An exclusive lock on a work-folder-wide name (e.g. a run record) for a short update."""
        self._acquire("record", name, None)
        try:
            yield
        finally:
            self.release("record", name)

    def partial_dir(self, stage: str, key: str) -> Path:
        """A folder for resumable work in progress of one (stage, key)."""
        path = self.work / ".partial" / f"{stage}-{key}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def commit(self, stage: str, key: str, files_dir: Path, manifest: dict) -> Artifact:
        """Turn a folder of finished files into the artifact (stage, key), atomically.

        `files_dir` is renamed into place after `manifest.json` is written into it; an artifact
        with the same key (the same inputs, e.g. after --force) is replaced.
        """
        manifest = {"format": FORMAT, "stage": stage, "key": key,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions(), **manifest}
        write_json_atomic(files_dir / MANIFEST, manifest)
        final = self.stage_path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        replace_folder(files_dir, final)
        write_text_atomic(final.parent / LATEST, f"{key}\n")
        self.release(stage, key)
        return Artifact(path=final, manifest=manifest)

    def new_staging_dir(self, stage: str) -> Path:
        path = self.work / f".staging-{stage}-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        return path

    def write_stage(self, stage: str, key: str, tensors_by_file: Mapping[str, Mapping[str, Any]],
                    manifest: dict, extra_files: Mapping[str, str] | None = None) -> Artifact:
        """Write a whole stage at once: safetensors files, small text files, and the manifest."""
        staging = self.new_staging_dir(stage)
        try:
            specs = {}
            for name, tensors in tensors_by_file.items():
                save_tensors(staging / name, tensors)
                specs[name] = tensor_specs(tensors)
            for name, text in (extra_files or {}).items():
                write_text_atomic(staging / name, text)
            return self.commit(stage, key, staging, {**manifest, "tensors": specs,
                                                      "files": sorted(extra_files or {})})
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    @contextlib.contextmanager
    def staged(self, stage: str) -> Iterator[Path]:
        """A fresh staging folder to fill and then `commit`; removed if the block raises."""
        staging = self.new_staging_dir(stage)
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def stages(self) -> list[str]:
        """Names of the stage folders that hold at least one completed artifact, sorted."""
        return sorted(p.name for p in self.work.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and self.keys(p.name))

    def image_cache(self, key: str) -> ImageCache:
        """The per-image tensors made with one encoder set-up (`key`): `<work>/image-features/<key>/`."""
        return ImageCache(self.work / IMAGE_CACHE / key)

    def image_caches(self) -> list[ImageCache]:
        """Every per-image cache of the work folder, by key."""
        folder = self.work / IMAGE_CACHE
        if not folder.is_dir():
            return []
        return [ImageCache(p) for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")]

    def remove(self, stage: str, key: str) -> int:
        """Delete one artifact; returns the bytes freed."""
        path = self.stage_path(stage, key)
        freed = folder_bytes(path)
        shutil.rmtree(path, ignore_errors=True)
        pointer = self.work / stage / LATEST
        if pointer.is_file() and pointer.read_text(encoding="utf-8").strip() == key:
            remaining = self.keys(stage)
            if remaining:
                write_text_atomic(pointer, f"{remaining[-1]}\n")
            else:
                pointer.unlink()
        return freed
