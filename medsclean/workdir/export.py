"""`select --export DIR`: the cleaned dataset as a tree a trainer reads directly.

    DIR/<class>/train/good/<name>     the kept images (MVTec AD layout: anomalib, medsclean, ...)
    DIR/<class>/rejected/<name>       the rejected ones, beside the layout (loaders ignore it)
    DIR/clean.txt, DIR/rejected.txt   the lists, in the user path convention (`stages.outputs.user_paths`)
    DIR/medsclean-export.json         the run it came from and the counts

Files are absolute symlinks to the originals (or copies with `copy=True`); the image folder is
never written. `<name>` is the image's path below its class folder (and below `train/good/` for
an MVTec-layout input) with `/` turned into `__`, so names stay unique in one flat folder.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from medsclean.errors import ConfigError
from medsclean.workdir.atomic import atomic_directory, to_json, write_text_atomic

EXPORT_SCHEMA = "medsclean.export/1"
MANIFEST = "medsclean-export.json"


def flat_name(rel_path: str, cls: str) -> str:
    """The image's name in the exported class folder (see the module docstring)."""
    parts = rel_path.split("/")
    cls_parts = cls.split("/")
    if parts[:len(cls_parts)] == cls_parts and len(parts) > len(cls_parts):
        parts = parts[len(cls_parts):]
    if parts[:2] == ["train", "good"] and len(parts) > 2:
        parts = parts[2:]
    return "__".join(parts)


def class_folder(cls: str) -> str:
    return cls.replace("/", "__")


def export_tree(out: Path, root: Path, rows: Sequence[dict], keep: Sequence[bool], user_paths: Sequence[str], *,
                copy: bool, run: str) -> dict:
    """Write the tree described in the module docstring atomically (the whole folder appears at once).

    Args:
        out: the folder to create; must not exist (or be empty) and must lie outside `root`.
        root: the image folder the rows' paths are relative to.
        rows: the run's image rows ("path", "class"), in input order.
        keep: one flag per row, True for a kept image.
        user_paths: the rows' paths as the user lists show them.
        copy: copy the files instead of symlinking them.
        run: the run key recorded in the manifest.

    Returns:
        The export manifest (also written to `out/medsclean-export.json`).
    """
    out, root = Path(out).expanduser().resolve(), Path(root).resolve()
    if out == root or root in out.parents:
        raise ConfigError("export", f"export {out} lies inside the image folder {root}; choose a folder outside it")
    counts: dict[str, dict[str, int]] = {}
    with atomic_directory(out) as tmp:
        for row, kept in zip(rows, keep):
            sub = "train/good" if kept else "rejected"
            target = tmp / class_folder(row["class"]) / sub / flat_name(row["path"], row["class"])
            target.parent.mkdir(parents=True, exist_ok=True)
            _place(root / row["path"], target, copy)
            entry = counts.setdefault(row["class"], {"kept": 0, "rejected": 0})
            entry["kept" if kept else "rejected"] += 1
        write_text_atomic(tmp / "clean.txt", "".join(f"{p}\n" for p, k in zip(user_paths, keep) if k))
        write_text_atomic(tmp / "rejected.txt", "".join(f"{p}\n" for p, k in zip(user_paths, keep) if not k))
        manifest = {"schema": EXPORT_SCHEMA, "run": run, "images": str(root), "copy": copy, "classes": counts,
                    "kept": sum(c["kept"] for c in counts.values()),
                    "rejected": sum(c["rejected"] for c in counts.values())}
        write_text_atomic(tmp / MANIFEST, to_json(manifest) + "\n")
    return manifest


def _place(source: Path, target: Path, copy: bool) -> None:
    if copy:
        shutil.copy2(source, target)
    else:
        target.symlink_to(source.resolve())
