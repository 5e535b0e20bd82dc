"""Stage `cut`: the clean list, a cut of the stored final scores η per class (no training).

Reads the select artifact; writes clean.txt and rejected.txt (paths inside the image folder),
scores.csv (one row per image), selection.json (every round of Step 3 and the final cut) and
selection.safetensors (η and the keep flags). A new cut of a finished run takes seconds.

The user's corrections (`Corrections`: images to keep or to reject whatever the cut says) are
applied after the rule; they are part of the cut's key (none: the key a cut without them always
had), listed in the manifest's `overrides` and in scores.csv's `decision` column.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import asdict, dataclass

import numpy as np

from medsclean.config import CutConfig
from medsclean.stages.common import StageResult
from medsclean.ui import Reporter
from medsclean.workdir.artifacts import Artifact, digest
from medsclean.workdir.atomic import to_json
from medsclean.workdir.store import Store


AUTO, KEPT_BY_USER, REJECTED_BY_USER = "auto", "kept by user", "rejected by user"
"""The values of the `decision` column: the cut decided, or the user's correction did."""


@dataclass(frozen=True)
class Corrections:
    """The user's overrides of a cut: `keep` and `reject` are image paths relative to the image
    folder (as in the manifests), kept or rejected whatever the cut says."""

    keep: tuple[str, ...] = ()
    reject: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", tuple(sorted(set(self.keep))))
        object.__setattr__(self, "reject", tuple(sorted(set(self.reject))))
        both = sorted(set(self.keep) & set(self.reject))
        if both:
            from medsclean.errors import ConfigError

            raise ConfigError(("keep", "reject"), f"keep and reject both name {both[0]}; leave it in only one")

    def __bool__(self) -> bool:
        return bool(self.keep or self.reject)

    def overrides(self) -> dict:
        """As the cut manifest records them: {"kept": [...], "rejected": [...]} (sorted paths)."""
        return {"kept": list(self.keep), "rejected": list(self.reject)}


def run_cut(selected: Artifact, store: Store, cfg: CutConfig, *, corrections: Corrections | None = None,
            force: bool = False, reporter: Reporter | None = None) -> StageResult:
    """The clean list: the cut `cfg` of the stored final scores η, per class (no training), with
    the user's `corrections` on top.

    Raises:
        ConfigError: a correction names an image the selection does not hold.
    """
    t0 = time.perf_counter()
    corrections = corrections or Corrections()
    # the mixture rule's guards (cut_rules.mixture_decision) changed its cuts: its old cuts are not reused
    key = digest({"select": selected.key, "cut": asdict(cfg), **({"mixture": 2} if cfg.rule == "mixture" else {}),
                  **({"overrides": corrections.overrides()} if corrections else {})})
    if (art := store.cached("cut", key, reporter, force=force)) is not None:
        return StageResult(art, True, time.perf_counter() - t0)
    import torch

    images = selected.manifest["images"]
    classes = [row["class"] for row in images]
    scores = selected.tensors("eta.safetensors")
    eta = final_scores(scores, classes, cfg.score)
    keep, tau = final_cut(eta, classes, cfg, selected.manifest["config"]["k"])
    keep, decisions = apply_corrections(keep, images, corrections)
    rounds = [dict(r) for r in selected.manifest["rounds"]]
    rules = final_cut_rules(eta, classes, cfg, selected.manifest["config"]["k"])
    rounds[-1].update(final_cut_record(keep, tau, classes, cfg), rules=rules)
    distilled = scores["distilled_score"].double().numpy() if "distilled_score" in scores else None
    text = {"clean.txt": "".join(r["path"] + "\n" for r, k in zip(images, keep) if k),
            "rejected.txt": "".join(r["path"] + "\n" for r, k in zip(images, keep) if not k),
            "scores.csv": selection_csv(images, scores["memory_score"].double().numpy(), distilled, eta, keep,
                                        decisions),
            "selection.json": to_json({"method": selected.manifest["config"]["method"], "rounds": rounds}) + "\n"}
    files = {"selection.safetensors": {"eta": torch.from_numpy(eta),
                                       "keep": torch.from_numpy(keep.astype(np.uint8))}}
    manifest = {"images": images, "config": asdict(cfg), "rule": cfg.describe(), "tau": tau, "rules": rules,
                "kept": int(keep.sum()), "rejected": int((~keep).sum()), "overrides": corrections.overrides(),
                "model": selected.manifest["model"], "method": selected.manifest["config"]["method"],
                "grid": selected.manifest["grid"],
                "parents": {**selected.manifest["parents"], "select": selected.key}}
    art = store.write_stage("cut", key, files, manifest, extra_files=text)
    return StageResult(art, False, time.perf_counter() - t0)


