"""What the API functions return: small frozen records of paths, keys and rows, plus the summary
the command line prints (`medsclean select --json` prints `Selection.summary`)."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsclean.errors import ConfigError, MedscleanError
from medsclean.options import ALL_OPTS

ROW_FIELDS = ("path", "class", "memory_score", "distilled_score", "final_eta", "kept", "rank_in_class", "decision")
"""The columns of `Selection.rows`, `to_csv` and the cut's scores.csv."""

CUT_OPTIONS = tuple(o.name for o in ALL_OPTS if o.target[0] == "cut")
"""The options `Selection.recut` takes: the final cut of the stored scores, which never retrains."""


@dataclass(frozen=True)
class StageOutput:
    """What `extract`, `score` and `distill` return: the stage's artifact.

    stage: the artifact's stage on disk ("extract", "score", "distill").
    key: the artifact's key; path: its folder in the work folder.
    file: its main file: the features folder, scores.csv or model.safetensors.
    cached: True when the artifact was reused, not computed.
    summary: what the command prints with --json (per-stage times, engine, loss, ...).
    """

    stage: str
    key: str
    path: Path
    file: Path
    cached: bool
    summary: dict = field(repr=False)


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate` returns: the metrics, per class and their mean, as fractions (not percent).

    detector: rows of the detector's metrics on the labelled test split (empty without one).
    cleaning: rows of the cleaning's metrics on the known contaminants (empty without them).
    files: "metrics_json", "metrics_csv" and, with `report`, "report".
    summary: the whole payload (as metrics.json, without the schema).
    """

    model: str
    detector: list[dict]
    cleaning: list[dict]
    files: dict[str, Path]
    summary: dict = field(repr=False)

    @classmethod
    def from_payload(cls, payload: dict) -> Evaluation:
        return cls(model=payload["model"], detector=list(payload.get("detector", [])),
                   cleaning=list(payload.get("cleaning", [])),
                   files={k: Path(v) for k, v in payload["files"].items()}, summary=payload)


@dataclass(frozen=True)
class Selection:
    """What `select` and `cut` return: the kept and rejected images and the scores behind the cut.

    kept, rejected: the image paths as the command's lists write them (the image folder as given
        joined with each image's path inside it), in input order.
    rows: one dict per image in input order, with the keys of `ROW_FIELDS`: path, class,
        memory_score (Step 1), distilled_score (Step 2; None for the methods without it),
        final_eta (what the cut read), kept, rank_in_class (1 = most suspicious of its class),
        decision ("auto", or "kept by user" / "rejected by user" for the images `keep` / `reject`
        corrected).
    run: the run key (`medsclean runs`, `evaluate(run=...)`).
    review: the review page (report.html).
    artifacts: the folder of each stage's artifact, by stage ("extract", ..., "cut").
    summary: what `medsclean select --json` prints.
    """

    kept: list[str]
    rejected: list[str]
    rows: list[dict]
    run: str
    review: Path
    artifacts: dict[str, Path]
    summary: dict = field(repr=False)
    redo: Callable[..., Selection] = field(repr=False, compare=False, default=None)  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"Selection(run={self.run!r}, method={self.summary['method']!r}, cut={self.summary['cut']!r}, "
                f"kept={len(self.kept)}, rejected={len(self.rejected)}, review={str(self.review)!r})")

    def recut(self, **cut_options: Any) -> Selection:
        """The same scores cut again with `cut_options` (`cut`, `final_score`, `cut_k`,
        `reject_fraction`, `threshold`; the cut options not passed take their defaults; the
        selection's corrections `keep` / `reject` stay): no retraining, seconds, as `medsclean cut`.
        Lists and exports are not written.

        Raises:
            ConfigError: an option that is not a cut option (naming it), or a bad value.
        """
        wrong = sorted(set(cut_options) - set(CUT_OPTIONS))
        if wrong:
            raise ConfigError(wrong[0], f"recut() takes only the cut options ({', '.join(CUT_OPTIONS)}), not "
                              f"{wrong[0]}; call select() to change the others")
        return self.redo(**cut_options)

    def to_csv(self, path: str | Path) -> Path:
        """Write `rows` as CSV (the columns and number format of the cut's scores.csv, with the paths
        of the lists); returns the path."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(ROW_FIELDS)
        for row in self.rows:
            distilled = "" if row["distilled_score"] is None else f"{row['distilled_score']:.6f}"
            writer.writerow([row["path"], row["class"], f"{row['memory_score']:.6f}", distilled,
                             f"{row['final_eta']:.6f}", int(row["kept"]), row["rank_in_class"], row["decision"]])
        target = Path(path).expanduser()
        target.write_text(buffer.getvalue())
        return target

    def to_pandas(self):
        """`rows` as a pandas DataFrame (one row per image, the columns of `ROW_FIELDS`).

        Raises:
            MedscleanError: pandas is not installed.
        """
        try:
            import pandas
        except ImportError:
            raise MedscleanError("to_pandas() needs pandas: pip install pandas (or use to_csv())") from None
        return pandas.DataFrame(self.rows, columns=list(ROW_FIELDS))
