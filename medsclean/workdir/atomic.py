"""Atomic writing for the whole package: files and folders appear whole or not at all.

Files (`atomic_path` and the writers built on it) are written under a temporary sibling name and
renamed into place; folders (`atomic_directory`) are built under a temporary name and renamed.
Both get the modes a plain `open` or `mkdir` would give under the process's umask (0o666 or
0o777 less the umask). Every JSON file written here is strict JSON (`to_json`): NaN and
infinities become null. A file the user names on the command line (`write_text_through`) may be
a device, a FIFO or a descriptor link, which are written in place.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import shutil
import stat
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medsclean.errors import DataError, WriteError, write_error


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
