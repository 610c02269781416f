"""``ldm export`` (training/export.py): a training checkpoint to a model, checked against what the trainer wrote.

Two tiny trainings (module fixtures, about a second each) are the references:
- a from-scratch run with EMA and trained text tower: the export of its final checkpoint equals its ``model/``
  (raw) and ``model-ema/`` (EMA) bit for bit, every tensor and dtype, and the config; an earlier step exports
  that step's tensors; other formats / dtypes equal ``save_bundle`` of the trainer's bundle; the export samples
  the same pixels as the trainer's model;
- a LoRA fine-tune with EMA: the merged export equals its ``model/``; ``--lora-only`` equals ``lora.safetensors``
  and ``lora-ema.safetensors`` (tensors and metadata); the merged EMA export equals the base with
  ``lora-ema.safetensors`` merged by ldm.lora.
- a ``task: vae`` run (autoencoder + discriminator, EMA, fitted latent scale): the export equals its ``model/`` and
  ``model-ema/``, config (the refitted scale) included; the discriminator is skipped.
Bad input (missing / incomplete / non-checkpoint folders, no EMA, existing OUT ...) fails before any model is built
(``build_bundle`` is replaced by a function that fails the test).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import training.train as train_mod
from inference.pipeline import Pipeline
from ldm.bundle import load_bundle, save_bundle
from ldm.checkpoint import read_metadata, read_state_dict
from ldm.cli import main
from ldm.lora import load_lora, merge_lora
from ldm.model_config import ModelConfig
from tests.test_train_smoke import tiny_config
from tests.test_train_vae import vae_config
from training.checkpointing import find_latest
from training.export import export_checkpoint
from training.train import build_bundle, train

FINAL = "step-00000003"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """3 steps, checkpoints at 2 and 3, EMA, U-Net and text tower trained."""
    out = tmp_path_factory.mktemp("full")
    train(tiny_config(out, "ema.decay=0.9", "max_steps=3", "checkpoint_every=2", "train_text_encoder=true"))
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA fine-tune (with EMA) of a saved base whose zero-initialised layers are randomised (so gradients reach
    the attention layers the adapters sit in)."""
    root = tmp_path_factory.mktemp("lora")
    base = build_bundle(tiny_config(root / "unused"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in base.unet.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_bundle(base, root / "base")
    train(tiny_config(root / "run", f"model.source={root / 'base'}", "model.overrides=[]", "lora.rank=2",
                      "lora.alpha=2", "lora.target_modules=[to_q,to_v]", "max_steps=3", "ema.decay=0.5"))  # fmt: skip
    return root / "run"


@pytest.fixture
def no_build(monkeypatch):
    """Fail the test if a model is built."""

    def fail(*args, **kwargs):
        raise AssertionError("a model was built before the bad input was reported")

    monkeypatch.setattr(train_mod, "build_bundle", fail)


def weights(folder):
    return read_state_dict(folder / "model.safetensors")


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and got
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


# ------------------------------------------------------------------------------------------- full training


@pytest.mark.parametrize("where", ["output_dir", "checkpoints", "step"])
def test_raw_export_of_the_final_checkpoint_is_the_runs_model(full_run, tmp_path, where):
    source = {"output_dir": full_run, "checkpoints": full_run / "checkpoints",
              "step": full_run / "checkpoints" / FINAL}[where]  # fmt: skip
    rng = torch.get_rng_state()
    assert export_checkpoint(source, tmp_path / "out", weights="raw") == tmp_path / "out"
    assert torch.equal(torch.get_rng_state(), rng)  # the seeded rebuild leaves the caller's RNG alone
    assert_same(weights(tmp_path / "out"), weights(full_run / "model"))
    assert (tmp_path / "out" / "config.yaml").read_text() == (full_run / "model" / "config.yaml").read_text()


def test_ema_export_is_the_runs_model_ema_and_the_default(full_run, tmp_path):
    export_checkpoint(full_run, tmp_path / "default")
    export_checkpoint(full_run, tmp_path / "ema", weights="ema")
    ema = weights(full_run / "model-ema")
    assert_same(weights(tmp_path / "default"), ema)
    assert_same(weights(tmp_path / "ema"), ema)
    raw = weights(full_run / "model")
    assert any(not torch.equal(raw[k], ema[k]) for k in ema if k.startswith("unet."))  # EMA really differs


def test_an_earlier_step_exports_its_own_tensors(full_run, tmp_path):
    step2 = full_run / "checkpoints" / "step-00000002"
    export_checkpoint(step2, tmp_path / "out", weights="raw")
    got, final = weights(tmp_path / "out"), weights(full_run / "model")
    trained = read_state_dict(step2 / "model.safetensors")
    assert {k.split(".")[0] for k in trained} == {"unet", "text"}
    for k, v in got.items():  # trained tensors from step 2, the frozen VAE as the run had it
        assert torch.equal(v, trained[k] if k in trained else final[k]), k
    assert set(got) - set(trained) == {k for k in final if k.startswith("vae.")}
    assert any(not torch.equal(got[k], final[k]) for k in trained)


def test_exported_model_loads_and_samples_like_the_runs_model(full_run, tmp_path):
    export_checkpoint(full_run, tmp_path / "out", weights="ema")
    kw = dict(steps=2, sampler="euler", seed=3, width=16, height=16, cfg_scale=2.0)
    got = Pipeline.load(tmp_path / "out")("a red circle", **kw)
    want = Pipeline.load(full_run / "model-ema")("a red circle", **kw)
    assert got.images[0].size == (16, 16)
    assert torch.equal(got.pixels, want.pixels)


@pytest.mark.parametrize("to,name,dtype", [("diffusers", "out", "fp16"), (None, "out.safetensors", None),
                                           ("ldm", "out", "bf16")])  # fmt: skip
def test_formats_and_dtypes_equal_save_bundle_of_the_runs_model(full_run, tmp_path, to, name, dtype):
    export_checkpoint(full_run, tmp_path / name, to=to, dtype=dtype)
    fmt = to or "original"  # the default for a .safetensors OUT
    got, want = tmp_path / name, tmp_path / f"want-{name}"
    save_bundle(load_bundle(full_run / "model-ema", dtype=dtype), want, format=fmt)
    files = [Path()] if fmt == "original" else sorted(p.relative_to(want) for p in want.rglob("*") if p.is_file())
    assert files and (fmt == "original" or files == sorted(p.relative_to(got) for p in got.rglob("*") if p.is_file()))
    for rel in files:
        if (want / rel).suffix == ".safetensors":
            assert_same(read_state_dict(got / rel), read_state_dict(want / rel))
        else:  # configs
            assert (got / rel).read_bytes() == (want / rel).read_bytes(), rel


# ------------------------------------------------------------------------------------------------ task=vae


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """The autoencoder and its discriminator (switched on at step 3) trained 4 steps, with EMA."""
    out = tmp_path_factory.mktemp("vae")
    train(vae_config(out, "shapes.rows=4", "max_steps=4", "ema.decay=0.9"))
    return out


@pytest.mark.parametrize("which,folder", [("raw", "model"), ("ema", "model-ema")])
def test_vae_run_exports_its_autoencoder_and_latent_scale(vae_run, tmp_path, which, folder):
    trained = read_state_dict(find_latest(vae_run / "checkpoints") / "model.safetensors")
    assert {k.split(".")[0] for k in trained} == {"vae", "disc"}  # the discriminator is in the checkpoint
    export_checkpoint(vae_run, tmp_path / "out", weights=which)
    assert_same(weights(tmp_path / "out"), weights(vae_run / folder))
    assert (tmp_path / "out" / "config.yaml").read_text() == (vae_run / folder / "config.yaml").read_text()
    scale = load_bundle(tmp_path / "out").config.vae.scale_factor
    assert scale != ModelConfig.tiny("sd1").vae.scale_factor  # fitted, not the preset's


# ------------------------------------------------------------------------------------------------- LoRA


def test_lora_export_equals_the_runs_merged_model(lora_run, tmp_path):
    export_checkpoint(lora_run, tmp_path / "out", weights="raw")
    assert_same(weights(tmp_path / "out"), weights(lora_run / "model"))


def test_lora_ema_export_is_the_base_with_the_ema_adapters_merged(lora_run, tmp_path):
    export_checkpoint(lora_run, tmp_path / "out")  # default: EMA
    want = load_bundle(lora_run.parent / "base")
    load_lora(want.unet, read_state_dict(lora_run / "lora-ema.safetensors"))
    merge_lora(want.unet)
    assert_same(weights(tmp_path / "out"), dict(want.state_dict()))
    raw = weights(lora_run / "model")
    assert any(not torch.equal(raw[k], v) for k, v in weights(tmp_path / "out").items())


@pytest.mark.parametrize("which,file", [("raw", "lora.safetensors"), ("ema", "lora-ema.safetensors")])
def test_lora_only_writes_the_trainers_adapter_file(lora_run, tmp_path, which, file):
    out = export_checkpoint(lora_run, tmp_path / "a.safetensors", weights=which, lora_only=True)
    assert_same(read_state_dict(out), read_state_dict(lora_run / file))
    assert read_metadata(out) == read_metadata(lora_run / file)


# ------------------------------------------------------------------------------------------------ errors


def test_bad_checkpoints_are_reported_before_any_model_is_built(full_run, tmp_path, no_build):
    step = full_run / "checkpoints" / FINAL
    incomplete = tmp_path / "run" / "checkpoints" / "step-00000005"
    shutil.copytree(step, incomplete)
    (incomplete / "state.json").unlink()
    (tmp_path / "afile").write_text("x")
    cases = {
        str(tmp_path / "nope"): "nope: no such folder",
        str(tmp_path / "afile"): "afile: is a file",
        str(incomplete): "step-00000005: incomplete checkpoint (no state.json",
        str(incomplete.parent): "checkpoints: no complete checkpoint",
        str(tmp_path / "run"): "checkpoints: no complete checkpoint",
        str(full_run / "model"): "model: not a training checkpoint",
    }
    for source, message in cases.items():
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            export_checkpoint(source, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_bad_outputs_and_options_are_reported_before_any_model_is_built(full_run, lora_run, tmp_path, no_build):
    step = full_run / "checkpoints" / FINAL
    no_ema = tmp_path / FINAL
    shutil.copytree(step, no_ema)
    for f in ("ema.json", "ema.safetensors"):
        (no_ema / f).unlink()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    (tmp_path / "f.safetensors").write_text("x")
    cases = [
        ((no_ema, tmp_path / "o"), dict(weights="ema"), f"{no_ema}: has no EMA state"),
        ((step, tmp_path / "full"), {}, "full: exists and is not empty; pass --overwrite"),
        ((step, tmp_path / "full"), dict(overwrite=True), "full: exists and is not a model folder of the ldm format"),
        ((step, tmp_path / "f.safetensors"), {}, "f.safetensors: exists; pass --overwrite"),
        ((step, tmp_path / "o.bin"), dict(to="original"), "--to original writes one .safetensors file"),
        ((step, tmp_path / "o.safetensors"), dict(lora_only=True), "--lora-only: .* is not a LoRA run"),
        ((lora_run, tmp_path / "lora"), dict(lora_only=True), "--lora-only writes one .safetensors file"),
        ((lora_run, tmp_path / "o.safetensors"), dict(lora_only=True, to="ldm"), "--to: not with --lora-only"),
        ((step, tmp_path / "o"), dict(weights="best"), "weights: unknown value 'best'; one of: ema, raw"),
        ((step, tmp_path / "o"), dict(dtype="fp8"), "dtype: unknown value 'fp8'"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            export_checkpoint(*args, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([FINAL, "full", "f.safetensors"])


def test_no_ema_state_defaults_to_raw_and_overwrite_replaces(full_run, tmp_path):
    no_ema = tmp_path / FINAL
    shutil.copytree(full_run / "checkpoints" / FINAL, no_ema)
    for f in ("ema.json", "ema.safetensors"):
        (no_ema / f).unlink()
    export_checkpoint(full_run, tmp_path / "out", weights="ema")
    export_checkpoint(no_ema, tmp_path / "out", overwrite=True)
    assert_same(weights(tmp_path / "out"), weights(full_run / "model"))


# ---------------------------------------------------------------------------------------------- command line


def test_command_line(full_run, tmp_path, capsys):
    assert main(["export", str(full_run), str(tmp_path / "out"), "--weights", "raw"]) == 0
    err = capsys.readouterr().err
    assert f"checkpoint {full_run / 'checkpoints' / FINAL} (step 3): raw weights" in err
    assert f"done: raw weights of {full_run / 'checkpoints' / FINAL} (unet, text) -> {tmp_path / 'out'} (ldm)" in err
    assert_same(weights(tmp_path / "out"), weights(full_run / "model"))

    assert main(["export", str(full_run), str(tmp_path / "out")]) == 2  # exists: one line, exit code 2
    assert capsys.readouterr().err.strip() == (f"ldm export: error: {tmp_path / 'out'}: exists and is not empty; "
                                               f"pass --overwrite to replace it")  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main(["export", str(full_run), str(tmp_path / "o"), "--weights", "best"])
    assert e.value.code == 2 and "argument --weights: invalid choice: 'best'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    assert e.value.code == 0 and "CHECKPOINT is a run's output_dir" in capsys.readouterr().out
