"""The command line's conventions: one meaning per flag, choices checked at parse time, the
config errors mapped to flags, `python -m medsclean`, Ctrl-C, strict JSON with a schema."""

import json
import subprocess
import sys
import time
from dataclasses import fields

import click
import pytest
import typer
from typer.core import TyperOption
from typer.testing import CliRunner

from medsclean import options as cli_options
from medsclean.cli import app
from medsclean.cli.output import emit
from medsclean.config import STAGE_CONFIGS


def _commands():
    group = typer.main.get_command(app)
    return {name: group.commands[name] for name in group.commands}


def _flags(command: click.Command):
    for param in command.params:
        if isinstance(param, TyperOption):  # typer's own click: a click.Option check would match nothing
            for flag in (*param.opts, *param.secondary_opts):
                yield flag, param


def test_no_flag_name_has_two_meanings():
    seen: dict[str, tuple[str, str, str]] = {}
    for cmd_name, command in _commands().items():
        for flag, param in _flags(command):
            meaning = (param.name, param.help, repr(param.type_descriptor.annotation))
            if flag in seen:
                assert seen[flag][1:] == meaning, f"{flag} means two things ({seen[flag][0]} and {cmd_name})"
            seen[flag] = (cmd_name, *meaning)
    # the flags that used to mean two things are gone
    for retired in ("--k", "--ratio", "--iters", "--size"):
        assert retired not in seen


def test_every_command_that_runs_a_stage_takes_its_options():
    commands = {name: {p.name for p in c.params} for name, c in _commands().items()}
    stage_opts = {group: {o.name for o in getattr(cli_options, group)}
                  for group in ("DATA", "EXTRACT", "SCORE", "DISTILL", "SELECT")}
    runs = {"extract": ["DATA", "EXTRACT"], "score": ["DATA", "EXTRACT", "SCORE"],
            "distill": ["DATA", "EXTRACT", "SCORE", "DISTILL"],
            "select": ["DATA", "EXTRACT", "SCORE", "DISTILL", "SELECT"],
            "eval": ["DATA", "EXTRACT", "SCORE", "DISTILL", "SELECT"]}
    for name, groups in runs.items():
        for group in groups:
            assert stage_opts[group] <= commands[name], (name, group, stage_opts[group] - commands[name])


def test_options_default_to_unset_and_target_real_config_fields():
    for command in _commands().values():
        for param in command.params:
            if isinstance(param, TyperOption):
                assert param.default is None, f"{param.opts[0]} restates a default"
    for opt in cli_options.ALL_OPTS:
        stage, name = opt.target
        if stage in STAGE_CONFIGS and stage != "eval":
            assert name in {f.name for f in fields(STAGE_CONFIGS[stage])}, opt


def _help_text(output: str) -> str:
    """`--help` as one line of words: the panels' borders out, wrapped lines joined."""
    return " ".join(output.replace("│", " ").split())


def test_help_shows_the_preset_defaults_read_from_the_configs():
    res = CliRunner().invoke(app, ["select", "--help"], terminal_width=200)
    text = _help_text(res.output)
    assert res.exit_code == 0
    assert "--distill-iters INTEGER" in text or "--distill-iters <int>" in text
    assert "[default: 600 with --preset cpu, 10000 with --preset paper]" in text
    assert "<meds|memory|knn|iterative>" in text or "[meds|memory|knn|iterative]" in text


def _panels(output: str) -> tuple[list[str], dict[str, str]]:
    """The panel titles of a `--help`, in order, and the panel each option flag is listed under."""
    import re

    titles, under, current = [], {}, None
    for line in output.splitlines():
        if (title := re.match(r"╭─ (.+?) ─", line)) is not None:
            current = title.group(1)
            titles.append(current)
        elif (flag := re.match(r"│ (?:\* +)?(--[\w-]+)", line)) is not None:
            under[flag.group(1)] = current
    return titles, under


