"""The on-disk artifact format: a folder per (stage, key) with `manifest.json` plus safetensors files.

This is the one owner of the format: the manifest's name and format tag, the `LATEST` pointer's name, cache-key digests,
reading and writing tensor files, checking a tensor file's header against the manifest
(`safetensors_damage`), and reading a completed folder (`Artifact`, `ShardedRows` for rows read
on demand). Where the folders live and who may write them is `medsclean.workdir.store.Store`'s.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import platform
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsclean.errors import DataError, write_error
from medsclean.workdir.atomic import atomic_path


FORMAT = "medsclean-artifact/1"
MANIFEST = "manifest.json"
LATEST = "LATEST"  # in a stage folder: the key of the artifact the stage wrote last


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)


def digest(obj: Any) -> str:
    """SHA-256 (hex, 16 characters) of the canonical JSON form of `obj`."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:16]


def versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour shapes an artifact."""
    from medsclean.version import __version__

    out = {"medsclean": __version__, "python": platform.python_version()}
    for mod in ("torch", "timm", "numpy", "safetensors", "faiss"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = str(getattr(m, "__version__", "?"))
    return out


HASH_CHUNK_BYTES = 1 << 20


def file_sha256(path: Path, chunk_bytes: int = HASH_CHUNK_BYTES) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks of `chunk_bytes` (1 MiB)."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def save_tensors(path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
    """Save a dict of tensors as one safetensors file, atomically."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata or {}))
        except SafetensorError as exc:  # its I/O errors (no space, file too large) are not OSErrors
            raise write_error(path, exc) from exc


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


def read_manifest(path: Path) -> dict | None:
    """The manifest at `path` when it is a JSON object of this format, else None."""
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
