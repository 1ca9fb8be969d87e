"""ConvVAE shapes and determinism; the safetensors model file: round trip and everything it must refuse."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from helpers import PACKAGE
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from imganom.config import ModelConfig, load_config
from imganom.formats.modelfile import (
    FORMAT_VERSION,
    ModelFileError,
    load_model,
    read_meta,
    resolve_model_path,
    save_model,
    update_calibration,
)
from imganom.models.vae import ConvVAE, kl_divergence


def _mcfg(latent: str = "dense", **kw) -> ModelConfig:
    return ModelConfig(depth=3, base_channels=8, max_channels=32, latent=latent, latent_dim=6, **kw)


@pytest.mark.parametrize("latent", ["dense", "spatial"])
@pytest.mark.parametrize("channels", [1, 3, 5])
@pytest.mark.parametrize("size", [(32, 32), (32, 64), (48, 16)])
def test_output_shapes(latent: str, channels: int, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    m = ConvVAE(_mcfg(latent), channels, size).eval()
    x = torch.rand(2, channels, *size)
    with torch.no_grad():
        out = m(x)
    assert out.recon.shape == (2, channels, *size)
    assert out.recon.min() >= 0 and out.recon.max() <= 1
    if latent == "dense":
        assert out.mu.shape == (2, 6)
    else:
        assert out.mu.shape == (2, 6, size[0] // 8, size[1] // 8)
    assert out.logvar.shape == out.mu.shape
    assert m.bottom == (32, size[0] // 8, size[1] // 8)


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
@pytest.mark.parametrize("activation", ["leaky_relu", "relu", "silu"])
def test_norm_and_activation_variants_run(norm: str, activation: str) -> None:
    m = ConvVAE(_mcfg(norm=norm, activation=activation), 1, (16, 24))
    out = m(torch.rand(3, 1, 16, 24))
    out.recon.mean().backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("latent", ["dense", "spatial"])
def test_eval_decodes_the_mean_deterministically(latent: str) -> None:
    torch.manual_seed(1)
    m = ConvVAE(_mcfg(latent), 3, (32, 32))
    x = torch.rand(4, 3, 32, 32)
    m.train()
    m(x)  # move batch-norm running stats away from their init
    m.eval()
    with torch.no_grad():
        a, b = m(x), m(x)
        assert torch.equal(a.recon, b.recon)
        mu, _ = m.encode(x)
        assert torch.equal(a.recon, m.decode(mu))
        # sampling on request draws different latents
        s1, s2 = m(x, sample=True), m(x, sample=True)
    assert not torch.equal(s1.recon, s2.recon)
    # training mode samples by default
    m.train()
    with torch.no_grad():
        t1, t2 = m(x), m(x)
    assert not torch.equal(t1.recon, t2.recon)


def test_sample_with_generator_is_reproducible() -> None:
    mu, logvar = torch.zeros(2, 5), torch.zeros(2, 5)
    a = ConvVAE.sample(mu, logvar, torch.Generator().manual_seed(3))
    b = ConvVAE.sample(mu, logvar, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.abs().sum() > 0


def test_kl_divergence() -> None:
    assert torch.equal(kl_divergence(torch.zeros(2, 4), torch.zeros(2, 4)), torch.zeros(2))
    kl = kl_divergence(torch.ones(1, 4), torch.zeros(1, 4))
    assert torch.allclose(kl, torch.tensor([2.0]))  # 0.5 * sum(mu^2)


@pytest.mark.parametrize("size", [(30, 32), (32, 20), (4, 4)])
def test_bad_size_raises(size: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="multiples of 2\\*\\*depth"):
        ConvVAE(_mcfg(), 1, size)


# ------------------------------------------------------------------------------------------- model file


def _tiny_model(channels: int = 1, seed: int = 0) -> tuple[ConvVAE, object]:
    cfg = load_config("tiny", {"preprocess": {"size": [32, 32], "channels": channels}})
    torch.manual_seed(seed)
    m = ConvVAE(cfg.model, channels, cfg.preprocess.size)
    m.train()
    m(torch.rand(4, channels, 32, 32))  # non-trivial batch-norm buffers
    return m.eval(), cfg


def test_round_trip_is_bit_identical(tmp_path: Path) -> None:
    m, cfg = _tiny_model(channels=3)
    cal = {"image_threshold": 0.5, "pixel_threshold": 0.25, "nested": {"a": [1, 2]}}
    stats = {"map_mean": torch.rand(32, 32)}
    p = tmp_path / "m.safetensors"
    meta = save_model(p, m, cfg, training={"epochs": 3}, calibration=cal, stats=stats)
    m2, meta2, stats2 = load_model(tmp_path / "m.safetensors")
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd[k].dtype == sd2[k].dtype, k
        assert torch.equal(sd[k], sd2[k]), k
    assert not m2.training
    assert meta2.config == cfg.model_dump(mode="json") and meta2.cfg == cfg
    assert meta2.size == (32, 32) and meta2.in_channels == 3
    assert meta2.training == {"epochs": 3} and meta2.calibration == cal
    assert meta2.model_id == meta.model_id and len(meta.model_id) == 16
    assert {"imganom", "torch", "numpy", "python"} <= set(meta2.versions)
    assert meta2.format_version == FORMAT_VERSION
    assert torch.equal(stats2["map_mean"], stats["map_mean"])
    # the loaded model computes exactly what the saved one did
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x).recon, m2(x).recon)
    # read_meta gives the same metadata without loading weights; a run directory resolves to its model
    assert read_meta(tmp_path / "m.safetensors") == meta2
    (tmp_path / "run").mkdir()
    save_model(tmp_path / "run" / "model.safetensors", m, cfg)
    assert resolve_model_path(tmp_path / "run") == tmp_path / "run" / "model.safetensors"
    assert load_model(tmp_path / "run")[1].model_id == meta.model_id


def test_model_id_depends_on_weights(tmp_path: Path) -> None:
    a, cfg = _tiny_model(seed=0)
    b, _ = _tiny_model(seed=1)
    id_a = save_model(tmp_path / "a.safetensors", a, cfg).model_id
    assert id_a != save_model(tmp_path / "b.safetensors", b, cfg).model_id
    assert save_model(tmp_path / "a2.safetensors", a, cfg).model_id == id_a  # same weights, same id
    assert read_meta(tmp_path / "a.safetensors").model_id == id_a


def test_update_calibration_keeps_weights(tmp_path: Path) -> None:
    m, cfg = _tiny_model()
    p = tmp_path / "m.safetensors"
    meta = save_model(p, m, cfg, training={"epochs": 1})
    new = update_calibration(p, {"image_threshold": 1.5, "pixel_threshold": 0.5}, {"x": torch.ones(2)})
    assert new.model_id == meta.model_id and new.training == {"epochs": 1}
    m2, meta2, stats = load_model(p)
    assert meta2.calibration["image_threshold"] == 1.5 and torch.equal(stats["x"], torch.ones(2))
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in m.state_dict().items())
    assert [q.name for q in tmp_path.iterdir()] == ["m.safetensors"]  # no temp files left behind


def test_file_is_plain_safetensors(tmp_path: Path) -> None:
    m, cfg = _tiny_model()
    p = tmp_path / "m.safetensors"
    save_model(p, m, cfg)
    raw = p.read_bytes()
    assert raw[:1] != b"\x80" and raw[:2] != b"PK"  # neither a pickle nor a torch zip archive
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["imganom"])
    assert meta["format"] == "imganom-model"
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert all(k.startswith(("vae.", "stats.")) for k in tensors)
    # the data section is exactly the tensors' bytes: nothing else is hidden in the file
    assert max(v["data_offsets"][1] for v in tensors.values()) == len(raw) - 8 - n


def test_library_never_unpickles() -> None:
    bad = ("torch.load(", "pickle.load", "allow_pickle=True", "joblib")
    for src in PACKAGE.rglob("*.py"):
        text = src.read_text()
        for b in bad:
            assert b not in text, f"{src.name} contains {b!r}"


def _resave(src: Path, dst: Path, edit) -> None:
    """Copy a model file with its tensors and an edited metadata dict."""
    with safe_open(str(src), framework="pt") as f:
        md = dict(f.metadata())
    d = json.loads(md["imganom"])
    edit(d)
    md["imganom"] = json.dumps(d)
    save_file(load_file(str(src)), str(dst), metadata=md)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    m, cfg = _tiny_model()
    p = tmp_path / "good.safetensors"
    save_model(p, m, cfg)
    return p


def test_refuses_foreign_safetensors(tmp_path: Path) -> None:
    p = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(p), metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match="no imganom metadata"):
        load_model(p)


def test_refuses_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "nope.safetensors")
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path)  # a folder without model.safetensors


def test_refuses_corrupted_weights(saved: Path) -> None:
    raw = bytearray(saved.read_bytes())
    raw[-40:-8] = bytes(b ^ 0x5A for b in raw[-40:-8])  # flip bits inside the last tensor's data
    saved.write_bytes(bytes(raw))
    read_meta(saved)  # header still parses
    with pytest.raises(ModelFileError, match="checksum"):
        load_model(saved)


@pytest.mark.parametrize("cut", [4, 100, -50])
def test_refuses_truncated_file(saved: Path, cut: int) -> None:
    raw = saved.read_bytes()
    saved.write_bytes(raw[:cut])
    with pytest.raises(ModelFileError, match="not a readable safetensors|cannot read weights"):
        load_model(saved)


def test_refuses_garbage_bytes(tmp_path: Path) -> None:
    p = tmp_path / "junk.safetensors"
    p.write_bytes(b"\x00\x01not a model at all" * 10)
    with pytest.raises(ModelFileError, match="not a readable safetensors"):
        load_model(p)


def test_refuses_pickle_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    p = tmp_path / "evil.safetensors"
    p.write_bytes(pickle.dumps({"state_dict": Evil()}))
    with pytest.raises(ModelFileError):
        load_model(p)
    assert not marker.exists()


def test_refuses_size_mismatch(saved: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    _resave(saved, bad, lambda d: d.update(size=[64, 64]))
    with pytest.raises(ModelFileError, match=r"metadata says size \(64, 64\)"):
        load_model(bad)


def test_refuses_config_not_matching_weights(saved: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    _resave(saved, bad, lambda d: d["config"]["model"].update(latent_dim=17))
    with pytest.raises(ModelFileError, match="do not match the architecture"):
        load_model(bad)


def test_refuses_invalid_config_in_metadata(saved: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    _resave(saved, bad, lambda d: d["config"]["train"].update(bogus=1))
    with pytest.raises(ModelFileError, match="train.bogus"):
        load_model(bad)


def test_refuses_newer_format_version(saved: Path, tmp_path: Path) -> None:
    bad = tmp_path / "new.safetensors"
    _resave(saved, bad, lambda d: d.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ModelFileError, match="newer than this imganom supports"):
        read_meta(bad)


def test_refuses_wrong_format_and_bad_json(saved: Path, tmp_path: Path) -> None:
    bad = tmp_path / "fmt.safetensors"
    _resave(saved, bad, lambda d: d.update(format="something-else"))
    with pytest.raises(ModelFileError, match="format is 'something-else'"):
        load_model(bad)
    bad2 = tmp_path / "json.safetensors"
    save_file(load_file(str(saved)), str(bad2), metadata={"imganom": "{not json"})
    with pytest.raises(ModelFileError, match="not valid JSON"):
        load_model(bad2)
    bad3 = tmp_path / "fields.safetensors"
    _resave(saved, bad3, lambda d: d.pop("config"))
    with pytest.raises(ModelFileError, match="missing fields"):
        load_model(bad3)
