"""The exact engine as (query block x key chunk) tasks, and features read from the artifact's shards.

Oracles: the one-pass exact engine (bit for bit under the same block plan) and the tensors the
artifact was written from.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsclean.config import ScoreConfig
from medsclean.step1.banks import draw_banks, member_table
from medsclean.step1.classes import score_classes
from medsclean.step1.engines.blocked import (BlockJob, TaskSpread, block_tasks, key_chunk_images, memory_scores_blocked,
                                             merge_partials, partial_bank_distances)
from medsclean.step1.engines.exact import memory_scores_exact
from medsclean.step1.plan import plan_exact_blocks
from medsclean.step1.rows import TensorRows
from medsclean.workdir.store import Store
from tests.test_memory import random_features


@pytest.mark.parametrize("n,patches,dim,k,leave_self_out,banks,ratio,block_bytes", [
    (300, 36, 32, 1, True, 100, 0.1, None),
    (300, 36, 32, 1, True, 100, 0.1, 4 << 20),
    (150, 16, 32, 3, True, 40, 0.1, 4 << 20),
    (120, 9, 16, 1, False, 20, 0.05, 1 << 20),
    (40, 4, 8, 2, True, 7, 0.05, 1 << 18),  # small banks, some of a single image (skipped for that image)
])
@pytest.mark.parametrize("chunks", [1, 2, 5])
def test_blocked_engine_equals_the_one_pass_engine_bit_for_bit(n, patches, dim, k, leave_self_out, banks, ratio,
                                                               block_bytes, chunks):
    features = torch.as_tensor(random_features(n, patches, dim, seed=n + k)).half()
    bank_table = draw_banks(n, banks, ratio, replace=True, generator=np.random.default_rng(k))
    one_pass = memory_scores_exact(features, bank_table, k=k, leave_self_out=leave_self_out,
                                   max_block_bytes=block_bytes)
    blocked = memory_scores_blocked(TensorRows(features), bank_table, k=k, leave_self_out=leave_self_out,
                                    max_block_bytes=block_bytes, spread=TaskSpread(key_chunks=chunks))
    assert torch.equal(blocked, one_pass)


def _brute_force(features: np.ndarray, banks: np.ndarray, k: int) -> np.ndarray:
    """Leave-self-out maps from the definitions: per bank, the mean of the k smallest cosine distances
    to the distinct other members' patches; banks with no other member skipped; an image no bank
    scores gets the k nearest patches of every other image instead."""
    n, p, _ = features.shape
    f = features.astype(np.float64)
    maps = np.zeros((n, p))
    for i in range(n):
        scores = []
        for bank in banks:
            others = np.setdiff1d(np.unique(bank), [i])
            if len(others):
                distances = 1.0 - f[i] @ f[others].reshape(-1, f.shape[2]).T
                scores.append(np.sort(distances, axis=1)[:, :k].mean(axis=1))
        if not scores:
            distances = 1.0 - f[i] @ np.delete(f, i, axis=0).reshape(-1, f.shape[2]).T
            scores = [np.sort(distances, axis=1)[:, :k].mean(axis=1)]
        maps[i] = np.mean(scores, axis=0)
    return maps


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("chunks", [1, 3])
def test_images_no_bank_scores_fall_back_to_every_other_image_in_both_engines(k, chunks):
    """Every bank holds only image 7 (twice, as with replacement): leave-self-out skips them all for
    image 7, which is then scored against every other image; the others are scored by the banks."""
    features = torch.as_tensor(random_features(30, 9, 16, seed=5))
    bank_table = np.full((6, 2), 7, dtype=np.int64)
    expected = torch.as_tensor(_brute_force(features.numpy(), bank_table, k), dtype=torch.float32)
    one_pass = memory_scores_exact(features, bank_table, k=k, max_block_bytes=1 << 14)
    blocked = memory_scores_blocked(TensorRows(features), bank_table, k=k, max_block_bytes=1 << 14,
                                    spread=TaskSpread(key_chunks=chunks))
    assert torch.equal(blocked, one_pass)
    assert torch.allclose(one_pass, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(one_pass[7], one_pass[8])  # image 7's row is the fallback's, finite
    assert torch.isfinite(one_pass).all()


def test_tasks_cover_every_pair_once_and_key_chunks_are_whole_database_blocks():
    plan = plan_exact_blocks(300, 36, n_banks=100, bank_width=30, max_block_bytes=4 << 20)
    key_images = key_chunk_images(300, plan, 3)
    assert key_images % plan.database_images == 0
    tasks = block_tasks(300, plan, key_images)
    pairs = {(q, c) for t in tasks for q in range(*t.query) for c in range(*t.keys)}
    assert len(pairs) == 300 * 300 and len(tasks) == len({(t.query, t.keys) for t in tasks})
    with pytest.raises(ValueError, match="whole database blocks"):
        block_tasks(300, plan, plan.database_images + 1)


def test_the_min_reduction_does_not_depend_on_the_order_of_the_parts():
    features = torch.as_tensor(random_features(60, 9, 16, seed=4))
    bank_table = draw_banks(60, 12, 0.2, replace=True, generator=np.random.default_rng(0))
    plan = plan_exact_blocks(60, 9, n_banks=12, bank_width=12, block_images=60, max_block_bytes=1 << 16)
    job = BlockJob(TensorRows(features), member_table(bank_table, pad_index=60), 2, True, plan)
    parts = [partial_bank_distances(job, t) for t in block_tasks(60, plan, key_chunk_images(60, plan, 4))]
    assert len(parts) >= 3
    forward = backward = None
    for part in parts:
        forward = merge_partials(forward, part)
    for part in reversed(parts):
        backward = merge_partials(backward, part)
    assert torch.equal(forward, backward)


def _write_features(tmp_path, features: torch.Tensor, shard_size: int):
    """A features artifact with `shard_size` images per shard (the layout extract writes)."""
    store = Store(tmp_path / "work")
    n = features.shape[0]
    shards, specs = [], {}
    with store.staged("extract") as staging:
        from medsclean.workdir.artifacts import save_tensors, tensor_specs

        for s in range(0, n, shard_size):
            e = min(n, s + shard_size)
            tensors = {"index": torch.arange(s, e), "memory": features[s:e].contiguous()}
            name = f"part-{s:07d}.safetensors"
            save_tensors(staging / name, tensors)
            specs[name] = tensor_specs(tensors)
            shards.append({"file": name, "start": s, "end": e, "rows": e - s})
        return store.commit("extract", "k" * 16, staging, {"shards": shards, "tensors": specs, "images": []})


def test_sharded_rows_read_only_what_is_asked_and_equal_the_stored_tensors(tmp_path):
    features = torch.as_tensor(random_features(50, 4, 8, seed=1)).half()
    art = _write_features(tmp_path, features, shard_size=16)
    rows = art.rows("memory")
    assert rows.shape == (50, 4, 8) and torch.equal(rows.load(), features)
    assert torch.equal(rows.read(10, 35), features[10:35])  # across two shard boundaries
    picked = np.array([3, 17, 18, 40, 2])
    subset = rows.subset(picked)
    assert torch.equal(subset.load(), features[picked]) and torch.equal(subset.read(1, 4), features[picked[1:4]])
    import pickle

    assert torch.equal(pickle.loads(pickle.dumps(subset)).load(), features[picked])


def test_score_classes_from_sharded_rows_equals_the_tensor(tmp_path):
    features = torch.as_tensor(random_features(70, 9, 16, seed=2)).half()
    classes = ["a", "b"] * 35  # interleaved: each class reads every other row of each shard
    art = _write_features(tmp_path, features, shard_size=16)
    for engine in ("exact", "approx"):
        cfg = ScoreConfig(banks=8, engine=engine, seed=1)
        from_disk, banks = score_classes(art.rows("memory"), classes, cfg)
        in_memory, banks_again = score_classes(features, classes, cfg)
        assert torch.equal(from_disk, in_memory)
        assert all(torch.equal(banks[c], banks_again[c]) for c in banks)
    # streamed: key chunks read from the shards as the tasks need them
    positions = np.flatnonzero(np.array(classes) == "a")
    bank_table = banks["a"].numpy() // 2  # positions of class a's images within the class
    streamed = memory_scores_blocked(art.rows("memory").subset(positions), bank_table, spread=TaskSpread(key_images=10),
                                     max_block_bytes=1 << 16)
    one_pass = memory_scores_exact(features[positions], bank_table, max_block_bytes=1 << 16)
    assert torch.equal(streamed, one_pass)
