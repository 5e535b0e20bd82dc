"""The user's corrections of a cut (`--keep FILE`, `--reject FILE`; `keep=`, `reject=` in Python):
read, each path matched to an image of the folder, before any stage runs.

A correction file lists one path per line in any form a user has: as in clean.txt (the image
folder as typed joined with the image's path), relative to the current folder, relative to the
image folder, or absolute; blank lines and lines starting with `#` are skipped. In Python, `keep=`
and `reject=` take such a file or a list of paths. Imports nothing heavy.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from medsclean.errors import ConfigError

CORRECTION_OPTIONS = ("keep", "reject")
"""The options that carry corrections (a file of paths, or in Python a list of paths)."""


def correction_entries(param: str, value) -> list[tuple[str, str]]:
    """(where, path) of every path `value` names: a file's lines (`FILE:LINE`), or a list's items
    (`param[i]`); blank lines and `#` comments skipped.

    Raises:
        ConfigError: the file cannot be read (naming it).
    """
    if isinstance(value, (list, tuple)):
        return [(f"{param}[{i}]", os.fspath(p).strip()) for i, p in enumerate(value) if os.fspath(p).strip()]
    path = Path(value).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(param, f"{param} {value}: cannot read it ({getattr(exc, 'strerror', None) or exc}); "
                          f"give a text file of image paths, one per line") from None
    return [(f"{value}:{n}", line.strip()) for n, line in enumerate(text.splitlines(), start=1)
            if line.strip() and not line.strip().startswith("#")]


def resolve_corrections(root: Path, rel_paths: Sequence[str], keep=None, reject=None):
    """The `stages.cut.Corrections` that `keep` and `reject` (files or lists of paths, or None) name
    among the images `rel_paths` of the folder `root` (paths relative to it).

    Raises:
        ConfigError: a path that is no image of the folder (naming the file, the line and the path),
            or a path both lists name.
    """
    from medsclean.stages.cut import Corrections

    match = _matcher(Path(root), rel_paths)
    chosen: dict[str, dict[str, str]] = {}
    for param, value in (("keep", keep), ("reject", reject)):
        chosen[param] = {}
        for where, text in ([] if value is None else correction_entries(param, value)):
            rel = match(text)
            if rel is None:
                raise ConfigError(param, f"{param}: {where}: {text} is not an image of {root}; list the images "
                                  f"as clean.txt names them (or relative to the folder, or absolute)")
            chosen[param].setdefault(rel, where)
    both = sorted(set(chosen["keep"]) & set(chosen["reject"]))
    if both:
        rel = both[0]
        raise ConfigError(("keep", "reject"), f"keep ({chosen['keep'][rel]}) and reject ({chosen['reject'][rel]}) "
                          f"both name {rel}; leave it in only one")
    return Corrections(keep=tuple(chosen["keep"]), reject=tuple(chosen["reject"]))


def _matcher(root: Path, rel_paths: Iterable[str]):
    """A function from a path as the user wrote it to the image's path inside `root`, or None.
    Tried in order: absolute, relative to the current folder, relative to `root`; each compared
    as written (normalised) and with links resolved."""
    known: dict[str, str] = {}
    real_root = Path(os.path.realpath(root))
    for rel in rel_paths:
        for base in (root, real_root):
            full = base / rel
            known.setdefault(os.path.normpath(full), rel)
            known.setdefault(os.path.realpath(full), rel)

    def match(text: str) -> str | None:
        path = Path(text).expanduser()
        candidates = [path] if path.is_absolute() else [Path.cwd() / path, root / path]
        for candidate in candidates:
            for form in (os.path.normpath(candidate), os.path.realpath(candidate)):
                if form in known:
                    return known[form]
        return None

    return match


__all__ = ["CORRECTION_OPTIONS", "correction_entries", "resolve_corrections"]
