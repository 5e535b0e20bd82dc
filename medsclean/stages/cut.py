"""Stage `cut`: the clean list, a cut of the stored final scores η per class (no training).

Reads the select artifact; writes clean.txt and rejected.txt (paths inside the image folder),
scores.csv (one row per image), selection.json (every round of Step 3 and the final cut) and
selection.safetensors (η and the keep flags). A new cut of a finished run takes seconds.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import asdict

import numpy as np

from medsclean.config import CutConfig
from medsclean.stages.common import StageResult
from medsclean.ui import Reporter
from medsclean.workdir.artifacts import Artifact, digest
from medsclean.workdir.atomic import to_json
from medsclean.workdir.store import Store


def run_cut(selected: Artifact, store: Store, cfg: CutConfig, *, force: bool = False,
            reporter: Reporter | None = None) -> StageResult:
    """The clean list: the cut `cfg` of the stored final scores η, per class (no training)."""
    t0 = time.perf_counter()
    # the mixture rule's guards (cut_rules.mixture_decision) changed its cuts: its old cuts are not reused
    key = digest({"select": selected.key, "cut": asdict(cfg), **({"mixture": 2} if cfg.rule == "mixture" else {})})
    if (art := store.cached("cut", key, reporter, force=force)) is not None:
        return StageResult(art, True, time.perf_counter() - t0)
    import torch

    images = selected.manifest["images"]
    classes = [row["class"] for row in images]
    scores = selected.tensors("eta.safetensors")
    eta = final_scores(scores, classes, cfg.score)
    keep, tau = final_cut(eta, classes, cfg, selected.manifest["config"]["k"])
    rounds = [dict(r) for r in selected.manifest["rounds"]]
    rules = final_cut_rules(eta, classes, cfg, selected.manifest["config"]["k"])
    rounds[-1].update(final_cut_record(keep, tau, classes, cfg), rules=rules)
    distilled = scores["distilled_score"].double().numpy() if "distilled_score" in scores else None
    text = {"clean.txt": "".join(r["path"] + "\n" for r, k in zip(images, keep) if k),
            "rejected.txt": "".join(r["path"] + "\n" for r, k in zip(images, keep) if not k),
            "scores.csv": selection_csv(images, scores["memory_score"].double().numpy(), distilled, eta, keep),
            "selection.json": to_json({"method": selected.manifest["config"]["method"], "rounds": rounds}) + "\n"}
    files = {"selection.safetensors": {"eta": torch.from_numpy(eta),
                                       "keep": torch.from_numpy(keep.astype(np.uint8))}}
    manifest = {"images": images, "config": asdict(cfg), "rule": cfg.describe(), "tau": tau, "rules": rules,
                "kept": int(keep.sum()), "rejected": int((~keep).sum()), "model": selected.manifest["model"],
                "method": selected.manifest["config"]["method"], "grid": selected.manifest["grid"],
                "parents": {**selected.manifest["parents"], "select": selected.key}}
    art = store.write_stage("cut", key, files, manifest, extra_files=text)
    return StageResult(art, False, time.perf_counter() - t0)


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


def selection_csv(images: list[dict], memory_scores, distilled_scores, eta, keep) -> str:
    """One row per image in input order; rank_in_class 1 = most suspicious (highest final η)."""
    from medsclean.stages.scores import ranks_within_class

    classes = [row["class"] for row in images]
    ranks = ranks_within_class(eta, classes)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "class", "memory_score", "distilled_score", "final_eta", "kept", "rank_in_class"])
    for i, row in enumerate(images):
        distilled = "" if distilled_scores is None else f"{float(distilled_scores[i]):.6f}"
        writer.writerow([row["path"], row["class"], f"{float(memory_scores[i]):.6f}", distilled,
                         f"{float(eta[i]):.6f}", int(bool(keep[i])), ranks[i]])
    return buf.getvalue()
