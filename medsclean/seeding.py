"""Seeded random generators: the one rule by which a seed and names become a random stream.

A generator is keyed by a seed and further parts (class names, splits, indices). Strings become
integers through `stable_id`, the same in every process and on every machine (unlike `hash`),
and the key seeds NumPy's `SeedSequence`, so each (seed, parts) key has its own independent
stream and a stream never depends on how many other streams were drawn.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def stable_id(text: str) -> int:
    """The CRC-32 of the UTF-8 bytes of `text`: a 32-bit id, equal in every process."""
    return zlib.crc32(text.encode("utf-8"))


def stable_id64(text: str) -> int:
    """A 64-bit id of `text` (BLAKE2b, little-endian), equal in every process.

    Only for the memory bank streams, which have always been keyed by this id; new streams use
    `stable_id` (through `rng`'s string parts).
    """
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _entropy(part: int | str) -> int:
    if isinstance(part, str):
        return stable_id(part)
    if isinstance(part, (int, np.integer)) and not isinstance(part, bool):
        return int(part)
    raise TypeError(f"a seed part must be a str or an int, not {type(part).__name__}")


def rng(seed: int, *parts: int | str) -> np.random.Generator:
    """The NumPy generator of `SeedSequence([seed, *parts])`, string parts replaced by `stable_id`.

    Args:
        seed: non-negative run seed.
        parts: non-negative integers or strings that name the stream (class, split, index).
    """
    return np.random.default_rng(np.random.SeedSequence([_entropy(seed), *map(_entropy, parts)]))


def torch_generator(seed: int) -> torch.Generator:
    """A new CPU `torch.Generator` seeded with `seed`; the global generator is left alone."""
    import torch

    return torch.Generator().manual_seed(seed)


def seed_torch(seed: int, cuda_device: int | None = None) -> None:
    """Seed torch's global CPU generator and, given its index, that CUDA device's generator."""
    import torch

    torch.default_generator.manual_seed(seed)
    if cuda_device is not None:
        with torch.cuda.device(cuda_device):
            torch.cuda.manual_seed(seed)
