import json

import pytest
import torch

from medsclean.workdir import store as store_mod
from medsclean.errors import DataError, UsageError
from medsclean.workdir.artifacts import digest, load_tensors
from medsclean.workdir.store import Store


def test_round_trip_and_cache_key(tmp_path):
    st = Store(tmp_path / "work")
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64)}
    art = st.write_stage("score", "k1", {"scores.safetensors": tensors}, {"config": {"x": 1}},
                        extra_files={"scores.csv": "path,score\n"})
    assert art.path == tmp_path / "work" / "score" / "k1"
    assert st.load("score").key == "k1"  # the stage's latest
    loaded = art.tensors("scores.safetensors")
    assert torch.equal(loaded["a"], tensors["a"]) and torch.equal(loaded["b"], tensors["b"])
    manifest = json.loads((art.path / "manifest.json").read_text())
    assert manifest["key"] == "k1" and manifest["tensors"]["scores.safetensors"]["a"] == {"shape": [3, 4],
                                                                                          "dtype": "float32"}
    assert "torch" in manifest["versions"]
    assert st.cached("score", "k1") is not None
    assert st.cached("score", "k2") is None
    assert (art.path / "scores.csv").read_text() == "path,score\n"


def test_digest_is_order_independent_for_keys_and_sensitive_to_values():
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})


def test_failed_write_leaves_previous_artifact_intact(tmp_path, monkeypatch):
    st = Store(tmp_path / "work")
    st.write_stage("score", "old", {"s.safetensors": {"x": torch.zeros(2)}}, {})
    calls = {"n": 0}
    real_save = store_mod.save_tensors

    def failing_save(path, tensors, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (injected)")
        real_save(path, tensors, metadata)

    monkeypatch.setattr(store_mod, "save_tensors", failing_save)
    with pytest.raises(OSError, match="injected"):
        st.write_stage("score", "new", {"s.safetensors": {"x": torch.ones(2)}, "t.safetensors": {"y": torch.ones(1)}},
                      {})
    art = st.load("score")
    assert art.key == "old" and torch.equal(art.tensors("s.safetensors")["x"], torch.zeros(2))
    assert not [p for p in (tmp_path / "work").iterdir() if p.name.startswith(".staging")]


def test_half_written_folder_without_manifest_is_not_an_artifact(tmp_path):
    st = Store(tmp_path / "work")
    (tmp_path / "work" / "extract").mkdir()
    (tmp_path / "work" / "extract" / "part-0000000.safetensors").write_bytes(b"junk")
    assert st.load("extract") is None
    (tmp_path / "work" / "extract" / "manifest.json").write_text("{ truncated")
    assert st.load("extract") is None


def test_work_folder_inside_images_is_refused(tmp_path):
    (tmp_path / "imgs").mkdir()
    with pytest.raises(UsageError, match="inside the image folder"):
        Store(tmp_path / "imgs" / "work", images_root=tmp_path / "imgs")


def test_load_tensors_names_a_corrupt_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(DataError, match="bad.safetensors"):
        load_tensors(bad)
