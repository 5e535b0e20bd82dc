"""What every API call does before any work: the keywords checked against the command's options,
each value against its option's type, every config built from the caller's values alone (so a bad
value fails before torch is imported), every path checked; and, around the call, library parameter
names in errors turned into the caller's option names, the Ray session and the work-folder marks
released at the end.

Imports nothing heavy: the CLI calls these checks before its commands import torch.
"""

from __future__ import annotations

import contextlib
import difflib
import numbers
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from medsclean import choices
from medsclean.api.corrections import CORRECTION_OPTIONS
from medsclean.config import STAGE_CONFIGS, check_self_out
from medsclean.values import check_seed, parse_duration
from medsclean.errors import ConfigError, DataError
from medsclean.options import CLI_ONLY, Given, Opt, command_options, option_for


def given_for(command: str, function: str, options: Mapping[str, Any], **arguments: Any) -> Given:
    """The caller's keywords as a `Given` of `command`'s options, each value checked against its
    option (a choice's value, a number, a bool, an existing path); None means unset.

    Raises:
        ConfigError: a keyword `command` does not take, or a value of the wrong kind (naming it).
    """
    known = {o.name: o for o in command_options(command) if o.name not in CLI_ONLY}
    values: dict[str, Any] = dict(arguments)
    for name, value in options.items():
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; the options are {', '.join(sorted(known))}"
            raise ConfigError(name, f"{function}() has no option {name}{hint}")
        values[name] = None if value is None else checked_value(known[name], value)
    return Given(values)


def checked_value(opt: Opt, value: Any) -> Any:
    """`value` as option `opt` takes it (a choice's string value, a float, a `Path`)."""
    name, kind = opt.name, opt.type
    if isinstance(kind, type) and issubclass(kind, choices.Choice):
        text = value.value if isinstance(value, choices.Choice) else value
        if text not in kind.values():
            raise ConfigError(name, f"{name} must be one of {', '.join(kind.values())}, not {value!r}")
        return text
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, f"{name} must be True or False, not {value!r}")
        return value
    if kind in (int, float):
        wanted = numbers.Integral if kind is int else numbers.Real
        if isinstance(value, bool) or not isinstance(value, wanted):
            raise ConfigError(name, f"{name} must be {'an integer' if kind is int else 'a number'}, not {value!r}")
        return kind(value) if kind is float else value
    if kind is Path and name in CORRECTION_OPTIONS and isinstance(value, (list, tuple)):
        if not all(isinstance(p, (str, os.PathLike)) for p in value):
            raise ConfigError(name, f"{name} must be a file of paths or a list of paths, not {value!r}")
        return tuple(value)
    if kind is Path:
        if not isinstance(value, (str, os.PathLike)):
            raise ConfigError(name, f"{name} must be a path, not {value!r}")
        path = Path(value)
        if opt.path == "dir" and not path.is_dir():
            raise ConfigError(name, f"{name} {value}: no such folder")
        if opt.path == "file" and not path.is_file():
            raise ConfigError(name, f"{name} {value}: no such file")
        return path
    return value


def fields_of(stage: str, values: Mapping[str, Any]) -> dict:
    """The entries of `values` that are fields of `stage`'s config."""
    known = {f.name for f in fields(STAGE_CONFIGS[stage])}
    return {k: v for k, v in values.items() if k in known}


def validate(given: Given) -> None:
    """Build every config from the caller's values alone (defaults for the rest), so that a bad value
    fails before torch is imported; the real configs add the preset later."""
    for stage, cls in STAGE_CONFIGS.items():
        values = fields_of(stage, given.stage(stage))
        if values:
            cls(**({"images": Path(".")} if stage == "data" else {}), **values)
    if given.get("seed") is not None:
        check_seed(given.seed)
    check_self_out(given.get("method", "meds"), bool(given.get("include_self")))
    if given.get("budget") is not None:
        parse_duration(given.budget)
        if given.get("select_iters") is not None or given.get("distill_iters") is not None:
            raise ConfigError(("budget", "iters"), "budget and iters contradict each other (a time limit chooses "
                              "the iteration counts); pass only one", stage="select")


