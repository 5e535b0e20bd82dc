"""Work-arounds for broken third-party installs, applied before the affected import.

The CPU build of torch 2.13 next to the CUDA-built torchvision 0.28 wheel makes
``import torchvision`` (and therefore ``import timm``) raise
``RuntimeError: operator torchvision::nms does not exist``: torchvision's compiled
operator library fails to load, and its Python fake kernels then point at operator
schemas that were never declared. Declaring the two schemas ourselves lets the import
succeed; only the compiled operators (NMS, image decoding) stay unusable, and
medsclean uses neither.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import torch

_SHIMMED_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

# Operator schemas live only as long as the Library object that defined them.
_torchvision_library: torch.library.Library | None = None


def _operator_exists(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _load_torchvision_operators() -> None:
    """Load torchvision's compiled operators as torchvision itself would, ignoring failure.

    On a working install this registers the real schemas, so the shim must not declare
    them again (a second definition of an operator is an error).
    """
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        library = package_dir / f"_C{suffix}"
        if library.is_file():
            try:
                torch.ops.load_library(str(library))
            except (OSError, ImportError):
                pass
            return


def ensure_torchvision_importable() -> list[str]:
    """Declare the torchvision operator schemas that a mismatched wheel pair lacks.

    A no-op on a correct install, when torchvision is absent or already imported, and on
    every call after the first. Must run before torchvision is first imported.

    Returns:
        Names of the schemas declared by this call (empty when nothing was missing).
    """
    global _torchvision_library
    if "torchvision" in sys.modules:
        return []
    if not all(_operator_exists(name) for name in _SHIMMED_SCHEMAS):
        _load_torchvision_operators()
    missing = [name for name in _SHIMMED_SCHEMAS if not _operator_exists(name)]
    if not missing or importlib.util.find_spec("torchvision") is None:
        return []
    if _torchvision_library is None:
        _torchvision_library = torch.library.Library("torchvision", "DEF")
    for name in missing:
        _torchvision_library.define(_SHIMMED_SCHEMAS[name])
    return missing
