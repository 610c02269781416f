"""speed.conv_plans (ldm/conv_plans.py): the plans file, the module switch, its fallbacks, and on a GPU with the
nvidia-cudnn-frontend package each measured plan against F.conv2d."""
from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ldm.conv_plans as cp
from bench.perf_measure import randomize_
from ldm.lora import LoRAConfig, inject_lora
from ldm.speed import SpeedConfig, apply_speed, remove_speed
from ldm.unet import UNet, UNetConfig

BUNDLED = Path(__file__).resolve().parents[1] / "bench" / "plans" / "h200_cudnn91900_sd15_b2.json"
ENTRY = {"input": [2, 8, 6, 6], "weight": [4, 8, 3, 3], "stride": 1, "padding": 1, "dtype": "float32",
         "engine": 72, "knobs": {"SPLIT_K_SLC": 1, "KERNEL_CFG": 54}}


def _write(tmp_path: Path, data) -> Path:
    p = tmp_path / "plans.json"
    p.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return p


def _file(**entry) -> dict:
    return {"format": cp.FORMAT, "gpu": "NVIDIA H200", "cudnn": 91900, "plans": [{**ENTRY, **entry}]}


def test_bundled_plans_file_loads():
    header, table = cp.load_plans(BUNDLED)
    assert header == {"gpu": "NVIDIA H200", "cudnn": 91900} and len(table) >= 10
    key = cp.plan_key((2, 320, 64, 64), (320, 320, 3, 3), 1, 1, torch.bfloat16)
    engine, knobs = table[key]  # the 64x64-level 3x3 convolution that motivated it
    assert engine == 72 and set(knobs) == {"SPLIT_K_SLC", "KERNEL_CFG"}


def test_write_then_load_round_trip(tmp_path):
    p = tmp_path / "sub" / "p.json"
    assert cp.write_plans(p, "GPU X", 90000, [ENTRY]) == 1
    assert not (tmp_path / "sub" / "p.json.tmp").exists()
    header, table = cp.load_plans(p)
    assert header == {"gpu": "GPU X", "cudnn": 90000}
    assert table == {((2, 8, 6, 6), (4, 8, 3, 3), 1, 1, torch.float32): (72, ENTRY["knobs"])}


@pytest.mark.parametrize("data, message", [
    ("{not json", "not JSON"),
    ({"format": "other"}, "format: expected 'ldm-conv-plans/1'"),
    ({"format": cp.FORMAT, "gpu": "G", "plans": []}, "gpu (a name) and cudnn"),
    ({"format": cp.FORMAT, "gpu": "G", "cudnn": 1, "plans": {}}, "plans: expected a list"),
    (_file(stride=0), "plans[0].stride: expected an integer >= 1"),
    (_file(weight=[4, 7, 3, 3]), "plans[0]: input channels 8 != weight's 7"),
    (_file(input=[2, 8, 6]), "plans[0].input: expected a list of 4 positive integers"),
    (_file(dtype="int8"), "plans[0].dtype: expected one of bfloat16"),
    (_file(knobs={"KERNEL_CFG": "54"}), "plans[0].knobs: expected {knob name: integer}"),
])
def test_bad_plans_file_names_the_field(tmp_path, data, message):
    p = _write(tmp_path, data)
    with pytest.raises(ValueError) as e:
        cp.load_plans(p)
    assert str(p) in str(e.value) and message in str(e.value)


def test_missing_entry_field_and_missing_file(tmp_path):
    d = _file()
    del d["plans"][0]["engine"]
    with pytest.raises(ValueError, match=r"plans\[0\]: missing 'engine'"):
        cp.load_plans(_write(tmp_path, d))
    with pytest.raises(ValueError, match="no such file.*--write-plans"):
        cp.load_plans(tmp_path / "absent.json")


def test_speed_config_errors():
    with pytest.raises(ValueError, match="speed.conv_plans: must be a file name"):
        SpeedConfig(conv_plans=3)
    with pytest.raises(ValueError, match="speed.conv_plans: cuDNN plans need a CUDA device"):
        SpeedConfig(conv_plans=str(BUNDLED)).resolve("cpu")
    with pytest.raises(ValueError, match="speed.conv_plans: .* for inference"):
        SpeedConfig(conv_plans=str(BUNDLED)).resolve("cuda", training=True)
    assert SpeedConfig(conv_plans=str(BUNDLED)).resolve("cuda").conv_plans == str(BUNDLED)
    assert SpeedConfig().resolve("cuda").conv_plans is None  # never on by auto: a file measured for one GPU


