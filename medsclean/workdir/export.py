"""`--export DIR`: the cleaned dataset as a tree anomaly-detection trainers read directly.

    DIR/<class>/train/good/<name>     the kept images, and nothing else in DIR/<class>/ (the MVTec AD
                                      layout: anomalib's `MVTecAD` and `Folder` load it as it is)
    DIR/_rejected/<class>/<name>      the rejected ones, outside every class folder
    DIR/clean.txt, DIR/rejected.txt   the lists, relative to DIR (`bottle/train/good/x.png`), so they
                                      stay true when DIR is moved
    DIR/medsclean-export.json         the run, the counts, the link modes and each image's source

Each file is a hard link to the original where the file system allows it (same device, and the
link succeeds), else a copy (`link="hardlink"`, the default); `link="copy"` always copies;
`link="symlink"` makes absolute symbolic links, which anomalib's MVTecAD refuses (it drops files
that resolve outside the dataset root). The image folder is never written; DIR appears whole or
not at all. `<name>` is the image's path below its class folder (and below `train/good/` for an
MVTec-layout input) with `/` turned into `__`; a class's folder is its name with `/` turned into
`__`. If a class's folder would be `_rejected`, the rejected images go to `_rejected_` instead
(then `_rejected__`, ...): the manifest's "rejected_dir" and the lists always say where.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from medsclean.choices import Link
from medsclean.errors import ConfigError
from medsclean.workdir.atomic import atomic_directory, to_json, write_text_atomic

EXPORT_SCHEMA = "medsclean.export/2"
MANIFEST = "medsclean-export.json"
REJECTED_DIR = "_rejected"
LINK_MODES = Link.values()


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


def rejected_folder(classes: Sequence[str]) -> str:
    """The folder of the rejected images: `_rejected`, with `_` appended while a class's folder has that name."""
    taken = {class_folder(c) for c in classes}
    name = REJECTED_DIR
    while name in taken:
        name += "_"
    return name


def link_mode(link: str | None, copy: bool = False) -> str:
    """The link mode of an export from `link` and the deprecated `copy` flag (`copy` = `link="copy"`)."""
    if link is not None and str(link) not in LINK_MODES:
        raise ConfigError("link", f"link {link!r} is not one of {', '.join(LINK_MODES)}")
    if copy and link is not None and str(link) != "copy":
        raise ConfigError(("copy", "link"), f"copy means link copy, which contradicts link {link}; drop copy")
    return "copy" if copy else str(link or "hardlink")


def tree_paths(rows: Sequence[dict], keep: Sequence[bool]) -> tuple[list[str], str]:
    """Each row's path inside the export tree (as the lists give it) and the rejected images' folder.

    Raises:
        ConfigError: two images (or two classes) would get the same path in the tree.
    """
    classes = sorted({row["class"] for row in rows})
    folders: dict[str, str] = {}
    for cls in classes:
        other = folders.setdefault(class_folder(cls), cls)
        if other != cls:
            raise ConfigError("export", f"export: classes {other!r} and {cls!r} would share the folder "
                              f"{class_folder(cls)}/; rename one of their folders in the image folder")
    rejected = rejected_folder(classes)
    paths, seen = [], {}
    for row, kept in zip(rows, keep):
        folder = f"{class_folder(row['class'])}/train/good" if kept else f"{rejected}/{class_folder(row['class'])}"
        path = f"{folder}/{flat_name(row['path'], row['class'])}"
        if path in seen:
            raise ConfigError("export", f"export: {seen[path]} and {row['path']} would both be exported as {path}; "
                              f"rename one of them")
        seen[path] = row["path"]
        paths.append(path)
    return paths, rejected


def export_tree(out: Path, root: Path, rows: Sequence[dict], keep: Sequence[bool], *, link: str = "hardlink",
                run: str) -> dict:
    """Write the tree described in the module docstring atomically (the whole folder appears at once).

    Args:
        out: the folder to create; must not exist (or be empty) and must lie outside `root`.
        root: the image folder the rows' paths are relative to.
        rows: the run's image rows ("path", "class"), in input order.
        keep: one flag per row, True for a kept image.
        link: "hardlink" (a copy where linking fails), "symlink" or "copy".
        run: the run key recorded in the manifest.

    Returns:
        The export manifest (also written to `out/medsclean-export.json`).
    """
    out, root, link = Path(out).expanduser().resolve(), Path(root).resolve(), link_mode(link)
    if out == root or root in out.parents:
        raise ConfigError("export", f"export {out} lies inside the image folder {root}; choose a folder outside it")
    paths, rejected = tree_paths(rows, keep)
    counts: dict[str, dict[str, int]] = {}
    modes = dict.fromkeys(LINK_MODES, 0)
    images = []
    with atomic_directory(out) as tmp:
        device = os.stat(tmp).st_dev
        for row, kept, path in zip(rows, keep, paths):
            (tmp / path).parent.mkdir(parents=True, exist_ok=True)
            mode = _place(root / row["path"], tmp / path, link, device)
            modes[mode] += 1
            entry = counts.setdefault(row["class"], {"kept": 0, "rejected": 0})
            entry["kept" if kept else "rejected"] += 1
            images.append({"path": path, "source": str(root / row["path"]), "class": row["class"], "kept": bool(kept),
                           "link": mode})
        write_text_atomic(tmp / "clean.txt", "".join(f"{p}\n" for p, k in zip(paths, keep) if k))
        write_text_atomic(tmp / "rejected.txt", "".join(f"{p}\n" for p, k in zip(paths, keep) if not k))
        manifest = {"schema": EXPORT_SCHEMA, "run": run, "image_folder": str(root), "link": link,
                    "links": {m: n for m, n in modes.items() if n}, "rejected_dir": rejected, "classes": counts,
                    "kept": sum(c["kept"] for c in counts.values()),
                    "rejected": sum(c["rejected"] for c in counts.values()), "images": images}
        write_text_atomic(tmp / MANIFEST, to_json(manifest) + "\n")
    return manifest


_WORDS = {"hardlink": ("hard link", "hard links"), "symlink": ("symbolic link", "symbolic links"),
          "copy": ("copy", "copies")}


def placed(manifest: dict) -> str:
    """How an export's files were placed, in words: "hard links", "40 hard links and 3 copies"."""
    links = manifest["links"]
    if len(links) <= 1:
        return _WORDS[next(iter(links), "copy")][1]
    return " and ".join(f"{n} {_WORDS[mode][n != 1]}" for mode, n in links.items())


def _place(source: Path, target: Path, link: str, device: int) -> str:
    """Put `source` at `target` as `link` asks; returns what was made ("hardlink", "symlink" or "copy")."""
    if link == "symlink":
        target.symlink_to(source.resolve())
        return "symlink"
    if link == "hardlink" and os.stat(source).st_dev == device:
        try:
            os.link(source.resolve(), target)  # a symlinked source: link the image file itself, not the link
            return "hardlink"
        except OSError:  # a file system without hard links, a protected file, too many links: copy it
            pass
    shutil.copy2(source, target)
    return "copy"
