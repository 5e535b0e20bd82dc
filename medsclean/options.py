"""Every option, declared once: its Python name (the keyword of `medsclean.select(...)` and the other
API functions), its command-line flag, its help, its type and the config field it sets.

An `Opt` named `bank_ratio` is `--bank-ratio` on the command line and `bank_ratio=` in Python.
Options default to None ("unset"): the value then comes from the stage config or the preset, and
the help text shows that default by reading the config, never by restating it. Commands take
whole groups (`RUN`, `DATA`, `EXTRACT`, `SCORE`, `DISTILL`, `SELECT`, `EVAL`, ...; `COMMANDS` says
which), so a stage's options have the same names and meaning in every command and API function
that can run the stage. Adding an option is one `Opt` here (and its config field).

Imports nothing heavy (no typer, no torch): choices are string enums.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from medsclean import choices
from medsclean.config import STAGE_CONFIGS, DemoConfig, DistillConfig, NoiseConfig
from medsclean.presets import CPU, METHOD_ADVICE, PAPER, DEFAULT_PRESET, DEFAULT_SEED

DEFAULT_WORK = "medsclean-work"
"""The work folder of a command or API call that names none (relative to the current directory)."""


@dataclass(frozen=True)
class Opt:
    """One option: `name` is the parameter name; the flag is `--name` with dashes unless `flags` says.

    target: (stage, field) the value sets, e.g. ("score", "ratio"); stage "run" and "command"
        mark options that are not config fields.
    default: shown in --help when the value does not come from a stage config (e.g. "WORK/eval").
    path: None, "file" or "dir": the path must exist and be of that kind (checked at parse time).
    panel: the `--help` panel the option is listed under (set per group by `_opts`; `PANELS` orders them).
    """

    name: str
    type: Any
    target: tuple[str, str]
    help: str
    flags: tuple[str, ...] = ()
    default: str | None = None
    path: str | None = None
    metavar: str | None = None
    panel: str = ""

    @property
    def flag(self) -> str:
        first = self.flags[0] if self.flags else "--" + self.name.replace("_", "-")
        return first.split("/")[0]

    def default_text(self) -> str:
        if self.default is not None:
            return self.default
        stage, name = self.target
        cls = STAGE_CONFIGS.get(stage)
        if cls is None or name not in {f.name for f in fields(cls)}:
            return ""
        paper, cpu = PAPER.value(cls, name), CPU.value(cls, name)
        if paper == cpu:
            return _show(paper)
        return f"{_show(cpu)} with --preset cpu, {_show(paper)} with --preset paper"


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _opts(*items: Opt, panel: str = "") -> tuple[Opt, ...]:
    """A group of options, each listed under `panel` in `--help` (none: the plain "Options" panel)."""
    return tuple(replace(o, panel=panel) for o in items) if panel else items


PANELS = ("Runs", "Evaluation", "Demo", "Contamination", "Run", "Outputs", "Step 3 and the cut", "Corrections",
          "Data", "Encoder", "Step 1", "Step 2", "Executor")
"""The `--help` panels, the most used first: a command's own options, then the run, where results go,
the cut, and the stages from the data to the executor. A panel not listed here comes after these."""


RUN = _opts(
    Opt("work", Path, ("run", "work"), "Work folder for cached stages (never inside the images).",
        default=DEFAULT_WORK),
    Opt("preset", choices.PresetName, ("run", "preset"),
        "Defaults for the hardware: paper (the paper's ViT and iterations) or cpu (Lite0, small decoder); "
        "auto is paper on a GPU and cpu otherwise.", default=DEFAULT_PRESET),
    Opt("device", str, ("extract", "device"), "auto, cpu or cuda[:N]."),
    Opt("seed", int, ("run", "seed"), "Seed for every random choice; the same seed gives the same clean list.",
        default=str(DEFAULT_SEED)),
    Opt("as_json", bool, ("run", "json"), "Print machine-readable JSON on stdout.", flags=("--json",)),
    Opt("no_wait", bool, ("run", "no_wait"), "Fail at once when another run is computing the same stage in the "
        "work folder, instead of waiting for it.", default="wait"),
    Opt("quiet", bool, ("run", "quiet"), "Only warnings and errors on stderr.", flags=("--quiet", "-q")),
    panel="Run",
)
FORCE = _opts(Opt("force", bool, ("run", "force"), "Recompute this stage even if a valid cache exists."),
              panel="Run")
DATA = _opts(
    Opt("layout", choices.Layout, ("data", "layout"), "How the image folder is organised."),
    Opt("split", choices.Split, ("data", "split"), "MVTec split to read."),
    Opt("masks", Path, ("data", "masks"), "Folder of masks paired with the images by file stem.", path="dir"),
    Opt("class_from", choices.ClassFrom, ("data", "class_from"),
        "Class of plain-folder images: the top folder, the parent folder, or one class."),
    Opt("strict", bool, ("data", "strict"), "Fail on an unreadable image or a damaged work-folder file instead "
        "of skipping the image or recomputing the file."),
    panel="Data",
)
EXTRACT = _opts(
    Opt("backbone", str, ("extract", "backbone"), "timm model name of the frozen encoder."),
    Opt("stages", str, ("extract", "stages"), "Strides of the two CNN stages the encoder taps, fine,coarse: "
        "the memory on the fine grid, one reconstruction group each (e.g. 16,32 for deeper features on a "
        "coarser grid).", metavar="FINE,COARSE"),
    Opt("weights", Path, ("extract", "weights"), "Local .safetensors/.pth backbone weights, loaded strictly.",
        path="file"),
    Opt("random_init", bool, ("extract", "random_init"), "Random backbone weights (plumbing tests only)."),
    Opt("resize", int, ("extract", "resize"), "Square resize before the crop (none: the backbone's own size)."),
    Opt("crop", int, ("extract", "crop"), "Centre-crop side (none: the backbone's own size)."),
    Opt("batch_size", int, ("extract", "batch_size"), "Images per encoder batch."),
    Opt("num_workers", int, ("extract", "num_workers"), "Image-decoding worker processes (0: in this process)."),
    panel="Encoder",
)
CLUSTER = _opts(
    Opt("executor", choices.Executor, ("cluster", "executor"),
        "Where the stages run: local (this process) or ray (Ray workers: extract through Ray Data, the exact "
        "Step 1 as Ray tasks; same results; needs pip install 'medsclean[ray]' and a work folder every node "
        "sees)."),
    Opt("ray_address", str, ("cluster", "address"), "Ray cluster to join: auto (the cluster of this machine) or "
        "ray://HOST:PORT.", default="start a private instance on this machine", metavar="ADDRESS"),
    Opt("ray_workers", int, ("cluster", "workers"), "CPU workers of the private Ray instance.",
        default="every core"),
    Opt("train_workers", int, ("cluster", "train_workers"), "Ranks of data-parallel training for distill and "
        "select on Ray Train (one GPU each with --device cuda); reproducible for a given number."),
    panel="Executor",
)
SCORE = _opts(
    Opt("banks", int, ("score", "banks"), "Number of random memories B."),
    Opt("bank_ratio", float, ("score", "ratio"), "Share of a class's images in each memory (rho)."),
    Opt("knn", int, ("score", "k"), "Step-1 nearest neighbours averaged per patch."),
    Opt("replace", bool, ("score", "replace"), "Draw memory images with replacement (the paper) or without.",
        flags=("--with-replacement/--without-replacement",)),
    Opt("per_class", bool, ("score", "per_class"), "Memories per class or across all classes.",
        flags=("--per-class/--all-classes",)),
    Opt("include_self", bool, ("score", "include_self"),
        "Match an image against its own patches too (as the reference code does)."),
    Opt("engine", choices.Engine, ("score", "engine"),
        "Nearest-neighbour engine: exact (torch), faiss, ivf (approximate FAISS), approx (exact search of a "
        "per-image patch coreset; faster, other scores), or auto (exact or faiss, always the exact scores; a "
        "class whose exact pass is projected over 30 minutes gets a line with the --engine approx command; see "
        "docs/scaling.md)."),
    Opt("coreset", float, ("score", "coreset"), "Share of each image's patches the approx engine keeps in "
        "its memories (greedy k-center coreset)."),
    Opt("max_memory", str, ("score", "max_memory"), "Bound on Step 1's working memory per class, e.g. 4GB or 512MiB: "
        "the block sizes derive from it (the class's features must fit in it; none: fixed 256 MiB blocks).",
        metavar="SIZE"),
    Opt("aggregate", choices.Aggregate, ("score", "aggregate"), "Image score: mean of the top 1 % of patches, or max."),
    Opt("min_bank", int, ("score", "min_bank"), "Floor on the images per memory, for small classes."),
    panel="Step 1",
)
DISTILL = _opts(
    Opt("distill_iters", int, ("distill", "iters"), "Step-2 iterations."),
    Opt("loss", choices.Loss, ("distill", "loss"), "Step-2 loss: mse or l1 (times 10)."),
    Opt("width", int, ("distill", "width"), "Decoder width (none: a ViT's own token width; CNN stages get a fixed "
        "width)."),
    Opt("depth", int, ("distill", "depth"), "Decoder blocks."),
    Opt("heads", int, ("distill", "heads"), "Attention heads per decoder block."),
    Opt("token_pool", int, ("distill", "token_pool"), "Average the decoder's token grid over N x N windows "
        "(2: stride 16, a quarter of the tokens; 1: the encoder's grid, as the paper)."),
    Opt("lr", float, ("distill", "lr"), "Peak learning rate of Steps 2 and 3 (linear warm-up, then cosine decay "
        f"to {DistillConfig.final_lr:g})."),
    panel="Step 2",
)
SELECT = _opts(
    Opt("method", choices.Method, ("select", "method"),
        "meds (Steps 1-3), memory (Step-1 ensemble only), knn (full-bank nearest neighbour) or iterative "
        "(kNN with a shrinking memory). " + METHOD_ADVICE[0].upper() + METHOD_ADVICE[1:]),
    Opt("select_iters", int, ("select", "iters"), "Step-3 iterations T."),
    Opt("mad_k", float, ("select", "k"), "Margin of Step 3's re-selection, in median absolute deviations "
        "(k of median + k·(t/T)·MAD)."),
    Opt("cut", choices.Cut, ("cut", "rule"), "Final cut of the scores per class: mixture (two-component fit, "
        "mad fallback), mad (median + k MAD) or otsu. Changing the cut never retrains."),
    Opt("final_score", choices.FinalScore, ("cut", "score"), "What the cut reads: eta (Step 3's final score, "
        "the paper) or eta+memory (its geometric mean with the Step-1 score, each over its class median). "
        "Changing it never retrains."),
    Opt("cut_k", float, ("cut", "k"), "MAD margin of the final cut (mad, and mixture's fallback).",
        default="--mad-k"),
    Opt("reject_fraction", float, ("cut", "reject_fraction"),
        "Reject exactly this share of each class (the most suspicious), instead of --cut."),
    Opt("threshold", float, ("cut", "threshold"), "Keep the images whose final score is below this value "
        "(the scores of scores.csv), instead of --cut.", default="none"),
    Opt("budget", str, ("run", "budget"), "Wall-clock time for Steps 2-3 training (e.g. 90s, 10m, 1h): the "
        "iteration counts are chosen from a measured step time and printed.", default="none"),
    panel="Step 3 and the cut",
)
CUT = tuple(o for o in SELECT if o.target[0] == "cut")
"""The options of the final cut alone (`medsclean cut`; `Selection.recut`)."""
RUN_KEY = _opts(
    Opt("run", str, ("eval", "run"), "The run to use, as it was made (a key from `medsclean runs`; a prefix is "
        "enough): eval measures it, cut re-cuts its scores. eval without stage options, and cut, take the "
        "latest run of IMAGES.", default="the latest run"),
    panel="Run",
)
CORRECTIONS = _opts(
    Opt("keep", Path, ("command", "keep"), "Keep the images this file lists, whatever the cut says: one path per "
        "line, as in clean.txt, relative to the current folder or to IMAGES, or absolute; blank lines and # "
        "comments are skipped (Python: a file or a list of paths).", default="none", path="file", metavar="FILE"),
    Opt("reject", Path, ("command", "reject"), "Reject the images this file lists, whatever the cut says (as "
        "--keep).", default="none", path="file", metavar="FILE"),
    panel="Corrections",
)
EVAL = _opts(
    Opt("model", choices.EvalModel, ("eval", "model"), "Detector to measure: select (fine-tuned), distill, or "
        "memory (the ensemble)."),
    Opt("metrics_dir", Path, ("eval", "metrics_dir"), "Folder for metrics.json and metrics.csv.",
        default="WORK/eval"),

    Opt("report_top", int, ("eval", "report_top"), "Most suspicious images pictured in the report."),
    Opt("test", Path, ("eval", "test_dir"), "Folder of labelled test images (default: the MVTec root's test split).",
        path="dir", default="the test split"),
    Opt("test_masks", Path, ("eval", "test_masks"), "Masks of the --test images, paired by file stem.", path="dir",
        default="none"),
    Opt("map_size", int, ("eval", "size"), "Side of the evaluation maps, in pixels."),
    Opt("sigma", float, ("eval", "sigma"), "Gaussian blur sigma of the maps (0: none)."),
    Opt("kernel", int, ("eval", "kernel"), "Gaussian blur support (odd)."),
    Opt("top_ratio", float, ("eval", "top_ratio"), "Image score: mean of this top share of pixels (0: max)."),
    Opt("mask_threshold", float, ("eval", "mask_threshold"),
        "Ground-truth binarisation: mask > this (0 reproduces the reference's > 0)."),
    Opt("fpr_limit", float, ("eval", "fpr_limit"), "False-positive rate AUPRO is integrated to."),
    panel="Evaluation",
)
NOISE = _opts(
    Opt("noise_ratio", float, ("noise", "ratio"),
        "Contamination ratio r: injected defective images per good training image.",
        default=f"{NoiseConfig.ratio} for make-noisy, {DemoConfig.noise_ratio} for demo"),
    panel="Contamination",
)
DEMO = _opts(
    Opt("n_train", int, ("demo", "n_train"), "Good training images per demo category."),
    Opt("n_test_good", int, ("demo", "n_test_good"), "Good test images per demo category."),
    Opt("n_test_defect", int, ("demo", "n_test_defect"), "Defective test images per demo category."),
    Opt("image_size", int, ("demo", "size"), "Side of the generated demo images, in pixels."),
    panel="Demo",
)
MAKE_NOISY = _opts(
    Opt("overlap", bool, ("noise", "overlap"), "Keep the injected images in the test set (MeDS) or remove them "
        "(SoftPatch).", flags=("--overlap/--no-overlap",)),
    panel="Contamination",
)
LISTS = _opts(
    Opt("out", Path, ("command", "out"), "Write the clean list here, one path per line (- for stdout; a device, "
        "FIFO or /dev/fd/N is written into, a symlink's target is replaced).", default="none"),
    Opt("rejected_out", Path, ("command", "rejected_out"), "Write the rejected list here, one path per line (as "
        "--out).", flags=("--rejected",), default="none"),
    panel="Outputs",
)
REPORT = _opts(
    Opt("report", Path, ("report", "report_dir"), "Write the HTML report (report.html) into this folder: for select "
        "the review of what was rejected, for eval the metrics with overlays.",
        default="select: the run's folder (WORK/cut/KEY/review); eval: none"),
    panel="Outputs",
)
EXPORT = _opts(
    Opt("export", Path, ("command", "export"), "Write the cleaned dataset here as a tree anomalib loads: "
        "<class>/train/good/ (kept, nothing else in <class>/), _rejected/<class>/ (rejected), clean.txt and "
        "rejected.txt relative to the tree.", default="none"),
    Opt("link", choices.Link, ("command", "link"), "How --export places each image: hardlink (a copy where the "
        "file system cannot link; a hard link shares the file, so editing one edits both), copy, or symlink "
        "(absolute links: anomalib's MVTecAD does not load a symlink tree).",
        default="hardlink"),
    panel="Outputs",
)
RUNS = _opts(
    Opt("remove", list[str], ("runs", "run"), "Remove this run (repeatable) and the artifacts no other run uses: "
        "its full key, or a prefix of it with --yes.", default="none", metavar="KEY"),
    Opt("yes", bool, ("runs", "yes"), "Let --remove take a prefix of a run's key (without it, the full key).",
        flags=("--yes", "-y")),
    panel="Runs",
)
COPY = _opts(Opt("copy", bool, ("command", "copy"), "Copy image files instead of linking them (for --export: "
                 "deprecated, the same as --link copy).", default="no"), panel="Outputs")

ALL_OPTS = (*RUN, *FORCE, *DATA, *EXTRACT, *CLUSTER, *SCORE, *DISTILL, *SELECT, *RUN_KEY, *CORRECTIONS, *EVAL, *NOISE, *DEMO, *MAKE_NOISY, *LISTS, *COPY, *RUNS, *REPORT, *EXPORT)
BY_NAME = {o.name: o for o in ALL_OPTS}
assert len(BY_NAME) == len(ALL_OPTS), "two options share a parameter name"


COMMANDS = {
    "extract": (RUN, FORCE, DATA, EXTRACT, CLUSTER),
    "score": (RUN, FORCE, DATA, EXTRACT, CLUSTER, SCORE),
    "distill": (RUN, FORCE, DATA, EXTRACT, CLUSTER, SCORE, DISTILL),
    "select": (RUN, FORCE, DATA, EXTRACT, CLUSTER, SCORE, DISTILL, SELECT, CORRECTIONS, LISTS, REPORT, EXPORT, COPY),
    "cut": (tuple(o for o in RUN if o.name not in ("preset", "seed")), RUN_KEY, CUT, CORRECTIONS, LISTS, REPORT,
            EXPORT, COPY),
    "eval": (RUN, DATA, EXTRACT, CLUSTER, SCORE, DISTILL, SELECT, RUN_KEY, EVAL, REPORT),
    "runs": (tuple(o for o in RUN if o.name in ("work", "as_json")), RUNS),
    "demo": (RUN, EXTRACT, SCORE, DISTILL, SELECT, NOISE, DEMO),
    "make-noisy": (NOISE, MAKE_NOISY, COPY, tuple(o for o in RUN if o.name in ("seed", "as_json"))),
}
"""The option groups of each command (and of the API function of the same name)."""

CLI_ONLY = ("as_json", "quiet")
"""Options of the command line alone: the API returns result objects, and takes `progress=False` for quiet."""

RUN_STAGES = ("data", "extract", "score", "distill", "select", "cut")
"""The configs that describe a run (what `eval --run` refuses to combine with)."""


def command_options(command: str) -> tuple[Opt, ...]:
    """Every option of `command`, in declaration order."""
    return tuple(o for group in COMMANDS[command] for o in group)


def flag_for(param: str, stage: str | None) -> str:
    """The flag that sets a library parameter (`ConfigError.param`) or an option name, or `param`."""
    found = _targeting(param, stage)
    return found.flag if found else param


def option_for(param: str, stage: str | None) -> str:
    """The option name (the API keyword) that sets a library parameter, or `param`: "ratio" of the
    score config is `bank_ratio`."""
    found = _targeting(param, stage)
    return found.name if found else param


def _targeting(param: str, stage: str | None) -> Opt | None:
    """The option of `stage`'s field `param`, else the option named `param`, else one setting a field `param`."""
    exact = [o for o in ALL_OPTS if o.target == (stage, param)]
    named = [BY_NAME[param]] if param in BY_NAME else []
    loose = [o for o in ALL_OPTS if o.target[1] == param]
    found = exact or named or loose
    return found[0] if found else None


