"""Our folder format (model.safetensors + config.yaml): exact round trips, atomic writes, clear errors."""
from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import autoencoder  # noqa: F401  registers the vae component
import text_encoder  # noqa: F401  registers the text component
from ldm.bundle import Bundle, load_bundle, save_bundle
from ldm.checkpoint import CheckpointError
from ldm.config import load_config
from ldm.formats import native
from ldm.model_config import ModelConfig
from tests.test_format_original import random_tensors


def random_bundle(family: str, seed: int = 0, dtype=torch.float32) -> Bundle:
    b = Bundle(ModelConfig.tiny(family))
    b.load_state_dict(random_tensors({k: v.shape for k, v in b.state_dict().items()}, seed=seed))
    return b.to(dtype).eval()


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family,dtype", [("sd1", torch.float32), ("sd2", torch.bfloat16), ("sdxl", torch.float16)])
def test_round_trip_is_exact(tmp_path, family, dtype):
    b = random_bundle(family, dtype=dtype)
    save_bundle(b, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.yaml", "model.safetensors"]
    again = load_bundle(tmp_path / "m")  # dtype=None: as stored
    assert again.config == b.config
    assert same_tensors(again.state_dict(), b.state_dict())
    keys = load_file(str(tmp_path / "m" / "model.safetensors")).keys()
    assert {k.split(".")[0] for k in keys} == {"unet", "vae", "text"}
    assert {k.split(".")[1] for k in keys if k.startswith("text.")} == {str(i) for i in range(len(b.text))}
    # config.yaml is the ModelConfig as ldm.config writes it: it loads with the generic loader too
    assert load_config(ModelConfig, str(tmp_path / "m" / "config.yaml")) == b.config


def test_dtype_device_and_overrides_on_load(tmp_path):
    save_bundle(random_bundle("sd1"), tmp_path / "m")
    b = load_bundle(tmp_path / "m", dtype="fp16", prediction="v", config_overrides=["diffusion.schedule.zero_terminal_snr=true"])
    assert {p.dtype for p in b.parameters()} == {torch.float16}
    assert b.config.diffusion.prediction == "v" and b.config.diffusion.schedule.zero_terminal_snr
    assert b.denoiser().prediction == "v"
    with pytest.raises(ValueError, match="dtype: expected None, a floating torch.dtype or one of fp32, fp16, bf16"):
        load_bundle(tmp_path / "m", dtype="int8")


def _boom(*args, **kwargs):
    raise OSError("disk full")


def test_failure_while_writing_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "save_config", _boom)  # fails after model.safetensors is written
    with pytest.raises(OSError, match="disk full"):
        save_bundle(random_bundle("sd1"), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []  # no target, no temporary folder


def test_failure_while_overwriting_keeps_the_older_folder(tmp_path, monkeypatch):
    old = random_bundle("sd1", seed=0)
    save_bundle(old, tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    monkeypatch.setattr(native, "save_config", _boom)
    with pytest.raises(OSError, match="disk full"):
        save_bundle(random_bundle("sd1", seed=1), tmp_path / "m")
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    monkeypatch.undo()
    new = random_bundle("sd1", seed=1)
    save_bundle(new, tmp_path / "m")  # a successful overwrite replaces it
    assert same_tensors(load_bundle(tmp_path / "m").state_dict(), new.state_dict())
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_refuses_to_replace_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(CheckpointError, match="photos: exists and is not a model folder of this format"):
        save_bundle(random_bundle("sd1"), tmp_path / "photos")
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["cat.jpg"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="file: exists and is not a folder"):
        save_bundle(random_bundle("sd1"), tmp_path / "file")


def test_incomplete_and_inconsistent_folders(tmp_path):
    save_bundle(random_bundle("sd1"), tmp_path / "m")
    (tmp_path / "m" / "config.yaml").rename(tmp_path / "config.yaml")
    with pytest.raises(CheckpointError, match=r"m: incomplete ldm model folder, config.yaml is missing"):
        load_bundle(tmp_path / "m")
    (tmp_path / "config.yaml").rename(tmp_path / "m" / "config.yaml")

    weights = tmp_path / "m" / "model.safetensors"
    sd = load_file(str(weights))
    save_file({**sd, "lora.up.weight": torch.zeros(1)}, str(weights))
    with pytest.raises(CheckpointError, match=r"model.safetensors: keys of no part of the config.*lora.up.weight"):
        load_bundle(tmp_path / "m")
    assert load_bundle(tmp_path / "m", strict=False).config.family == "sd1"

    del sd["unet.out.2.bias"]
    save_file(sd, str(weights))
    with pytest.raises(CheckpointError, match=r"\[unet\].*1 missing key\(s\): out.2.bias"):
        load_bundle(tmp_path / "m")
    b = load_bundle(tmp_path / "m", strict=False)  # that network is built for real, the rest assigned
    assert b.load_reports["unet"].missing == ["out.2.bias"]
    assert not any(p.is_meta for p in b.parameters())

    cfg = yaml.safe_load((tmp_path / "m" / "config.yaml").read_text())
    cfg["unet"]["context_dim"] = 48
    (tmp_path / "m" / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match=r"config.yaml: unet.context_dim: 48 != 32"):
        load_bundle(tmp_path / "m")


def test_bad_override_names_the_key(tmp_path):
    save_bundle(random_bundle("sdxl"), tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"config.yaml: text\[1\].bogus: unknown key .*'bogus'"):
        load_bundle(tmp_path / "m", config_overrides=["text[1].bogus=3"])
    b = load_bundle(tmp_path / "m", config_overrides=["text[1].layer=-3"])
    assert b.config.text[1].layer == -3
