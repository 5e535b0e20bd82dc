"""Load an exported tree with anomalib, as the README tells users to: run by tests/test_export_anomalib.py
with the python of the anomalib virtual environment (not medsclean's), so it imports nothing of medsclean.

    python tests/anomalib_load.py TREE CLASS_FOLDER...

Prints one JSON object: per class folder, the training images each loader found (paths relative to
TREE, sorted), or the loader's error as text:
    {"bottle": {"dataset": [...], "mvtec": [...], "folder": [...], "batch": 4}, ...}
"dataset" is `MVTecADDataset(split="train")`, "mvtec" the `MVTecAD` datamodule, "folder" the `Folder`
datamodule (both set up, training split); "batch" the number of images in the first training batch
of `MVTecAD` (the files decode).
"""

import json
import sys
import warnings
from pathlib import Path


def relative(tree: Path, paths) -> list[str]:
    """`paths` relative to `tree` where they lie in it (else as they are), sorted."""
    return sorted(Path(p).relative_to(tree).as_posix() if Path(p).is_relative_to(tree) else str(p) for p in paths)


def load(tree: Path, cls: str) -> dict:
    from anomalib.data import Folder, MVTecAD
    from anomalib.data.datasets import MVTecADDataset

    found: dict = {}
    try:
        found["dataset"] = relative(tree, MVTecADDataset(root=tree, category=cls, split="train").samples.image_path)
    except Exception as exc:  # noqa: BLE001  (reported to the test, which decides)
        found["dataset"] = f"{type(exc).__name__}: {exc}"
    try:
        # The README's call (the tree holds training images only, hence no test or validation split).
        mvtec = MVTecAD(root=tree, category=cls, test_split_mode="none", val_split_mode="none", num_workers=0)
        mvtec.setup()
        found["mvtec"] = relative(tree, mvtec.train_data.samples.image_path)
        found["batch"] = int(next(iter(mvtec.train_dataloader())).image.shape[0])
    except Exception as exc:  # noqa: BLE001
        found["mvtec"] = f"{type(exc).__name__}: {exc}"
    try:
        # The README's call.
        folder = Folder(name=cls, root=tree / cls, normal_dir="train/good", test_split_mode="none",
                        val_split_mode="none", num_workers=0)
        folder.setup()
        found["folder"] = relative(tree, folder.train_data.samples.image_path)
    except Exception as exc:  # noqa: BLE001
        found["folder"] = f"{type(exc).__name__}: {exc}"
    return found


def main(argv: list[str]) -> None:
    warnings.filterwarnings("ignore")
    tree = Path(argv[0]).resolve()
    print(json.dumps({cls: load(tree, cls) for cls in argv[1:]}))


if __name__ == "__main__":
    main(sys.argv[1:])
