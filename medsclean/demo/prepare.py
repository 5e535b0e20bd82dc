"""`medsclean demo`: generate the embedded dataset, contaminate it, clean it, and measure the result.

Everything happens inside the work folder: `<work>/demo/data` (the generated MVTec-layout
dataset), `<work>/demo/noisy` (its contaminated copy), `<work>/demo/report` (the HTML report).
Generated folders are reused when a previous demo made them with the same settings.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from medsclean.config import DemoConfig
from medsclean.ui import Reporter


def prepare_demo_data(work: Path, cfg: DemoConfig, reporter: Reporter) -> Path:
    """Generate and contaminate the demo dataset under `work/demo`, reusing an identical earlier one."""
    from medsclean.demo.noisy import make_noisy
    from medsclean.workdir.atomic import write_json_atomic
    from medsclean.demo.synth import generate_dataset

    base = Path(work) / "demo"
    stamp = base / "demo-config.json"
    wanted = asdict(cfg) | {"categories": list(cfg.categories)}
    noisy = base / "noisy"
    if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == wanted and noisy.is_dir():
        reporter.info(f"demo data: reusing {noisy}")
        return noisy
    for sub in ("data", "noisy"):
        shutil.rmtree(base / sub, ignore_errors=True)
    stamp.unlink(missing_ok=True)
    summary = generate_dataset(base / "data", categories=cfg.categories, n_train=cfg.n_train,
                               n_test_good=cfg.n_test_good, n_test_defect=cfg.n_test_defect, size=cfg.size,
                               seed=cfg.seed)
    n_images = sum(c["n_train"] + c["n_test_good"] + sum(c["n_test_defect"].values())
                   for c in summary["categories"].values())
    reporter.info(f"demo data: generated {len(cfg.categories)} categories ({n_images} images) in {base / 'data'}")
    manifest = make_noisy(base / "data", noisy, ratio=cfg.noise_ratio, seed=cfg.seed)
    reporter.info(f"demo data: injected {len(manifest['injected'])} defective test images into train "
                  f"(true contamination {manifest['true_fraction']:.1%}) in {noisy}")
    write_json_atomic(stamp, wanted)
    return noisy