def apply_corrections(keep: np.ndarray, images: list[dict],
                      corrections: Corrections) -> tuple[np.ndarray, list[str]]:
    """The cut's keep flags with the user's corrections applied, and each image's decision
    (`AUTO`, `KEPT_BY_USER`, `REJECTED_BY_USER`). `images`: the manifest's image table."""
    index = {row["path"]: i for i, row in enumerate(images)}
    missing = [p for p in (*corrections.keep, *corrections.reject) if p not in index]
    if missing:
        from medsclean.errors import ConfigError

        param = "keep" if missing[0] in corrections.keep else "reject"
        raise ConfigError(param, f"{param}: {missing[0]} is not an image of this selection")
    keep = np.asarray(keep, dtype=bool).copy()
    decisions = [AUTO] * len(images)
    for paths, flag, decision in ((corrections.keep, True, KEPT_BY_USER),
                                  (corrections.reject, False, REJECTED_BY_USER)):
        for path in paths:
            keep[index[path]] = flag
            decisions[index[path]] = decision
    return keep, decisions


def decisions_of(manifest: dict) -> list[str]:
    """Each image's decision in a cut manifest, in its order (a cut made before corrections: all `AUTO`)."""
    overrides = manifest.get("overrides") or {}
    kept, rejected = set(overrides.get("kept", ())), set(overrides.get("rejected", ()))
    return [KEPT_BY_USER if row["path"] in kept else REJECTED_BY_USER if row["path"] in rejected else AUTO
            for row in manifest["images"]]


def final_scores(scores: dict, classes: list[str], score: str) -> np.ndarray:
    """(N,) float64 scores the cut reads: the stored η, or its combination with the Step-1 image
    score (`CutConfig.score`). `scores`: the select stage's eta.safetensors tensors."""
    from medsclean.choices import FinalScore
    from medsclean.selection.progressive import combine_class_scores

    eta = scores["eta"].double().numpy()
    if score == FinalScore.ETA:
        return eta
    return combine_class_scores([eta, scores["memory_score"].double().numpy()], classes)


def final_cut(eta, classes: list[str], cfg: CutConfig, select_k: float) -> tuple[np.ndarray, dict[str, float]]:
    """The clean set: per class, the images whose final score is below the cut (`cfg.rule` with
    margin `cfg.k`, else Step 3's `select_k`; or the top `cfg.reject_fraction`; or `cfg.threshold`)."""
    from medsclean.selection.cut_rules import cut_per_class

    x = np.asarray(eta, dtype=np.float64)
    if cfg.threshold is not None:
        return x < cfg.threshold, {c: float(cfg.threshold) for c in sorted(set(classes))}
    params = _rule_params(cfg, select_k)
    return cut_per_class(x, classes, cfg.rule, reject_fraction=cfg.reject_fraction, **params)


def final_cut_rules(eta, classes: list[str], cfg: CutConfig, select_k: float) -> dict[str, dict]:
    """Per class, the rule `final_cut` applied and why ({"rule", "why"}): the mixture falls back to
    mad on small or one-mode classes (`cut_rules.mixture_decision`)."""
    from medsclean.selection.cut_rules import rules_used

    if cfg.threshold is not None:
        return {c: {"rule": f"threshold {cfg.threshold:g}", "why": "a fixed threshold was asked for"}
                for c in sorted(set(classes))}
    params = _rule_params(cfg, select_k)
    return rules_used(np.asarray(eta, dtype=np.float64), classes, cfg.rule, reject_fraction=cfg.reject_fraction,
                      **params)


def final_cut_record(keep: np.ndarray, tau: dict[str, float], classes: list[str], cfg: CutConfig) -> dict:
    labels = np.asarray(classes, dtype=object)
    return {"cut": cfg.describe(), "tau": tau, "kept": {c: int(keep[labels == c].sum()) for c in tau},
            "size": {c: int((labels == c).sum()) for c in tau}}


def _rule_params(cfg: CutConfig, select_k: float) -> dict:
    """The margin of the mad rule and of the mixture's mad fallback: `cfg.k`, else Step 3's k."""
    k = cfg.k if cfg.k is not None else select_k
    return {"mad": {"k": k}, "mixture": {"k_fallback": k}, "otsu": {}}[cfg.rule]


def selection_csv(images: list[dict], memory_scores, distilled_scores, eta, keep,
                  decisions: list[str] | None = None) -> str:
    """One row per image in input order; rank_in_class 1 = most suspicious (highest final η);
    decision: who decided (`AUTO` unless the user corrected the cut)."""
    from medsclean.stages.scores import ranks_within_class

    classes = [row["class"] for row in images]
    ranks = ranks_within_class(eta, classes)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "class", "memory_score", "distilled_score", "final_eta", "kept", "rank_in_class",
                     "decision"])
    for i, row in enumerate(images):
        distilled = "" if distilled_scores is None else f"{float(distilled_scores[i]):.6f}"
        writer.writerow([row["path"], row["class"], f"{float(memory_scores[i]):.6f}", distilled,
                         f"{float(eta[i]):.6f}", int(bool(keep[i])), ranks[i],
                         decisions[i] if decisions else AUTO])
    return buf.getvalue()
