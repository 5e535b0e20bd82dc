"""The reconstruction model of Steps 2-3: a noisy bottleneck and a linear-attention decoder.

The model never sees images. It takes the stored reconstruction groups of a frozen
encoder, fuses them, passes them through a dropout bottleneck and a stack of
linear-attention blocks, and is asked to give the groups back. Where it fails, the
image is unusual: the per-token cosine distance between each stored group and its
reconstruction is the anomaly map.

Decoder outputs are paired with encoder groups in reverse order, so the shallowest
encoder group is matched by the deepest decoder blocks (a loose, many-to-one
reconstruction that cannot copy its input layer by layer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medsclean.config import DistillConfig
from medsclean.errors import UsageError
from medsclean.seeding import torch_generator

_INIT_STD = 0.01
_INIT_CLIP = 0.03


CNN_WIDTH = 128
"""Decoder width CNN stages are projected to when no width is given."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape and regularisation of a `ReconstructionModel`.

    Attributes:
        group_dims: channel width C_g of each stored reconstruction group, in encoder order.
        n_prefix: number of non-spatial tokens (CLS + registers) leading every group; 0 for CNNs.
        width: decoder width. None uses the common group width directly (ViT backbones);
            required when the group widths differ (CNN stages), in which case every group
            gets its own input and output linear projection.
        depth: number of decoder blocks; split into len(group_dims) consecutive chunks.
        heads: attention heads per decoder block; must divide the decoder width.
        mlp_ratio: hidden width of each block's MLP as a multiple of the decoder width.
        dropout: dropout probability of the bottleneck (its input, hidden and output).
        token_pool: side of the square windows the token grid is averaged over before the
            decoder (1: the encoder's grid; 2: a stride-8 grid becomes stride 16, a quarter of
            the tokens). The model reconstructs the pooled groups and its anomaly map is
            resized back to the encoder's grid, so callers always see H*W tokens.
        eps_attn: added to the linear-attention normaliser so that it never divides by 0.
        ln_eps: LayerNorm epsilon of the decoder blocks.
    """

    group_dims: tuple[int, ...]
    n_prefix: int
    width: int | None = None
    depth: int = DistillConfig.depth
    heads: int = DistillConfig.heads
    mlp_ratio: float = 4.0
    dropout: float = DistillConfig.dropout
    token_pool: int = DistillConfig.token_pool
    eps_attn: float = 1e-6
    ln_eps: float = 1e-8

    def __post_init__(self) -> None:
        object.__setattr__(self, "group_dims", tuple(int(c) for c in self.group_dims))
        if not self.group_dims or min(self.group_dims) < 1:
            raise UsageError(f"group_dims must list at least one positive width, not {self.group_dims}")
        if self.n_prefix < 0:
            raise UsageError(f"n_prefix must be >= 0, not {self.n_prefix}")
        if self.width is None and len(set(self.group_dims)) > 1:
            raise UsageError(
                f"reconstruction groups have different widths {self.group_dims}: set the decoder width explicitly"
            )
        if self.depth < len(self.group_dims):
            raise UsageError(f"depth {self.depth} must be at least the number of groups ({len(self.group_dims)})")
        if self.decoder_width % self.heads:
            raise UsageError(f"heads {self.heads} must divide the decoder width {self.decoder_width}")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"dropout must be in [0, 1), not {self.dropout}")
        if self.token_pool < 1:
            raise UsageError(f"token_pool must be at least 1, not {self.token_pool}")

    @property
    def decoder_width(self) -> int:
        """Width of the bottleneck and decoder tokens."""
        return self.group_dims[0] if self.width is None else self.width

    @property
    def projected(self) -> bool:
        """True when groups are projected into and out of the decoder width."""
        return any(c != self.decoder_width for c in self.group_dims)

    def to_dict(self) -> dict:
        """JSON-able form, the inverse of `from_dict`."""
        return {**asdict(self), "group_dims": list(self.group_dims)}

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        """Rebuild a config written by `to_dict`."""
        return cls(**{**values, "group_dims": tuple(values["group_dims"])})


def decoder_chunks(depth: int, n_groups: int) -> list[range]:
    """Split decoder block indices 0..depth-1 into n_groups consecutive chunks.

    When depth is not a multiple of n_groups the first chunks get one block more.

    Returns:
        n_groups ranges of block indices, first blocks first.
    """
    base, extra = divmod(depth, n_groups)
    chunks, start = [], 0
    for i in range(n_groups):
        size = base + (1 if i < extra else 0)
        chunks.append(range(start, start + size))
        start += size
    return chunks


class LinearAttention(nn.Module):
    """Multi-head kernelised attention with the elu+1 feature map and no softmax.

    Per head, with phi(x) = elu(x) + 1 applied to queries and keys:
    out_l = phi(q_l) . (sum_s phi(k_s) v_s^T) / (phi(q_l) . sum_s phi(k_s) + eps).
    Cost is linear in the number of tokens.
    """

    def __init__(self, width: int, heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"heads {heads} must divide width {width}")
        self.heads = heads
        self.eps = eps
        self.qkv = nn.Linear(width, 3 * width, bias=True)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        """Attend every token to every token.

        Args:
            x: (B, L, width) tokens.

        Returns:
            (B, L, width) attended tokens.
        """
        batch, length, width = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, d)
        q = F.elu(q) + 1.0
        k = F.elu(k) + 1.0
        key_value = k.transpose(-2, -1) @ v  # (B, heads, d, d)
        normaliser = q @ k.sum(dim=2, keepdim=True).transpose(-2, -1)  # (B, heads, L, 1)
        out = (q @ key_value) / (normaliser + self.eps)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class DecoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, ln_eps: float, eps_attn: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, eps=ln_eps)
        self.attn = LinearAttention(width, heads, eps=eps_attn)
        self.norm2 = nn.LayerNorm(width, eps=ln_eps)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, width) -> (B, L, width)."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class NoisyBottleneck(nn.Module):
    """width -> hidden -> width MLP with dropout on its input, hidden and output.

    The dropout on the input is what keeps the decoder from learning an identity map.
    """

    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(width, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, width),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, width) -> (B, L, width)."""
        return self.layers(x)


