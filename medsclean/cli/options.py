"""Typer parameters from the option declarations (`medsclean.options`): each `Opt` becomes one
`--flag`, each command takes the groups `options.COMMANDS` names, and `--help` lists them in one
panel per group (`Opt.panel`), the panels in `options.PANELS` order.

Imports nothing heavy: choices are enums validated by click at parse time; rich loads only to print help.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from typer.core import TyperCommand

from medsclean.options import COMMANDS, PANELS, Given, Opt


class PanelCommand(TyperCommand):
    """A command whose `--help` shows its options in rich panels.

    The app keeps `rich_markup_mode=None`, so that usage errors stay click's plain lines; only the
    help of a command is drawn with rich, its texts escaped (`_escape`) so that none reads as markup."""

    def format_help(self, ctx, formatter) -> None:
        from typer import rich_utils

        for param in self.get_params(ctx):
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""  # a flag takes no value: no "<bool>" next to it
        width = rich_utils.MAX_WIDTH
        rich_utils.MAX_WIDTH = ctx.terminal_width or width  # a width the caller set (click's terminal_width)
        try:
            rich_utils.rich_format_help(obj=self, ctx=ctx, markup_mode="rich")
        finally:
            rich_utils.MAX_WIDTH = width


def _escape(text: str) -> str:
    """`text` with every `[...]` that rich would read as a markup tag escaped (as `rich.markup.escape`,
    without importing rich): `[default: 8]` and `medsclean[ray]` are shown as written."""
    return re.sub(r"(\\*)(\[[a-z#/@][^[]*?])", lambda m: m.group(1) * 2 + "\\" + m.group(2), text)


def parameter(opt: Opt) -> inspect.Parameter:
    """The keyword parameter typer reads `opt` from: its flags, its help with the default read from
    the configs, an existing path when `opt.path` says so; unset is None."""
    shown = opt.default_text()
    text = _escape(f"{opt.help} [default: {shown}]" if shown else opt.help)
    extra: dict[str, Any] = {}
    if opt.path is not None:
        extra = {"exists": True, "file_okay": opt.path == "file", "dir_okay": opt.path == "dir"}
    if opt.metavar is not None:
        extra["metavar"] = opt.metavar
    if opt.panel:
        extra["rich_help_panel"] = opt.panel
    option = typer.Option(*(opt.flags or ("--" + opt.name.replace("_", "-"),)), help=text, show_default=False,
                          **extra)
    return inspect.Parameter(opt.name, inspect.Parameter.KEYWORD_ONLY,
                             annotation=Annotated[Optional[opt.type], option], default=None)


def build_command(app: typer.Typer, name: str, body: Callable[[Given], None],
                  arguments: tuple[inspect.Parameter, ...] = ()) -> None:
    """Register `body` as command `name` with the options of `COMMANDS[name]` (each declared once),
    ordered by panel (`panel_rank`) and within a panel as declared."""
    options = sorted((o for group in COMMANDS[name] for o in group), key=lambda o: panel_rank(o.panel))
    params = [*arguments, *(parameter(o) for o in options)]

    def command(**values: Any) -> None:
        body(Given(values))

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = _escape(body.__doc__ or "")
    command.__name__ = body.__name__
    app.command(name, cls=PanelCommand)(command)


def panel_rank(panel: str) -> int:
    """Where `panel` comes in `--help`: no panel (typer's "Options", with --help) first, then `PANELS`'
    order, then any other panel."""
    if not panel:
        return -1
    return PANELS.index(panel) if panel in PANELS else len(PANELS)


def argument(name: str, help_text: str, metavar: str, *, typed: bool = False) -> inspect.Parameter:
    """A required positional path argument; `typed=True` keeps the string as typed (`./images` stays
    `./images`, which a `Path` would shorten to `images`), for the folder the lists are written under."""
    info = typer.Argument(help=help_text, show_default=False, metavar=metavar)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[str if typed else Path, info])


__all__ = ["PanelCommand", "argument", "build_command", "panel_rank", "parameter"]
