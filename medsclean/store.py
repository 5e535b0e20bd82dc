"""The on-disk artifact format: one folder per stage with `manifest.json` plus safetensors files.

This is the only module that reads or writes artifacts. A stage folder is written under a
temporary name and renamed into place only once complete, so a folder that has a manifest is
always whole. Work in progress (shards of an interrupted extraction, training checkpoints) lives
in `<work>/.partial/<stage>-<key>/` and is resumed only by a run with the same key.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError, UsageError

FORMAT = "medsclean-artifact/1"
MANIFEST = "manifest.json"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)


def digest(obj: Any) -> str:
    """SHA-256 (hex, 16 characters) of the canonical JSON form of `obj`."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:16]


def versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour shapes an artifact."""
    from . import __version__

    out = {"medsclean": __version__, "python": platform.python_version()}
    for mod in ("torch", "timm", "numpy", "safetensors", "faiss"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = str(getattr(m, "__version__", "?"))
    return out


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file so that readers see the old or the new content, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_tensors(path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
    """Save a dict of tensors as one safetensors file, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata or {}))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


class Store:
    """A work folder holding one artifact folder per stage."""

    def __init__(self, work: Path, images_root: Path | None = None):
        self.work = Path(work).expanduser().resolve()
        if images_root is not None:
            images_root = Path(images_root).resolve()
            if self.work == images_root or images_root in self.work.parents:
                raise UsageError(f"--work {self.work} lies inside the image folder {images_root}; "
                                 f"choose a work folder outside it (the default is ./medsclean-work)")
        self.work.mkdir(parents=True, exist_ok=True)

    def stage_path(self, stage: str) -> Path:
        return self.work / stage

    def load(self, stage: str) -> Artifact | None:
        """The completed artifact of `stage`, or None when there is none."""
        path = self.stage_path(stage)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            return None
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        if manifest.get("format") != FORMAT:
            return None
        return Artifact(path=path, manifest=manifest)

    def cached(self, stage: str, key: str) -> Artifact | None:
        """The artifact of `stage` if it was made from exactly the inputs summarised by `key`."""
        art = self.load(stage)
        return art if art is not None and art.key == key else None

    def partial_dir(self, stage: str, key: str) -> Path:
        """A folder for resumable work in progress of one (stage, key); other keys' leftovers are removed."""
        base = self.work / ".partial"
        base.mkdir(parents=True, exist_ok=True)
        for old in base.glob(f"{stage}-*"):
            if old.name != f"{stage}-{key}":
                shutil.rmtree(old, ignore_errors=True)
        path = base / f"{stage}-{key}"
        path.mkdir(exist_ok=True)
        return path

    def commit(self, stage: str, key: str, files_dir: Path, manifest: dict) -> Artifact:
        """Turn a folder of finished files into the stage's artifact, atomically.

        `files_dir` is renamed to the stage folder after `manifest.json` is written into it;
        a previous artifact of the stage is replaced.
        """
        manifest = {"format": FORMAT, "stage": stage, "key": key,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions(), **manifest}
        write_json_atomic(files_dir / MANIFEST, manifest)
        final = self.stage_path(stage)
        trash = self.work / f".trash-{stage}-{uuid.uuid4().hex[:8]}"
        if final.exists():
            os.replace(final, trash)
        os.replace(files_dir, final)
        shutil.rmtree(trash, ignore_errors=True)
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
            return self.commit(stage, key, staging, {**manifest, "tensors": specs})
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
