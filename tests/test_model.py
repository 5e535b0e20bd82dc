"""ReconstructionModel and LinearAttention against explicit references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from medsclean.errors import UsageError
from medsclean.model.decoder import LinearAttention, ModelConfig, ReconstructionModel, decoder_chunks



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run faster on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_groups(dims, n_prefix, n_patches=16, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, n_prefix + n_patches, c, generator=gen).half() for c in dims]


def _naive_linear_attention(module: LinearAttention, x: torch.Tensor) -> np.ndarray:
    """Token-by-token double loop in float64.

    out_l = sum_s (phi(q_l).phi(k_s)) v_s / (sum_s phi(q_l).phi(k_s) + eps), then the output projection.
    """
    w_qkv = module.qkv.weight.detach().double().numpy()
    b_qkv = module.qkv.bias.detach().double().numpy()
    w_proj = module.proj.weight.detach().double().numpy()
    b_proj = module.proj.bias.detach().double().numpy()
    tokens = x.double().numpy()
    batch, length, width = tokens.shape
    heads, dim = module.heads, width // module.heads

    def phi(values):
        return np.where(values > 0, values + 1.0, np.exp(values))

    out = np.zeros_like(tokens)
    for b in range(batch):
        qkv = tokens[b] @ w_qkv.T + b_qkv
        q, k, v = qkv[:, :width], qkv[:, width : 2 * width], qkv[:, 2 * width :]
        attended = np.zeros((length, width))
        for h in range(heads):
            cols = slice(h * dim, (h + 1) * dim)
            for l in range(length):
                numerator = np.zeros(dim)
                denominator = 0.0
                for s in range(length):
                    similarity = float(phi(q[l, cols]) @ phi(k[s, cols]))
                    numerator += similarity * v[s, cols]
                    denominator += similarity
                attended[l, cols] = numerator / (denominator + module.eps)
        out[b] = attended @ w_proj.T + b_proj
    return out


def test_linear_attention_matches_naive_double_loop():
    torch.manual_seed(0)
    module = LinearAttention(width=8, heads=2, eps=1e-6)
    with torch.no_grad():  # larger weights than the default init, so the test sees real mixing
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.5)
    x = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(1))
    got = module(x).detach().double().numpy()
    np.testing.assert_allclose(got, _naive_linear_attention(module, x), rtol=1e-4, atol=1e-5)


def test_decoder_chunks_split_consecutively():
    assert decoder_chunks(8, 2) == [range(0, 4), range(4, 8)]
    assert decoder_chunks(5, 2) == [range(0, 3), range(3, 5)]
    assert decoder_chunks(3, 3) == [range(0, 1), range(1, 2), range(2, 3)]


def test_vit_like_shapes_and_no_projections():
    config = ModelConfig(group_dims=(48, 48), n_prefix=5, depth=4, heads=4)
    model = ReconstructionModel(config, seed=0)
    groups = _random_groups((48, 48), n_prefix=5)
    enc, dec = model(groups)
    assert [t.shape for t in enc] == [torch.Size([2, 21, 48])] * 2
    assert [t.shape for t in dec] == [torch.Size([2, 21, 48])] * 2
    assert all(t.dtype == torch.float32 for t in enc + dec)
    assert len(model.input_projections) == 0 and len(model.output_projections) == 0
    assert model.anomaly_map(groups).shape == (2, 16)


def test_cnn_like_shapes_project_back_to_group_widths():
    config = ModelConfig(group_dims=(40, 112), n_prefix=0, width=64, depth=4, heads=4)
    model = ReconstructionModel(config, seed=0)
    groups = _random_groups((40, 112), n_prefix=0)
    enc, dec = model(groups)
    assert [tuple(t.shape) for t in enc] == [(2, 16, 40), (2, 16, 112)]
    assert [tuple(t.shape) for t in dec] == [(2, 16, 40), (2, 16, 112)]
    assert [m.in_features for m in model.input_projections] == [40, 112]
    assert [m.out_features for m in model.output_projections] == [40, 112]
    assert model.anomaly_map(groups).shape == (2, 16)


def _capture(model: ReconstructionModel):
    captured = {"blocks": []}
    model.bottleneck.register_forward_pre_hook(lambda m, args: captured.__setitem__("bottleneck_in", args[0]))
    for block in model.blocks:
        block.register_forward_hook(lambda m, args, out: captured["blocks"].append(out))
    return captured


def test_decoder_groups_pair_in_reverse_and_input_is_mean_of_groups():
    model = ReconstructionModel(ModelConfig((24, 24), n_prefix=1, depth=4, heads=2), seed=3).eval()
    captured = _capture(model)
    groups = _random_groups((24, 24), n_prefix=1)
    enc, dec = model(groups)
    blocks = captured["blocks"]
    torch.testing.assert_close(captured["bottleneck_in"], (groups[0].float() + groups[1].float()) / 2)
    torch.testing.assert_close(dec[0], (blocks[2] + blocks[3]) / 2)  # encoder group 0 <-> last chunk
    torch.testing.assert_close(dec[1], (blocks[0] + blocks[1]) / 2)
    torch.testing.assert_close(enc[0], groups[0].float())


def test_projected_decoder_input_and_output():
    model = ReconstructionModel(ModelConfig((8, 12), n_prefix=0, width=16, depth=2, heads=2), seed=1).eval()
    captured = _capture(model)
    groups = _random_groups((8, 12), n_prefix=0)
    _, dec = model(groups)
    projected = [proj(g.float()) for proj, g in zip(model.input_projections, groups)]
    torch.testing.assert_close(captured["bottleneck_in"], (projected[0] + projected[1]) / 2)
    blocks = captured["blocks"]
    torch.testing.assert_close(dec[0], model.output_projections[0](blocks[1]))
    torch.testing.assert_close(dec[1], model.output_projections[1](blocks[0]))


def test_anomaly_map_is_mean_cosine_distance_on_spatial_tokens():
    model = ReconstructionModel(ModelConfig((16, 16), n_prefix=2, depth=2, heads=2), seed=2).eval()
    groups = _random_groups((16, 16), n_prefix=2, n_patches=9)
    enc, dec = (list(map(lambda t: t.detach().double().numpy(), ts)) for ts in model(groups))
    expected = np.zeros((2, 9))
    for e, d in zip(enc, dec):
        for b in range(2):
            for p in range(9):
                u, v = e[b, 2 + p], d[b, 2 + p]
                expected[b, p] += (1.0 - u @ v / (np.linalg.norm(u) * np.linalg.norm(v))) / 2
    got = model.anomaly_map(groups).detach().double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_initialisation_is_seeded_truncated_normal():
    config = ModelConfig((64, 64), n_prefix=0, depth=2, heads=4)
    model = ReconstructionModel(config, seed=7)
    weights = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, nn.Linear)])
    assert weights.abs().max() <= 0.03
    # a N(0, 0.01) truncated at 3 sigma has std 0.01 * sqrt(1 - 6 phi(3) / (2 Phi(3) - 1)) ~ 0.00986
    expected_std = 0.01 * math.sqrt(1 - 6 * math.exp(-4.5) / math.sqrt(2 * math.pi) / math.erf(3 / math.sqrt(2)))
    assert weights.std().item() == pytest.approx(expected_std, rel=0.02)
    assert all(m.bias.abs().sum() == 0 for m in model.modules() if isinstance(m, nn.Linear))
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) and m.eps == 1e-8 for m in norms)
    same = ReconstructionModel(config, seed=7).state_dict()
    other = ReconstructionModel(config, seed=8).state_dict()
    assert all(torch.equal(v, same[k]) for k, v in model.state_dict().items())
    assert not torch.equal(model.blocks[0].attn.qkv.weight, other["blocks.0.attn.qkv.weight"])


def test_dropout_only_in_training_mode():
    model = ReconstructionModel(ModelConfig((16, 16), n_prefix=0, depth=2, heads=2), seed=0)
    groups = _random_groups((16, 16), n_prefix=0)
    model.train()
    assert not torch.equal(model.anomaly_map(groups), model.anomaly_map(groups))
    model.eval()
    assert torch.equal(model.anomaly_map(groups), model.anomaly_map(groups))


def test_config_rejects_ambiguous_or_impossible_shapes():
    with pytest.raises(UsageError, match="width"):
        ModelConfig((40, 112), n_prefix=0)
    with pytest.raises(UsageError, match="heads"):
        ModelConfig((48, 48), n_prefix=0, heads=5)
    with pytest.raises(UsageError, match="depth"):
        ModelConfig((8, 8, 8), n_prefix=0, depth=2, heads=2)
    config = ModelConfig([40, 112], n_prefix=0, width=64, heads=4)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.projected and not ModelConfig((32, 32), n_prefix=0, heads=4).projected


def test_token_pool_averages_windows_and_resizes_the_map_back():
    from medsclean.model.decoder import pool_tokens, upsample_map

    # A 4x4 grid of 2 channels plus one prefix token: pooling 2x2 averages each window by hand.
    grid = torch.arange(32, dtype=torch.float32).reshape(1, 16, 2)
    tokens = torch.cat([torch.full((1, 1, 2), -7.0), grid], dim=1)
    pooled = pool_tokens(tokens, n_prefix=1, pool=2)
    assert pooled.shape == (1, 5, 2)
    assert torch.equal(pooled[0, 0], torch.tensor([-7.0, -7.0]))
    channel0 = grid[0, :, 0].reshape(4, 4)
    expected = torch.tensor([channel0[:2, :2].mean(), channel0[:2, 2:].mean(),
                             channel0[2:, :2].mean(), channel0[2:, 2:].mean()])
    assert torch.allclose(pooled[0, 1:, 0], expected)
    # A constant map stays constant when resized back; the size is the encoder grid's.
    assert torch.allclose(upsample_map(torch.full((3, 4), 0.25), 2), torch.full((3, 16), 0.25))
    with pytest.raises(ValueError, match="square grid"):
        pool_tokens(torch.zeros(1, 15, 2), n_prefix=0, pool=2)


def test_pooled_model_reconstructs_the_pooled_groups_and_maps_the_full_grid():
    config = ModelConfig(group_dims=(6, 10), n_prefix=0, width=8, depth=2, heads=2, token_pool=2)
    model = ReconstructionModel(config, seed=0).eval()
    groups = [torch.randn(3, 64, 6), torch.randn(3, 64, 10)]
    enc, dec = model(groups)
    assert [tuple(t.shape) for t in enc] == [(3, 16, 6), (3, 16, 10)]
    assert [tuple(t.shape) for t in dec] == [(3, 16, 6), (3, 16, 10)]
    maps = model.anomaly_map(groups)
    assert maps.shape == (3, 64)
    # Each 2x2 window of the full map interpolates the pooled map: its window means are close to it.
    from medsclean.model.decoder import cosine_distance_map, pool_tokens

    coarse = cosine_distance_map(enc, dec, 0)
    window_means = pool_tokens(maps.unsqueeze(-1), 0, 2).squeeze(-1)
    assert torch.allclose(window_means.mean(dim=1), coarse.mean(dim=1), atol=1e-5)
    # The unpooled model of the same seed sees every token.
    plain = ReconstructionModel(ModelConfig(group_dims=(6, 10), n_prefix=0, width=8, depth=2, heads=2), seed=0)
    assert plain(groups)[0][0].shape == (3, 64, 6)