class Given:
    """The values a user set (None = unset), by option name, grouped by config."""

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def get(self, name: str, default: Any = None) -> Any:
        value = self._values.get(name)
        return default if value is None else value

    def stage(self, stage: str) -> dict[str, Any]:
        """{field: value} of the options targeting `stage` that were set; enums become plain strings."""
        out = {}
        for name, value in self._values.items():
            opt = BY_NAME.get(name)
            if opt is not None and opt.target[0] == stage and value is not None:
                out[opt.target[1]] = value.value if isinstance(value, choices.Choice) else value
        return out

    def work_folder(self) -> Path:
        """The work folder: the one given, or `DEFAULT_WORK`."""
        return Path(self.get("work", DEFAULT_WORK))

    def values_set(self) -> dict[str, Any]:
        """{option name: value} of the options that were set."""
        return {k: v for k, v in self._values.items() if v is not None}

    def stage_options_set(self) -> list[str]:
        """Names of the data/encoder/stage options that were set (the device aside)."""
        return [o.name for o in ALL_OPTS if o.target[0] in RUN_STAGES and o.name != "device"
                and self.get(o.name) is not None]


__all__ = ["ALL_OPTS", "BY_NAME", "COMMANDS", "DEFAULT_WORK", "Given", "Opt", "command_options", "flag_for",
           "option_for"]