def test_require_plans_checks_device_and_file(tmp_path):
    with pytest.raises(ValueError, match="speed.conv_plans: .*absent.json: no such file"):
        cp.require_plans(tmp_path / "absent.json", torch.device("cpu"))  # the file first: before any device query
    with pytest.raises(ValueError, match="need a CUDA device, the U-Net is on cpu"):
        cp.require_plans(BUNDLED, torch.device("cpu"))


def test_switch_swaps_only_plain_square_convs():
    m = nn.ModuleDict({
        "plain": nn.Conv2d(4, 4, 3, padding=1),
        "strided": nn.Conv2d(4, 4, 3, stride=2, padding=1),
        "reflect": nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        "grouped": nn.Conv2d(4, 4, 3, padding=1, groups=2),
        "rect": nn.Conv2d(4, 4, (1, 3), padding=(0, 1)),
        "inner": nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 1)),
    })
    inject_lora(m, LoRAConfig(rank=2, target_modules=["inner.1"]))
    keys = list(m.state_dict())
    assert cp.set_conv_plans(m, {}) == 4  # plain, strided and the adapter's own lora_down / lora_up
    assert type(m["plain"]) is cp.PlannedConv2d and type(m["strided"]) is cp.PlannedConv2d
    assert all(type(m[k]) is nn.Conv2d for k in ("reflect", "grouped", "rect"))
    assert type(m["inner"][1]).__name__ == "LoRAConv2d"  # a subclass: left alone
    assert list(m.state_dict()) == keys
    assert cp.set_conv_plans(m, None) == 4 and type(m["plain"]) is nn.Conv2d
    assert not hasattr(m["plain"], "_conv_plans")