SELECT_PANELS = {  # by hand, from the README's groups
    "Run": ["--work", "--preset", "--device", "--seed", "--json", "--no-wait", "--quiet", "--force"],
    "Outputs": ["--out", "--rejected", "--report", "--export"],
    "Step 3 and the cut": ["--method", "--select-iters", "--mad-k", "--cut", "--final-score", "--cut-k",
                           "--reject-fraction", "--threshold", "--budget"],
    "Data": ["--layout", "--split", "--masks", "--class-from", "--strict"],
    "Encoder": ["--backbone", "--stages", "--weights", "--random-init", "--resize", "--crop", "--batch-size",
                "--num-workers"],
    "Step 1": ["--banks", "--bank-ratio", "--knn", "--with-replacement", "--per-class", "--include-self", "--engine",
               "--coreset", "--max-memory", "--aggregate", "--min-bank"],
    "Step 2": ["--distill-iters", "--loss", "--width", "--depth", "--heads", "--token-pool", "--lr"],
    "Executor": ["--executor", "--ray-address", "--ray-workers", "--train-workers"],
}


def test_select_help_lists_its_options_in_panels_the_most_used_first():
    res = CliRunner().invoke(app, ["select", "--help"], terminal_width=160)
    assert res.exit_code == 0, res.output
    titles, under = _panels(res.output)
    assert [t for t in titles if t in SELECT_PANELS] == list(SELECT_PANELS)  # in this order
    for panel, flags in SELECT_PANELS.items():
        for flag in flags:
            assert under.get(flag) == panel, (flag, under.get(flag), panel)
    declared = {o.flag: o.panel or "Options" for o in cli_options.command_options("select")}
    assert {flag: under.get(flag) for flag in declared} == declared  # every option, one panel each
    assert titles[:2] == ["Arguments", "Options"] and under["--help"] == "Options"


@pytest.mark.parametrize("command", ["select", "eval", "runs", "demo", "make-noisy", "extract"])
def test_every_help_text_is_shown_as_written(command):
    """Help is drawn with rich markup: a text with [brackets] (`[default: ...]`, `cuda[:N]`,
    `medsclean[ray]`) must be shown, not read as a markup tag and dropped."""
    res = CliRunner().invoke(app, [command, "--help"], terminal_width=400)
    assert res.exit_code == 0, res.output
    text = _help_text(res.output)
    for opt in cli_options.command_options(command):
        shown = opt.default_text()
        expected = " ".join((f"{opt.help} [default: {shown}]" if shown else opt.help).split())
        assert expected in text, (opt.name, expected)
    names = {o.name for o in cli_options.command_options(command)}
    assert ("auto, cpu or cuda[:N]." in text) == ("device" in names)
    assert ("pip install 'medsclean[ray]'" in text) == ("executor" in names)


@pytest.mark.parametrize("args", [["select", ".", "--method", "bogus"], ["score", ".", "--engine", "bogus"],
                                  ["eval", ".", "--model", "bogus"], ["select", ".", "--cut", "nope"]])
def test_an_invalid_choice_fails_fast_with_exit_2_and_lists_the_choices(args):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "medsclean", *args], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2
    assert "is not one of" in proc.stderr
    assert elapsed < 2.0  # parse-time validation, no torch: about 0.2 s here; generous for loaded CI machines


