"""``ldm convert``: conversions through the command line, and one-line errors with exit code 2 on bad input."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldm.bundle import load_bundle
from ldm.cli import main
from ldm.formats import original as original_format
from tests.test_format_original import OVERRIDES, network_tensors, reference, write

LDM = Path(sys.executable).parent / "ldm"  # the console script installed by `pip install -e .`


def sets(family: str) -> list[str]:
    return [a for o in OVERRIDES[family] for a in ("--set", o)]


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("ldm convert: error: ")
    return err


@pytest.fixture
def no_reading(monkeypatch):
    """Bad arguments are reported before any weights are read."""
    def fail(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(original_format, "read_state_dict", fail)


@pytest.mark.skipif(not LDM.exists(), reason="the ldm console script is not installed")
@pytest.mark.parametrize("args,message", [
    (["/no/such/model.safetensors", "out", "--to", "ldm"], "/no/such/model.safetensors: no such file or folder"),
    ([__file__, "out", "--to", "onnx"], "--to: unknown value 'onnx'; one of: original, diffusers, ldm"),
])  # fmt: skip
def test_console_script_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
    proc = subprocess.run([str(LDM), "convert", *args], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"ldm convert: error: {message}"
    assert proc.stdout == ""


def test_bad_arguments_are_reported_before_reading(tmp_path, capsys, no_reading):
    src = write(tmp_path, {"x": torch.zeros(1)}, "in.safetensors")
    (tmp_path / "afile").write_text("x")
    cases = {
        "--dtype: unknown value 'fp8'": [str(src), str(tmp_path / "o"), "--dtype", "fp8"],
        "--family: unknown value 'sd3'": [str(src), str(tmp_path / "o"), "--family", "sd3"],
        "--prediction: unknown value 'epsilon'": [str(src), str(tmp_path / "o"), "--prediction", "epsilon"],
        "--to original writes one .safetensors file": [str(src), str(tmp_path / "o.ckpt"), "--to", "original"],
        "afile: exists and is a file; --to ldm writes a folder": [str(src), str(tmp_path / "afile"), "--to", "ldm"],
        "is the input": [str(src), str(src)],
        "malformed override 'unet.num_heads'": [str(src), str(tmp_path / "o"), "--set", "unet.num_heads"],
    }
    for message, argv in cases.items():
        assert message in one_line_error(capsys, ["convert", *argv])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "in.safetensors"]  # nothing written


def test_unreadable_input_is_one_line(tmp_path, capsys):  # -q: no progress lines before the error
    mystery = write(tmp_path, {"encoder.weight": torch.zeros(2)}, "mystery.safetensors")
    err = one_line_error(capsys, ["convert", str(mystery), str(tmp_path / "o"), "-q"])
    assert "mystery.safetensors: not a Stable Diffusion checkpoint" in err and "Known layouts" in err
    err = one_line_error(capsys, ["convert", str(write(tmp_path, reference("sd1")[0])), str(tmp_path / "o"), "-q"])
    assert r"cannot read text[0].heads from the tensor shapes" in err and "--set text[0].heads=N" in err


def test_original_to_ldm_to_diffusers_to_original(tmp_path, capsys):
    sd = network_tensors(reference("sdxl")[0])
    src = write(tmp_path, sd, "in.safetensors")
    assert main(["convert", str(src), str(tmp_path / "m"), "--dtype", "fp16", *sets("sdxl")]) == 0  # --to: ldm
    err = capsys.readouterr().err
    assert "loading unet" in err and "done:" in err  # progress messages
    b = load_bundle(tmp_path / "m")
    assert {p.dtype for p in b.parameters()} == {torch.float16}
    assert b.config.family == "sdxl"
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "d"), "--to", "diffusers", "-q"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["convert", str(tmp_path / "d"), str(tmp_path / "out.safetensors"), "-q"]) == 0  # --to: original
    back = load_file(str(tmp_path / "out.safetensors"))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k].half()) for k in sd)  # fp16 throughout, no value changed on the way


def test_prediction_and_family_flags(tmp_path, capsys):
    src = write(tmp_path, network_tensors(reference("sd2")[0]), "in.safetensors")
    assert main(["convert", str(src), str(tmp_path / "m"), "--prediction", "eps", "-q", *sets("sd2")]) == 0
    assert load_bundle(tmp_path / "m").config.diffusion.prediction == "eps"