@pytest.fixture
def planned_on_cpu(monkeypatch):
    """PlannedConv2d looking for plans on the CPU too, the op replaced by F.conv2d that records its calls."""
    calls = []

    def fake_op(x, w, stride, padding, engine, knobs):
        calls.append((tuple(x.shape), stride, padding, engine, knobs))
        return F.conv2d(x, w, stride=stride, padding=padding) * 2  # x2: a planned call is visible in the output

    monkeypatch.setattr(cp, "PLANNED_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(cp, "conv2d_planned", fake_op)
    return calls


def test_planned_call_only_where_the_table_has_the_shape(planned_on_cpu):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3, padding=1)
    ref = nn.Conv2d(8, 4, 3, padding=1)
    ref.load_state_dict(conv.state_dict())
    key = cp.plan_key((2, 8, 6, 6), (4, 8, 3, 3), 1, 1, torch.float32)
    cp.set_conv_plans(conv, {key: (72, {"SPLIT_K_SLC": 1, "KERNEL_CFG": 54})})
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        got = conv(x)
        want = 2 * F.conv2d(x, ref.weight, padding=1) + ref.bias.view(1, -1, 1, 1)  # the op, then the bias
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert planned_on_cpu == [((2, 8, 6, 6), 1, 1, 72, "SPLIT_K_SLC=1,KERNEL_CFG=54")]
        # another shape, another dtype, autocast: nn.Conv2d itself, bit for bit
        for inp, module in ((torch.randn(1, 8, 6, 6), conv), (torch.randn(2, 8, 5, 6), conv)):
            torch.testing.assert_close(module(inp), ref(inp), rtol=0, atol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(conv(x), ref(x), rtol=0, atol=0)
    assert len(planned_on_cpu) == 1
    # gradients wanted: nn.Conv2d (the plan is forward only)
    xg = x.clone().requires_grad_()
    torch.testing.assert_close(conv(xg), ref(x), rtol=0, atol=0)
    assert len(planned_on_cpu) == 1


def test_apply_speed_switches_the_unet_and_remove_speed_undoes_it(planned_on_cpu, monkeypatch):
    unet = randomize_(UNet(UNetConfig.sd15().tiny()), seed=0).eval()
    with pytest.raises(ValueError, match="need a CUDA device"):  # on the CPU: refused, nothing switched
        apply_speed(unet, SpeedConfig(conv_plans=str(BUNDLED)))
    assert not any(type(m) is cp.PlannedConv2d for m in unet.modules()) and getattr(unet, "speed", None) is None
    # as on a GPU (resolve and the file's GPU check stubbed): every plain convolution switched, then switched back
    resolved = dataclasses.replace(SpeedConfig().resolve("cpu"), conv_plans="plans.json", cuda_graphs=True)
    monkeypatch.setattr(SpeedConfig, "resolve", lambda self, device, training=False: resolved)
    seen, conv_in = [], unet.input_blocks[0][0]  # one plan, for conv_in's weight: the file fits this model
    table = {cp.plan_key((2, 4, 8, 8), conv_in.weight.shape, 1, 1, conv_in.weight.dtype): (72, {"KERNEL_CFG": 1})}
    monkeypatch.setattr("ldm.speed.require_plans", lambda path, device: seen.append(path) or table)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with CUDA graphs and a matching plan: no warning
        assert apply_speed(unet, SpeedConfig(conv_plans="plans.json")).conv_plans == "plans.json"
    assert seen == ["plans.json"]
    n = sum(type(m) is cp.PlannedConv2d for m in unet.modules())
    assert n == sum(isinstance(m, nn.Conv2d) for m in unet.modules()) and n > 0
    remove_speed(unet)
    assert not any(type(m) is cp.PlannedConv2d for m in unet.modules())
    # without CUDA graphs every planned call costs host time (measured slower): the user is told
    resolved = dataclasses.replace(resolved, cuda_graphs=False)
    with pytest.warns(RuntimeWarning, match="speed.conv_plans without CUDA graphs"):
        apply_speed(unet, SpeedConfig(conv_plans="plans.json"))
    remove_speed(unet)
    # a file for another model (no weight shape of this one) or another dtype: told, not silently F.conv2d
    resolved = dataclasses.replace(resolved, cuda_graphs=True)
    for other in ({cp.plan_key((2, 4, 8, 8), (7, 4, 3, 3), 1, 1, torch.float32): (72, {})},
                  {cp.plan_key((2, 4, 8, 8), conv_in.weight.shape, 1, 1, torch.bfloat16): (72, {})}):
        table = other
        with pytest.warns(RuntimeWarning, match="plans.json has no plan for any convolution of this UNet"):
            apply_speed(unet, SpeedConfig(conv_plans="plans.json"))
        remove_speed(unet)


def test_speed_cli_flag():
    import argparse

    from inference.speed_cli import add_speed_arguments, speed_config

    p = argparse.ArgumentParser()
    add_speed_arguments(p)
    assert speed_config(p.parse_args(["--conv-plans", str(BUNDLED)])).conv_plans == str(BUNDLED)
    assert speed_config(p.parse_args([])).conv_plans is None
    with pytest.raises(ValueError, match=r"--conv-plans: x\.json: no such file"):  # checked before a model loads
        speed_config(p.parse_args(["--conv-plans", "x.json"]))


def _bundled_runs() -> str | None:
    if not torch.cuda.is_available():
        return "needs CUDA"
    if cp.frontend_import_error() is not None:
        return "needs nvidia-cudnn-frontend"
    header, _ = cp.load_plans(BUNDLED)
    if (header["gpu"], header["cudnn"]) != (torch.cuda.get_device_name(), torch.backends.cudnn.version()):
        return f"the bundled plans are for {header['gpu']} with cuDNN {header['cudnn']}"
    return None


@pytest.mark.skipif(_bundled_runs() is not None, reason=str(_bundled_runs()))
def test_every_bundled_plan_matches_conv2d_on_the_gpu():
    _, table = cp.load_plans(BUNDLED)
    g = torch.Generator(device="cuda").manual_seed(0)
    for (xs, ws, stride, padding, dtype), (engine, knobs) in table.items():
        x = torch.randn(xs, device="cuda", dtype=dtype, generator=g)
        w = torch.randn(ws, device="cuda", dtype=dtype, generator=g) / (ws[1] * ws[2] * ws[3]) ** 0.5
        packed = ",".join(f"{k}={v}" for k, v in knobs.items())
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a plan that fell back to F.conv2d would pass unseen
            got = cp.conv2d_planned(x, w, stride, padding, engine, packed)
        want = F.conv2d(x.double(), w.double(), stride=stride, padding=padding)  # fp64: both kernels' error
        ref = F.conv2d(x, w, stride=stride, padding=padding)
        assert got.shape == ref.shape and got.is_contiguous(memory_format=torch.channels_last)
        err = (got.double() - want).abs().max().item()
        ref_err = (ref.double() - want).abs().max().item()
        # bf16 output: both round the fp32 sum once (<= 2^-8 relative); allow 2x PyTorch's own error
        assert err <= 2 * ref_err + 1e-6, ((xs, ws, stride), err, ref_err)


def test_bench_winners_and_merge(tmp_path, monkeypatch):
    """bench/cudnn_knobs.py: a shape's plan is its fastest right one (within bf16 rounding of F.conv2d) that beats
    F.conv2d by --min-gain; merging runs keeps each shape's fastest, with its own run's F.conv2d time."""
    from bench.cudnn_knobs import main, winners

    def shape(torch_us, *best, xs=(2, 8, 6, 6)):
        return {"input": list(xs), "weight": [4, 8, 3, 3], "stride": 1, "padding": 1, "torch_us": torch_us,
                "best": [{"engine": 72, "knobs": {"knob_type.KERNEL_CFG": k}, "us": us, "err": err}
                         for k, us, err in best]}

    shapes = [shape(10.0, (1, 8.0, 0.5), (2, 9.0, 3e-3)),  # the fastest is wrong: the next one
              shape(10.0, (3, 9.9, 0.0), xs=(1, 8, 6, 6)),  # 1% faster: below min_gain
              shape(10.0, xs=(4, 8, 6, 6))]  # nothing built
    got = winners(shapes, 0.03)
    assert [(p["input"][0], p["knobs"], p["us"]) for p in got] == [(2, {"KERNEL_CFG": 2}, 9.0)]
    runs = []
    for i, (torch_us, us) in enumerate(((10.0, 9.0), (12.0, 8.5))):
        f = tmp_path / f"run{i}.json"
        f.write_text(json.dumps({"gpu": "G", "cudnn": 1, "shapes": [shape(torch_us, (i, us, 0.0))]}))
        runs.append(str(f))
    out = tmp_path / "plans.json"
    monkeypatch.setattr(sys, "argv", ["cudnn_knobs.py", "--from-results", *runs, "--write-plans", str(out)])
    assert main() == 0
    header, table = cp.load_plans(out)
    assert header == {"gpu": "G", "cudnn": 1}
    assert table == {((2, 8, 6, 6), (4, 8, 3, 3), 1, 1, torch.bfloat16): (72, {"KERNEL_CFG": 1})}  # 8.5 us < 9.0


def test_training_config_refuses_conv_plans_before_any_work():
    from training.config import load_train_config

    assert load_train_config(None, []).speed.conv_plans is None
    with pytest.raises(ValueError, match=r"speed\.conv_plans: inference only"):
        load_train_config(None, [f"speed.conv_plans={BUNDLED}"])


def test_a_plan_that_does_not_build_warns_once_and_runs_conv2d(monkeypatch):
    """A plan cuDNN rejects (or a missing library) costs the speed-up, never the image: one warning naming the plan
    and the shape, then F.conv2d for that convolution, without trying to build it again."""
    tries = []

    def reject(*args):
        tries.append(args[0].shape)
        raise RuntimeError("CUDNN_STATUS_NOT_SUPPORTED")

    monkeypatch.setattr(cp, "_build", reject)
    monkeypatch.setattr(cp, "_plans", {})
    torch.manual_seed(0)
    x, w = torch.randn(2, 8, 6, 6), torch.randn(4, 8, 3, 3)
    with pytest.warns(RuntimeWarning, match=r"engine 72, KERNEL_CFG=54\) for input \(2, 8, 6, 6\).*did not build "
                                            r"\(RuntimeError: CUDNN_STATUS_NOT_SUPPORTED\).*runs F.conv2d"):
        y = cp.conv2d_planned(x, w, 1, 1, 72, "KERNEL_CFG=54")
    torch.testing.assert_close(y, F.conv2d(x, w, padding=1), rtol=0, atol=0)
    assert y.is_contiguous(memory_format=torch.channels_last)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(cp.conv2d_planned(x, w, 1, 1, 72, "KERNEL_CFG=54"), y, rtol=0, atol=0)
    assert len(tries) == 1