def test_choice_validation_imports_no_torch():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom medsclean.cli import app\n"
            "r = CliRunner().invoke(app, ['select', '.', '--method', 'bogus'])\n"
            "assert r.exit_code == 2, r.output\nassert 'torch' not in sys.modules, 'torch was imported'\n"
            "r = CliRunner().invoke(app, ['select', '.', '--bank-ratio', '2'])\n"
            "assert r.exit_code == 2, r.output\nassert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_python_dash_m_medsclean_help():
    proc = subprocess.run([sys.executable, "-m", "medsclean", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "Usage: medsclean" in proc.stdout and "select" in proc.stdout
    assert "--install-completion" in proc.stdout  # shell completion is on


@pytest.mark.parametrize("args,expected", [
    (["select", ".", "--bank-ratio", "2"], "error: --bank-ratio must be in (0, 1], not 2.0"),
    (["select", ".", "--distill-iters", "0"], "error: --distill-iters must be at least 1, not 0"),
    (["select", ".", "--depth", "0"], "error: --depth must be at least 1, not 0"),
    (["extract", ".", "--batch-size", "0"], "error: --batch-size must be at least 1, not 0"),
    (["extract", ".", "--num-workers", "-1"], "error: --num-workers must be 0 or more, not -1"),
    (["select", ".", "--knn", "0"], "error: --knn must be at least 1, not 0"),
    (["select", ".", "--mad-k", "-1"], "error: --mad-k must be 0 or more, not -1.0"),
    (["select", ".", "--budget", "soon"], "error: --budget must be a positive duration"),
    (["eval", ".", "--kernel", "4"], "error: --kernel must be odd and positive, not 4"),
    (["extract", ".", "--stages", "16,8"], "error: --stages must be two increasing strides that are powers of 2"),
    (["extract", ".", "--device", "tpu"], "error: --device must be auto, cpu or cuda[:N], not 'tpu'"),
    (["select", ".", "--seed", "-1"], "error: --seed must be an integer from 0 to 2147483647, not -1"),
    (["select", ".", "--seed", str(2**64)], f"error: --seed must be an integer from 0 to 2147483647, not {2**64}"),
    (["make-noisy", ".", "out", "--seed", "-3"], "error: --seed must be an integer from 0 to 2147483647, not -3"),
    (["select", ".", "--width", "64", "--heads", "3"], "error: --heads 3 must divide --width 64; try --heads 2"),
    (["select", ".", "--out", "-", "--rejected", "-"], "error: --out and --rejected both write to stdout"),
])
def test_config_errors_name_the_flag_and_exit_2(args, expected):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2
    assert res.output.strip().startswith(expected), res.output
    assert len(res.output.strip().splitlines()) == 1


def test_library_errors_name_parameters_not_flags():
    from medsclean.config import ScoreConfig
    from medsclean.errors import ConfigError

    with pytest.raises(ValueError, match="^ratio must be in") as exc:
        ScoreConfig(ratio=0)
    assert isinstance(exc.value, ConfigError) and exc.value.params == ("ratio",)
    assert "--" not in str(exc.value)


def test_ctrl_c_prints_what_was_kept_and_exits_130(tmp_path, monkeypatch):
    (tmp_path / "work" / "extract").mkdir(parents=True)
    (tmp_path / "work" / "extract" / "LATEST").write_text("0123\n")

    def interrupted(run, **kwargs):
        raise KeyboardInterrupt

    from medsclean import pipeline

    monkeypatch.setattr(pipeline, "extract_stage", interrupted)
    res = CliRunner().invoke(app, ["extract", str(tmp_path), "--work", str(tmp_path / "work"), "--device", "cpu"])
    assert res.exit_code == 130
    assert "interrupted: kept in" in res.output and "extract" in res.output
    assert "rerun the same command to resume" in res.output


def test_json_output_is_strict_and_versioned(capsys):
    emit("select", {"tau": {"a": float("nan")}, "kept": 3}, True, "")
    text = capsys.readouterr().out

    def refuse(constant):
        raise AssertionError(f"non-JSON constant {constant}")

    payload = json.loads(text, parse_constant=refuse)
    assert payload["schema"] == "medsclean.select/1"
    assert payload["tau"]["a"] is None and payload["kept"] == 3


def test_engine_faiss_without_faiss_is_refused_before_any_work(tmp_path, monkeypatch):
    from medsclean import config

    real = config.installed
    monkeypatch.setattr(config, "installed", lambda module: module != "faiss" and real(module))
    res = CliRunner().invoke(app, ["score", str(tmp_path), "--engine", "faiss"])
    assert res.exit_code == 2
    assert res.output.startswith("error: --engine faiss needs the faiss package")
    assert CliRunner().invoke(app, ["score", str(tmp_path), "--engine", "exact", "--banks", "0"]).exit_code == 2