def check_paths(given: Given) -> None:
    """Every path the caller passed, checked before any work: one-line errors naming the option.
    `out` and `rejected_out` are files (the command line keeps `-` for stdout to itself)."""
    for name in ("images", "root"):
        value = given.get(name)
        if value is not None and not Path(value).is_dir():
            raise DataError(f"{value}: no such folder; pass the folder that holds your images")
    if given.get("export") is not None:  # --copy with another --link: refused before any stage runs
        from medsclean.workdir.export import link_mode

        link_mode(given.get("link"), bool(given.get("copy")))
    for param in ("out", "rejected_out"):
        if given.get(param) is not None:
            _check_list_file(param, given.get(param))
    for param, name in (("work", "work"), ("report_dir", "report"), ("metrics_dir", "metrics_dir"),
                        ("export", "export")):
        value = given.get(name)
        if value is None:
            continue
        path = Path(value).expanduser()
        if path.exists() and not path.is_dir():
            raise ConfigError(param, f"{param} {value} is a file; give a folder")
        if param == "export" and path.is_dir() and any(path.iterdir()):
            raise ConfigError(param, f"{param} {value} already exists and is not empty; choose a new folder or "
                              f"remove it first")
        _require_writable(param, value, _writable_ancestor(path.resolve()), must_exist=False)


def _check_list_file(param: str, value) -> None:
    from medsclean.workdir.atomic import writes_through

    path = Path(value).expanduser()
    if path.is_dir():
        raise ConfigError(param, f"{param} {value} is a folder; give a file path, e.g. {path / 'clean.txt'}")
    if writes_through(path):  # a device, FIFO or descriptor: written in place, so it must be writable itself
        if not path.exists():
            raise ConfigError(param, f"{param} {value}: no such file or open descriptor")
        if not os.access(path, os.W_OK):
            raise ConfigError(param, f"{param} {value} is not writable")
        return
    target = Path(os.path.realpath(path))  # through a symlink, the target is replaced: its folder counts
    _require_writable(param, value, target.parent, must_exist=True)


def _writable_ancestor(path: Path) -> Path:
    for folder in (path, *path.parents):
        if folder.exists():
            return folder
    return Path("/")


def _require_writable(param: str, value, folder: Path, *, must_exist: bool) -> None:
    if must_exist and not folder.is_dir():
        raise ConfigError(param, f"{param} {value}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(param, f"{param} {value}: {folder} is not writable")


def with_option_names(exc: ConfigError) -> ConfigError:
    """`exc` naming the caller's options instead of the configs' fields ("ratio" of the score config
    is `bank_ratio`); a message that names none of them gets them in front."""
    names = tuple(option_for(p, exc.stage) for p in exc.params)
    if names == exc.params:
        return exc
    return ConfigError(names[0] if isinstance(exc.param, str) else names, exc.naming(names), stage=exc.stage)


@contextlib.contextmanager
def api_call() -> Iterator[None]:
    """Around one API call: config errors in the caller's names; at the end (also on an error or
    Ctrl-C) the Ray instance the call started is stopped and its work-folder marks are released."""
    try:
        yield
    except ConfigError as exc:
        renamed = with_option_names(exc)
        if renamed is exc:
            raise
        raise renamed from None
    finally:
        release()


def release() -> None:
    """The end of a call: stop the Ray instance it started, give up its marks on the work folder's
    artifacts (which may be removed from then on). Imports nothing: only what was loaded is released."""
    if "medsclean.distributed.session" in sys.modules:
        sys.modules["medsclean.distributed.session"].shutdown()
    if "medsclean.workdir.store" in sys.modules:
        sys.modules["medsclean.workdir.store"].release_uses()