def square_grid(n_tokens: int, pool: int = 1) -> int:
    """Side H of a square H x H token grid of `n_tokens` tokens, divisible by `pool`.

    Raises:
        ValueError: the tokens do not form such a grid.
    """
    side = math.isqrt(n_tokens)
    if side * side != n_tokens or side % pool:
        raise ValueError(f"{n_tokens} tokens do not form a square grid whose side divides by {pool}")
    return side


def pool_tokens(tokens: Tensor, n_prefix: int, pool: int) -> Tensor:
    """Average the spatial tokens of (B, n_prefix + H*W, C) over pool x pool windows.

    Returns:
        (B, n_prefix + (H/pool)*(W/pool), C), the prefix tokens unchanged, row-major.
    """
    if pool == 1:
        return tokens
    prefix, spatial = tokens[:, :n_prefix], tokens[:, n_prefix:]
    batch, n_tokens, channels = spatial.shape
    side = square_grid(n_tokens, pool)
    grid = spatial.transpose(1, 2).reshape(batch, channels, side, side)
    pooled = F.avg_pool2d(grid, pool).flatten(2).transpose(1, 2)
    return torch.cat([prefix, pooled], dim=1)


def upsample_map(maps: Tensor, pool: int) -> Tensor:
    """(B, h*w) maps on a pooled square grid -> (B, (h*pool)*(w*pool)), bilinear."""
    if pool == 1:
        return maps
    side = square_grid(maps.shape[1])
    grid = maps.reshape(maps.shape[0], 1, side, side)
    return F.interpolate(grid, scale_factor=pool, mode="bilinear", align_corners=False).flatten(1)


def cosine_distance_map(enc_groups: Sequence[Tensor], dec_groups: Sequence[Tensor], n_prefix: int) -> Tensor:
    """Per-token anomaly map: mean over groups of 1 - cos(enc, dec) along channels.

    Args:
        enc_groups: G tensors (B, L, C_g), the targets.
        dec_groups: G tensors (B, L, C_g), the reconstructions.
        n_prefix: leading non-spatial tokens to drop.

    Returns:
        (B, L - n_prefix) float32 map on the token grid, row-major; in [0, 2].
    """
    distances = [
        1.0 - F.cosine_similarity(enc[:, n_prefix:], dec[:, n_prefix:], dim=-1)
        for enc, dec in zip(enc_groups, dec_groups, strict=True)
    ]
    return torch.stack(distances).mean(dim=0)


