"""medsclean.seeding: the documented derivations of every seeded stream, which must never change."""

from __future__ import annotations

import hashlib
import zlib

import numpy as np
import pytest
import torch

from medsclean import seeding
from medsclean.step1 import banks
from medsclean.demo import noisy
from medsclean.demo import good_images


def _same(a: np.random.Generator, b: np.random.Generator) -> bool:
    return np.array_equal(a.integers(0, 2**63, 16), b.integers(0, 2**63, 16))


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**40])
def test_rng_is_a_seed_sequence_of_the_seed_and_crc32_of_strings(seed):
    expected = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32("ünï".encode()), 7]))
    assert _same(seeding.rng(seed, "ünï", 7), expected)
    same_as_list = np.random.default_rng([seed, seeding.stable_id("ünï"), 7])
    assert _same(seeding.rng(np.int64(seed), "ünï", np.uint8(7)), same_as_list)
    assert not _same(seeding.rng(seed, "a"), seeding.rng(seed, "b"))


@pytest.mark.parametrize("label", ["brick", "ünïcode", 3, ""])
def test_call_sites_keep_their_streams(label):
    blake = int.from_bytes(hashlib.blake2b(str(label).encode(), digest_size=8).digest(), "little")
    assert _same(banks.class_generator(5, label), np.random.default_rng([5, blake]))
    text = str(label)
    crc = zlib.crc32(text.encode())
    assert _same(noisy.class_rng(5, text), np.random.default_rng(np.random.SeedSequence([5, crc])))
    split = zlib.crc32(b"test/crack")
    assert _same(good_images.image_rng(5, text, "test/crack", 2), np.random.default_rng([5, crc, split, 2]))


@pytest.mark.parametrize("part", [1.5, True, None])
def test_rng_refuses_other_parts(part):
    with pytest.raises(TypeError):
        seeding.rng(0, part)


def test_torch_helpers():
    assert torch.equal(torch.randn(4, generator=seeding.torch_generator(3)),
                       torch.randn(4, generator=torch.Generator().manual_seed(3)))
    with torch.random.fork_rng(devices=[]):
        seeding.seed_torch(11)
        first = torch.rand(3)
        torch.manual_seed(11)
        assert torch.equal(first, torch.rand(3))
