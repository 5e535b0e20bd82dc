"""Typer parameters from the option declarations (`medsclean.options`): each `Opt` becomes one
`--flag`, each command takes the groups `options.COMMANDS` names.

Imports nothing heavy: choices are enums validated by click at parse time.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from medsclean.options import COMMANDS, Given, Opt


def parameter(opt: Opt) -> inspect.Parameter:
    """The keyword parameter typer reads `opt` from: its flags, its help with the default read from
    the configs, an existing path when `opt.path` says so; unset is None."""
    shown = opt.default_text()
    text = f"{opt.help} [default: {shown}]" if shown else opt.help
    extra: dict[str, Any] = {}
    if opt.path is not None:
        extra = {"exists": True, "file_okay": opt.path == "file", "dir_okay": opt.path == "dir"}
    if opt.metavar is not None:
        extra["metavar"] = opt.metavar
    option = typer.Option(*(opt.flags or ("--" + opt.name.replace("_", "-"),)), help=text, show_default=False,
                          **extra)
    return inspect.Parameter(opt.name, inspect.Parameter.KEYWORD_ONLY,
                             annotation=Annotated[Optional[opt.type], option], default=None)


def build_command(app: typer.Typer, name: str, body: Callable[[Given], None],
                  arguments: tuple[inspect.Parameter, ...] = ()) -> None:
    """Register `body` as command `name` with the options of `COMMANDS[name]` (each declared once)."""
    params = [*arguments, *(parameter(o) for group in COMMANDS[name] for o in group)]

    def command(**values: Any) -> None:
        body(Given(values))

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = body.__doc__
    command.__name__ = body.__name__
    app.command(name)(command)


def argument(name: str, help_text: str, metavar: str, *, typed: bool = False) -> inspect.Parameter:
    """A required positional path argument; `typed=True` keeps the string as typed (`./images` stays
    `./images`, which a `Path` would shorten to `images`), for the folder the lists are written under."""
    info = typer.Argument(help=help_text, show_default=False, metavar=metavar)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[str if typed else Path, info])


__all__ = ["argument", "build_command", "parameter"]
