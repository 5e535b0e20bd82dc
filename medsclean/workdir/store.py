"""The on-disk artifact format: a folder per (stage, key) with `manifest.json` plus safetensors files.

This is the only module that reads or writes artifacts. A stage folder is written under a
temporary name and renamed into place only once complete, so a folder that has a manifest is
always whole. Work in progress (training checkpoints) lives in `<work>/.partial/<stage>-<key>/`
and is resumed only by a run with the same key. Features of single images, the cache that the
features stage is assembled from, live in `<work>/image-features/` (`ImageCache`).

It also owns atomic writing for the whole package: files (`atomic_path` and the writers built on
it) and folders (`atomic_directory`) appear whole or not at all, with the modes a plain `open` or
`mkdir` would give under the process's umask (0o666 or 0o777 less the umask). Every JSON file it
writes is strict JSON (`to_json`): NaN and infinities become null.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import math
import os
import platform
import re
import shutil
import stat
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsclean.errors import ConfigError, DataError, InUseError, WriteError, write_error

FORMAT = "medsclean-artifact/1"
MANIFEST = "manifest.json"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)


def digest(obj: Any) -> str:
    """SHA-256 (hex, 16 characters) of the canonical JSON form of `obj`."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:16]


def versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour shapes an artifact."""
    from medsclean import __version__

    out = {"medsclean": __version__, "python": platform.python_version()}
    for mod in ("torch", "timm", "numpy", "safetensors", "faiss"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = str(getattr(m, "__version__", "?"))
    return out


@functools.lru_cache(maxsize=1)
def process_umask() -> int:
    """The umask of this process, read once.

    Reading the umask means setting it; meanwhile it is 0o077, so a file another thread creates
    then is too private rather than too open. Call `process_umask.cache_clear()` after `os.umask`.
    """
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of a file written here: 0o666 less the umask, as `open` gives."""
    return 0o666 & ~process_umask()


def folder_mode() -> int:
    """The mode of a folder made here: 0o777 less the umask, as `mkdir` gives."""
    return 0o777 & ~process_umask()


def _is_numpy_float(value: Any) -> bool:
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, numpy.floating)


