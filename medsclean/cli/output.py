"""What the commands print on stdout: strict JSON with a schema version, or rich tables for people.

Progress and log lines are not here: they go to stderr through the library's reporter (`medsclean.ui`).
"""

from __future__ import annotations

import typer


def emit(name: str, payload: dict, as_json: bool | None, text: str) -> None:
    """The command's result on stdout: strict JSON with a schema version, or `text`."""
    if as_json:
        from medsclean.workdir.atomic import to_json

        typer.echo(to_json({"schema": f"medsclean.{name}/1", **payload}))
    elif text:
        typer.echo(text)


def emit_metrics(name: str, payload: dict, as_json: bool | None) -> None:
    """`eval` and `demo`: the metrics as JSON, or one table per target."""
    if as_json:
        emit(name, payload, True, "")
    else:
        print_metrics_tables(payload)


def print_select_table(summary: dict, *, stderr: bool = False, command: str = "select") -> None:
    """The human summary of `select` on stdout (stderr when stdout carries the clean list)."""
    from rich.table import Table

    console = stdout_console(stderr=stderr)
    table = Table(title=f"medsclean {command} ({summary['method']}, cut {summary['cut']})", title_justify="left")
    for col in ("class", "images", "kept", "rejected", "tau"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, c in summary["classes"].items():
        table.add_row(name, str(c["images"]), str(c["kept"]), str(c["rejected"]), f"{summary['tau'][name]:.4f}")
    total = sum(c["images"] for c in summary["classes"].values())
    table.add_row("all", str(total), str(summary["kept"]), str(summary["rejected"]), "", style="bold")
    console.print(table)
    times = ", ".join(f"{name} " + ("cached" if v["cached"] else f"{v['seconds']:.1f} s")
                      for name, v in summary["stages"].items())
    console.print(f"stages: {times}")
    if summary["clean_list"]:
        console.print(f"clean list: {summary['clean_list']}")
    console.print(f"run: {summary['run']} ({'Step 3 trained' if summary['trained'] else 'training reused'}"
                  f"{', re-cut without retraining' if summary['recut'] else ''})")
    console.print(f"details: {summary['cut_dir']} (rejected.txt, scores.csv, selection.json)")
    if summary.get("review"):
        console.print(f"review: {summary['review']}")
    if summary.get("export"):
        console.print(f"export: {summary['export']}")


RUNS_COLUMNS = ("run", "latest", "created", "method", "cut", "kept", "rejected", "size", "images")
"""The columns of `medsclean runs`, in order."""


def runs_table(rows: list[dict]) -> str:
    """`medsclean runs` for people and `awk`: a header row, then a row per run (`workdir.runs.list_runs`),
    columns two spaces apart, counts and sizes right-aligned, the image folder last; "-" for a count
    the run no longer has."""
    def cell(row: dict, column: str) -> str:
        if column == "latest":
            return "*" if row["latest"] else ""
        if column == "size":
            return f"{row['bytes'] / 1e6:.1f} MB"
        return "-" if row.get(column) is None else str(row[column])

    table = [list(RUNS_COLUMNS), *([cell(r, c) for c in RUNS_COLUMNS] for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(RUNS_COLUMNS))]
    right = {"kept", "rejected", "size"}
    out = []
    for line in table:
        cells = [text.rjust(w) if col in right else text.ljust(w)
                 for col, text, w in zip(RUNS_COLUMNS[:-1], line, widths)]
        out.append("  ".join([*cells, line[-1]]))
    return "\n".join(out)


def print_metrics_tables(payload: dict) -> None:
    """Rich tables of `eval` on stdout: one per target, a row per class and the mean, in percent."""
    import math

    from rich.table import Table

    console = stdout_console()
    columns = {"detector": ["image_auroc", "image_ap", "aupro", "pixel_ap", "pixel_auroc"],
               "cleaning": ["precision", "recall", "f1", "ranking_auroc", "ranking_auprc", "inspection_depth",
                            "train_aupro", "train_pixel_ap"]}
    labels = {"image_auroc": "I-AUROC", "image_ap": "I-AP", "aupro": "P-AUPRO", "pixel_ap": "P-AP",
              "pixel_auroc": "P-AUROC", "precision": "prec", "recall": "recall", "f1": "F1",
              "ranking_auroc": "rank AUROC", "ranking_auprc": "rank AUPRC", "inspection_depth": "insp. depth",
              "train_aupro": "train P-AUPRO", "train_pixel_ap": "train P-AP"}
    for section, rows in payload.items():
        if section not in columns:
            continue
        cols = [c for c in columns[section] if any(c in r for r in rows)]
        table = Table(title=f"{section} ({payload['model']} model)" if section == "detector" else section,
                      title_justify="left")
        table.add_column("class")
        table.add_column("images", justify="right")
        for c in cols:
            table.add_column(labels[c], justify="right")
        for row in rows:
            cells = [("n/a" if row.get(c) is None or math.isnan(row[c]) else f"{100 * row[c]:.2f}") for c in cols]
            table.add_row(str(row["class"]), str(row["images"]), *cells,
                          style="bold" if row["class"] in ("mean", "all (pooled)") else None)
        console.print(table)
    console.print("metrics: " + payload["files"]["metrics_json"])
    if "report" in payload["files"]:
        console.print("report: " + payload["files"]["report"])


def stdout_console(stderr: bool = False):
    """A rich console on stdout (or stderr); piped output gets a wide fixed width so tables are not truncated."""
    import sys

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(highlight=False, soft_wrap=True, width=None if stream.isatty() else 160, stderr=stderr)
