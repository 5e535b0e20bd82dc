"""The closed sets of values options can take, as string enums.

Kept free of heavy imports: the CLI uses them to list, complete and validate choices at parse
time, before torch is loaded. Configs store the plain string values (`Method.MEDS.value`).
"""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A string enum whose members compare equal to their values."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class PresetName(Choice):
    AUTO = "auto"
    CPU = "cpu"
    PAPER = "paper"


class Layout(Choice):
    AUTO = "auto"
    FOLDER = "folder"
    MVTEC = "mvtec"


class Split(Choice):
    TRAIN = "train"
    TEST = "test"


class ClassFrom(Choice):
    TOP = "top"
    PARENT = "parent"
    NONE = "none"


class Engine(Choice):
    AUTO = "auto"
    EXACT = "exact"
    FAISS = "faiss"
    IVF = "ivf"
    APPROX = "approx"


class Aggregate(Choice):
    TOP1PCT = "top1pct"
    MAX = "max"


class Loss(Choice):
    MSE = "mse"
    L1 = "l1"


class Method(Choice):
    MEDS = "meds"
    MEMORY = "memory"
    KNN = "knn"
    ITERATIVE = "iterative"


class Cut(Choice):
    MIXTURE = "mixture"
    MAD = "mad"
    OTSU = "otsu"


class FinalScore(Choice):
    ETA = "eta"
    ETA_MEMORY = "eta+memory"


class EvalModel(Choice):
    SELECT = "select"
    DISTILL = "distill"
    MEMORY = "memory"


class Executor(Choice):
    LOCAL = "local"
    RAY = "ray"


class Link(Choice):
    """How `--export` puts each image in the tree."""

    HARDLINK = "hardlink"
    SYMLINK = "symlink"
    COPY = "copy"
