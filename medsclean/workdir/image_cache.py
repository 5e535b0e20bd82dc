"""The per-image feature cache: `<work>/image-features/<encoder key>/<hh>/<sha256>.safetensors`.

The features stage is assembled from these entries; an entry is written atomically, so one that
exists is whole.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medsclean.workdir.artifacts import load_tensors, safetensors_damage, save_tensors
from medsclean.workdir.atomic import write_json_atomic


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