def _finite(obj: Any) -> Any:
    """`obj` with every NaN or infinite float (NumPy's included) replaced by None, in nested dicts and lists.

    NumPy floats become Python floats; tuples become lists, as JSON writes them anyway.
    """
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(value) for value in obj]
    if _is_numpy_float(obj):
        obj = float(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def to_json(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON text of `obj`: NaN and infinities become null, other unknown objects `str(obj)`.

    Non-ASCII characters are written as they are (the text is meant to be UTF-8).
    """
    return json.dumps(_finite(obj), indent=indent, ensure_ascii=False, default=str, allow_nan=False)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write; renamed onto `path` when the block ends without error.

    Readers of `path` see the old or the new file, never a part. The new file gets `file_mode()`,
    whatever created it; on an error the temporary file is removed and `path` is left as it was.
    Missing parent folders are created.

    Raises:
        WriteError: the disk refused the temporary file, its folder or the rename (no space, file
            too large, no permission), named by `path`; an OSError about another file the block
            touched passes through.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(exc.filename or path.parent, exc) from exc
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except WriteError:
        raise
    except OSError as exc:
        if exc.filename is not None and os.fspath(exc.filename) != str(tmp):
            raise
        raise write_error(path, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)


_DESCRIPTOR_LINK = re.compile(r"/(dev/(fd|stdout|stderr)|proc/[^/]+/fd)(/|$)")


def writes_through(path: Path) -> bool:
    """Whether a file the user named is written in place rather than replaced by a new one.

    True when, symlinks followed, it exists and is not a regular file (a device such as /dev/null,
    a FIFO, a socket), or when it is reached through a file-descriptor link (/dev/stdout,
    /dev/fd/N as bash's `>(...)` gives, /proc/<pid>/fd/N), whatever the descriptor is open on:
    renaming a new file onto such a path would replace the device node or miss the descriptor.
    """
    text = os.path.abspath(os.path.expanduser(path))
    for _ in range(40):  # the kernel's own limit on a chain of symlinks
        if _DESCRIPTOR_LINK.match(text):
            return True
        if not os.path.islink(text):
            break
        text = os.path.normpath(os.path.join(os.path.dirname(text), os.readlink(text)))
    try:
        mode = os.stat(os.path.expanduser(path)).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode)


def write_text_through(path: Path, text: str) -> None:
    """Write a UTF-8 text file the user named (a clean or rejected list) where the path leads.

    A regular file, or a new one, is replaced atomically; through a symlink, its target is (the
    link stays a link). A device, FIFO or descriptor link (`writes_through`) is opened and written
    in place: /dev/null discards the text, a FIFO or `>(wc -l)` receives it (the call waits for a
    FIFO's reader).

    Raises:
        WriteError: the write failed (e.g. /dev/full: no space), naming `path`.
    """
    path = Path(path).expanduser()
    if not writes_through(path):
        write_text_atomic(Path(os.path.realpath(path)), text)
        return
    try:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        raise write_error(path, exc) from exc


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write `obj` as strict JSON (`to_json`, plus a final newline), atomically."""
    write_text_atomic(path, to_json(obj) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write a UTF-8 text file, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a file of bytes, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_tensors(path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
    """Save a dict of tensors as one safetensors file, atomically."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata or {}))
        except SafetensorError as exc:  # its I/O errors (no space, file too large) are not OSErrors
            raise write_error(path, exc) from exc


def _occupied(folder: Path) -> bool:
    return folder.exists() and (not folder.is_dir() or any(folder.iterdir()))


def replace_folder(new: Path, final: Path) -> None:
    """Rename the folder `new` onto `final`, replacing whatever `final` was (moved aside, then removed).

    If the last rename fails, the previous `final` is put back.
    """
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    had_old = final.exists() or final.is_symlink()
    if had_old:
        os.replace(final, old)
    try:
        os.replace(new, final)
    except BaseException:
        if had_old:
            os.replace(old, final)
        raise
    if not had_old:
        return
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


@contextlib.contextmanager
def atomic_directory(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name next to `out`, then rename it to `out`.

    The folder gets `folder_mode()`. On any error the temporary folder is removed and `out` is
    left as it was.

    Args:
        out: the folder to create.
        overwrite: replace an existing `out` (see `replace_folder`) instead of refusing it.

    Raises:
        DataError: `out` exists and is not an empty folder, and `overwrite` is false.
    """
    out = Path(out)
    if not overwrite and _occupied(out):
        raise DataError(f"{out}: already exists and is not an empty folder; choose a new output path "
                        f"or remove it first")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as exc:
        raise write_error(exc.filename or out.parent, exc) from exc
    try:
        os.chmod(tmp, folder_mode())
        yield tmp
        _move_into_place(tmp, out, overwrite)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.filename is not None or isinstance(exc, WriteError):
            raise
        raise write_error(out, exc) from exc  # e.g. a copy that ran out of space: name the folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if overwrite:
        replace_folder(tmp, out)
        return
    try:
        os.rename(tmp, out)  # replaces `out` only if it is an empty folder
    except OSError as exc:
        raise DataError(f"{out}: could not move the finished folder into place ({exc}); "
                        f"make sure nothing else writes there and retry") from exc


def load_tensors_with_metadata(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Every tensor of a safetensors file and its string metadata (checkpoints, extraction shards)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, metadata


def load_tensors(path: Path, names: list[str] | None = None) -> dict[str, Any]:
    """Load tensors (all, or `names`) from a safetensors file onto the CPU."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys()) if names is None else names
            return {k: f.get_tensor(k) for k in keys}
    except (OSError, KeyError, ValueError, SafetensorError) as exc:
        raise DataError(f"{path}: unreadable artifact file ({exc}); rerun the stage with --force") from exc


def tensor_specs(tensors: Mapping[str, Any]) -> dict[str, dict]:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()}


@dataclass(frozen=True)
class Artifact:
    """A completed stage folder and its manifest."""

    path: Path
    manifest: dict

    @property
    def key(self) -> str:
        return self.manifest["key"]

    def file(self, name: str) -> Path:
        return self.path / name

    def tensors(self, file: str, names: list[str] | None = None) -> dict[str, Any]:
        return load_tensors(self.path / file, names)

    def text(self, file: str) -> str:
        """A text file of the artifact (clean.txt, scores.csv, ...)."""
        return (self.path / file).read_text(encoding="utf-8")

    def sharded_tensors(self, names: list[str] | None = None) -> dict[str, Any]:
        """The shards listed in the manifest, concatenated in order: {"memory": (N, P, D), "group0": (N, L, C0),
        ...} as stored (float16); the per-shard "index" rows are left out."""
        import torch

        parts: dict[str, list] = {}
        for shard in self.manifest["shards"]:
            if shard["rows"] == 0:
                continue
            for k, v in load_tensors(self.path / shard["file"], names).items():
                parts.setdefault(k, []).append(v)
        return {k: torch.cat(v) for k, v in parts.items() if k != "index"}

    def rows(self, name: str = "memory") -> "ShardedRows":
        """Tensor `name` of every image, read from the shards on demand (see `ShardedRows`)."""
        shards = [shard for shard in self.manifest["shards"] if shard["rows"]]
        firsts = list(itertools.accumulate((shard["rows"] for shard in shards), initial=0))
        spans = tuple((str(self.path / shard["file"]), first, shard["rows"]) for shard, first in zip(shards, firsts))
        row_shape = self.manifest["tensors"][shards[0]["file"]][name]["shape"][1:] if shards else [0, 0]
        return ShardedRows(name, spans, tuple(range(firsts[-1])), (firsts[-1], *row_shape))


@dataclass(frozen=True)
class ShardedRows:
    """Rows of one tensor of a sharded artifact, read from its files only when asked for.

    Row i is image `positions[i]` of the artifact (its order in the manifest's image table).
    Pickles as a few paths and numbers, so that a worker on another node of a cluster reads only
    the rows it needs from storage both can see.

    Attributes:
        name: the tensor ("memory": (P, D) per image).
        spans: (file, first position, rows) of each non-empty shard, in order.
        positions: artifact positions of these rows.
        shape: (len(positions), *row shape).
    """

    name: str
    spans: tuple[tuple[str, int, int], ...]
    positions: tuple[int, ...]
    shape: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.positions)

    def subset(self, rows) -> "ShardedRows":
        """The rows `rows` (indices into this one) as a new `ShardedRows`."""
        picked = tuple(self.positions[int(i)] for i in rows)
        return ShardedRows(self.name, self.spans, picked, (len(picked), *self.shape[1:]))

    def read(self, start: int = 0, stop: int | None = None):
        """Rows start..stop-1 as one tensor of the stored dtype; each shard is opened once and only the
        range of its rows that is needed is read."""
        import torch
        from safetensors import SafetensorError, safe_open

        wanted = self.positions[start:stop]
        if not wanted:
            return torch.empty(0, *self.shape[1:])
        parts = []
        for path, first, count, rows in self._by_shard(wanted):
            try:
                with safe_open(path, framework="pt", device="cpu") as f:
                    lo, hi = min(rows) - first, max(rows) - first + 1
                    block = f.get_slice(self.name)[lo:hi]
            except (OSError, KeyError, ValueError, SafetensorError) as exc:
                raise DataError(f"{path}: unreadable artifact file ({exc}); rerun the stage with --force") from exc
            contiguous = rows == list(range(first + lo, first + hi))
            parts.append(block if contiguous else block[torch.tensor([r - first - lo for r in rows])])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def load(self):
        """Every row, as one tensor."""
        return self.read(0, None)

    def _by_shard(self, wanted: tuple[int, ...]) -> list[tuple[str, int, int, list[int]]]:
        """Consecutive runs of `wanted` that fall in the same shard, in order."""
        import bisect

        firsts = [first for _, first, _ in self.spans]
        runs: list[tuple[str, int, int, list[int]]] = []
        for position in wanted:
            shard = bisect.bisect_right(firsts, position) - 1
            path, first, count = self.spans[shard]
            if not 0 <= position - first < count:
                raise IndexError(f"row {position} is outside the artifact's {firsts[-1] + self.spans[-1][2]} rows")
            if runs and runs[-1][0] == path:
                runs[-1][3].append(position)
            else:
                runs.append((path, first, count, [position]))
        return runs


LATEST = "LATEST"

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
    (for tools and tests); `medsclean.workdir.runs` keeps the per-dataset pointers. A work folder of the
    0.1.0 layout (one artifact per stage folder) is moved into this layout when opened.
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
        self._adopt_flat_layout()

    def _adopt_flat_layout(self) -> None:
        """Move 0.1.0 artifacts (`<work>/<stage>/manifest.json`) to `<work>/<stage>/<key>/`."""
        for manifest_path in self.work.glob(f"*/{MANIFEST}"):
            manifest = _read_manifest(manifest_path)
            stage_dir = manifest_path.parent
            if manifest is None or manifest.get("stage") != stage_dir.name:
                continue
            aside = self.work / f".adopt-{stage_dir.name}-{uuid.uuid4().hex[:8]}"
            os.replace(stage_dir, aside)
            stage_dir.mkdir()
            os.replace(aside, stage_dir / str(manifest["key"]))
            write_text_atomic(stage_dir / LATEST, f"{manifest['key']}\n")

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
        manifest = _read_manifest(path / MANIFEST)
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


def safetensors_damage(path: Path, specs: Mapping[str, Any] | None = None) -> str | None:
    """Why a safetensors file cannot be what `specs` ({name: {"shape": [...]}}) says, or None.

    Reads only the header: its length, its JSON, the recorded names and shapes, and that the file is
    exactly as long as the header's data offsets say (a truncated or padded file is damaged)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return "shorter than a safetensors header"
            length = int.from_bytes(head, "little")
            if length <= 0 or 8 + length > size:
                return "its header is cut off"
            header = json.loads(handle.read(length).decode("utf-8"))
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as exc:
        return f"unreadable header ({type(exc).__name__})"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (TypeError, KeyError, ValueError, IndexError):
        return "its header has no valid data offsets"
    if 8 + length + end != size:
        return f"{size} bytes where its header describes {8 + length + end} (truncated or overwritten)"
    for name, spec in (specs or {}).items():
        if name not in tensors:
            return f"tensor {name!r} is missing"
        if list(tensors[name].get("shape", [])) != list(spec.get("shape", [])):
            return f"tensor {name!r} has shape {tensors[name].get('shape')}, not {spec.get('shape')}"
    return None


def _read_manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    return manifest


def folder_bytes(path: Path) -> int:
    """Bytes of the regular files under `path` (symlinks not followed)."""
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


IMAGE_CACHE = "image-features"
ENCODER_RECORD = "encoder.json"
STALE_TEMP_SECONDS = 3600.0


class ImageCache:
    """Tensors of single images, one safetensors file per image content: `<root>/<hh>/<sha256>.safetensors`.

    `root` is `<work>/image-features/<key>/`, `key` naming the encoder set-up that made the tensors
    and `hh` the first two hex digits of the file's SHA-256 (at most 256 entries per folder level).
    Entries are written atomically, so one that exists is whole. `encoder.json` beside them
    records the encoder's description.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def key(self) -> str:
        return self.root.name

    def entry(self, sha256: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}.safetensors"

    def has(self, sha256: str | None) -> bool:
        return sha256 is not None and safetensors_damage(self.entry(sha256)) is None

    def write(self, sha256: str, tensors: Mapping[str, Any]) -> None:
        save_tensors(self.entry(sha256), tensors)

    def read(self, sha256: str) -> dict[str, Any]:
        """The tensors of one entry.

        Raises:
            DataError: the entry is missing or unreadable.
        """
        return load_tensors(self.entry(sha256))

    def record(self) -> dict | None:
        """The encoder description written with the entries, or None."""
        try:
            return json.loads((self.root / ENCODER_RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def write_record(self, record: dict) -> None:
        write_json_atomic(self.root / ENCODER_RECORD, record)

    def entries(self) -> list[Path]:
        """The entry files, sorted."""
        return sorted(self.root.glob("??/*.safetensors"))

    def remove_except(self, keep: set[str]) -> tuple[int, int]:
        """Delete the entries whose SHA-256 is not in `keep`, temporary files left for over an hour
        by killed writers, and the folders left empty (the whole cache when nothing is kept).

        Returns:
            (files removed, bytes freed).
        """
        removed = freed = 0
        doomed = [p for p in self.entries() if p.stem not in keep]
        cutoff = time.time() - STALE_TEMP_SECONDS
        doomed += [p for p in self.root.glob("??/.*.tmp-*") if _mtime(p) < cutoff]
        for path in doomed:
            with contextlib.suppress(FileNotFoundError):
                size = path.stat().st_size
                path.unlink()
                removed, freed = removed + 1, freed + size
        self._remove_empty_folders()
        return removed, freed

    def _remove_empty_folders(self) -> None:
        for folder in self.root.glob("??"):
            with contextlib.suppress(OSError):
                folder.rmdir()
        if not any(p.is_dir() for p in self.root.glob("??")):
            (self.root / ENCODER_RECORD).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.root.rmdir()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return math.inf