class ReconstructionModel(nn.Module):
    """Bottleneck + linear-attention decoder reconstructing stored encoder groups.

    Args:
        config: the model's shape.
        seed: seeds the weight initialisation (truncated normal, std 0.01, clipped at
            +-0.03, zero biases, LayerNorms at 1/0). Irrelevant when a state dict is
            loaded afterwards.
    """

    def __init__(self, config: ModelConfig, *, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        width = config.decoder_width
        dims = config.group_dims if config.projected else ()
        # torch's default layer init draws from the global RNG; fork it so that building
        # a model leaves the caller's random stream untouched (every weight is re-drawn below).
        with torch.random.fork_rng(devices=[]):
            self.input_projections = nn.ModuleList(nn.Linear(c, width) for c in dims)
            self.output_projections = nn.ModuleList(nn.Linear(width, c) for c in dims)
            self.bottleneck = NoisyBottleneck(width, 4 * width, config.dropout)
            self.blocks = nn.ModuleList(
                DecoderBlock(width, config.heads, config.mlp_ratio, config.ln_eps, config.eps_attn)
                for _ in range(config.depth)
            )
        self._chunks = decoder_chunks(config.depth, len(config.group_dims))
        self._initialise(torch_generator(seed))

    def _initialise(self, generator: torch.Generator) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(
                    module.weight, std=_INIT_STD, a=-_INIT_CLIP, b=_INIT_CLIP, generator=generator
                )
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _check_groups(self, groups: Sequence[Tensor]) -> None:
        dims = self.config.group_dims
        if len(groups) != len(dims):
            raise ValueError(f"expected {len(dims)} reconstruction groups, got {len(groups)}")
        first = groups[0].shape
        for g, (tensor, dim) in enumerate(zip(groups, dims)):
            if tensor.ndim != 3 or tensor.shape[-1] != dim or tensor.shape[:2] != first[:2]:
                raise ValueError(
                    f"group {g} has shape {tuple(tensor.shape)}, expected (B, L, {dim}) with (B, L)={tuple(first[:2])}"
                )
        if first[1] <= self.config.n_prefix:
            raise ValueError(f"groups have {first[1]} tokens, not more than n_prefix={self.config.n_prefix}")

    def forward(self, groups: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Reconstruct the encoder groups.

        Args:
            groups: G tensors (B, L, C_g), any float dtype, on the model's device;
                L = n_prefix + H*W with the prefix tokens first.

        Returns:
            (enc_groups, dec_groups): two lists of G float32 tensors (B, L', C_g), prefix
            tokens included; L' = L, or n_prefix + H*W / token_pool^2 when the model pools.
            enc_groups are the (pooled) inputs cast to float32 (the targets);
            dec_groups[g] is the mean of decoder chunk G-1-g, projected back to C_g when
            the model projects. Both live in the original channel space, so cosines
            compare like with like for every backbone.
        """
        self._check_groups(groups)
        enc_groups = [pool_tokens(g.float(), self.config.n_prefix, self.config.token_pool) for g in groups]
        if self.config.projected:
            decoder_in = [proj(g) for proj, g in zip(self.input_projections, enc_groups)]
        else:
            decoder_in = enc_groups
        x = self.bottleneck(torch.stack(decoder_in).mean(dim=0))
        block_outputs = []
        for block in self.blocks:
            x = block(x)
            block_outputs.append(x)
        n_groups = len(enc_groups)
        dec_groups = []
        for g in range(n_groups):
            chunk = self._chunks[n_groups - 1 - g]
            reconstruction = torch.stack([block_outputs[i] for i in chunk]).mean(dim=0)
            if self.config.projected:
                reconstruction = self.output_projections[g](reconstruction)
            dec_groups.append(reconstruction)
        return enc_groups, dec_groups

    def anomaly_map(self, groups: Sequence[Tensor]) -> Tensor:
        """Token-grid anomaly map of each image (no resize, no blur).

        Args:
            groups: as for `forward`.

        Returns:
            (B, H*W) float32, mean over groups of 1 - cos along channels, prefix tokens
            dropped; row-major over the token grid.
        """
        enc_groups, dec_groups = self(groups)
        return upsample_map(cosine_distance_map(enc_groups, dec_groups, self.config.n_prefix), self.config.token_pool)
