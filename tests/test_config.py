"""Typed configs: defaults < YAML < overrides, presets, one clear ConfigError per mistake, YAML round trips."""
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import pytest
import torch

import ldm.config as config_module
from ldm.run_config import RunConfig
from ldm.config import (
    ConfigError, check_choices, choice, config_from_yaml_text, format_config, list_presets, load_config,
    parse_overrides, save_config, to_yaml,
)
from ldm.denoiser import DiffusionConfig
from ldm.samplers.config import SamplerConfig, make_sigmas
from ldm.schedule import DiscreteSchedule, ScheduleConfig

ROOT = Path(__file__).resolve().parents[1]
SAMPLER_KEYS = ["name", "steps", "sigma_spacing", "timestep_spacing", "steps_offset", "final", "rho", "convention",
                "eta", "cfg_scale", "guidance_rescale", "seed", "teleport", "teleport_stats"]


def raises(source=None, overrides=(), cls=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(cls or RunConfig, source, overrides)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def write(tmp_path, text, name="run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------ merging


def test_defaults():
    cfg = load_config(RunConfig)
    assert cfg == RunConfig()
    assert cfg.diffusion == DiffusionConfig() and cfg.diffusion.schedule == ScheduleConfig()
    s = cfg.sampler
    assert (s.name, s.sigma_spacing, s.timestep_spacing, s.steps_offset, s.final) == (
        "dpmpp_2m", "discrete", "leading", 1, "zero")
    assert (s.rho, s.eta, s.cfg_scale, s.guidance_rescale, s.seed) == (7.0, None, 7.5, 0.0, None)


def test_yaml_then_overrides_precedence(tmp_path):
    path = write(tmp_path, "sampler:\n  steps: 10\n  cfg_scale: 3.0\ndiffusion:\n  prediction: v\n")
    cfg = load_config(RunConfig, path, ["sampler.steps=20", "diffusion.schedule.zero_terminal_snr=true",
                                        "sampler.seed=5", "sampler.seed=7"])
    assert cfg.sampler.steps == 20  # override beats YAML
    assert cfg.sampler.cfg_scale == 3.0  # YAML beats default
    assert cfg.sampler.seed == 7  # the last override wins
    assert cfg.diffusion.prediction == "v"
    assert cfg.diffusion.schedule.zero_terminal_snr is True
    assert cfg.sampler.eta is None  # untouched default
    assert isinstance(cfg, RunConfig) and isinstance(cfg.sampler, SamplerConfig)


def test_dict_source_and_instance_source():
    cfg = load_config(RunConfig, {"sampler": {"name": "euler", "steps": 3}})
    assert (cfg.sampler.name, cfg.sampler.steps) == ("euler", 3)
    again = load_config(RunConfig, cfg, ["sampler.steps=4"])
    assert (again.sampler.name, again.sampler.steps) == ("euler", 4)
    assert cfg.sampler.steps == 3  # the source instance is not modified


def test_a_component_config_loads_on_its_own():
    s = load_config(SamplerConfig, {"steps": 12}, ["sigma_spacing=karras"])
    assert s == SamplerConfig(steps=12, sigma_spacing="karras")


def test_all_presets_are_listed_and_load():
    files = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    assert files and list_presets() == files
    for name in files:
        cfg = load_config(RunConfig, name)
        assert isinstance(cfg, RunConfig), name
        assert load_config(RunConfig, ROOT / "configs" / f"{name}.yaml") == cfg  # by name == by path


def test_preset_contents():
    assert load_config(RunConfig, "sd15").diffusion.prediction == "eps"
    assert load_config(RunConfig, "sd21-v").diffusion.prediction == "v"
    xl = load_config(RunConfig, "sdxl-base")
    assert (xl.diffusion.prediction, xl.sampler.name, xl.sampler.cfg_scale) == ("eps", "euler", 5.0)
    z = load_config(RunConfig, "sd21-v-zsnr")
    assert z.diffusion.schedule.zero_terminal_snr and z.sampler.timestep_spacing == "trailing"


def test_parse_overrides_uses_yaml_values():
    assert parse_overrides(["a.b=1e-4", "c=[1,2,4]", "d=null", "e=true", "f=x=y", "g=dpmpp_2m", "h= 3"]) == [
        ("a.b", 1e-4), ("c", [1, 2, 4]), ("d", None), ("e", True), ("f", "x=y"), ("g", "dpmpp_2m"), ("h", 3)]


# ------------------------------------------------------------------------------------- errors


def test_unknown_key_in_override_suggests_and_lists_valid_keys():
    msg = raises(overrides=["sampler.stepz=3"])
    assert msg.startswith("sampler.stepz: unknown key 'stepz'")
    assert "Did you mean 'steps'?" in msg
    assert "Valid keys: " + ", ".join(SAMPLER_KEYS) in msg
    assert "override 'sampler.stepz=3'" in msg


def test_unknown_top_level_key_in_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "samplr:\n  steps: 3\n")
    msg = raises(path)
    assert msg.startswith("samplr: unknown key 'samplr'")
    assert "Did you mean 'sampler'?" in msg and "Valid keys: diffusion, sampler" in msg
    assert str(path) in msg


def test_unknown_nested_key_in_yaml(tmp_path):
    path = write(tmp_path, "diffusion:\n  schedule:\n    beta_strat: 0.001\n")
    msg = raises(path)
    assert msg.startswith("diffusion.schedule.beta_strat: unknown key")
    assert "Did you mean 'beta_start'?" in msg and "zero_terminal_snr" in msg and str(path) in msg


def test_wrong_type_in_override():
    msg = raises(overrides=["sampler.steps=abc"])
    assert msg.startswith("sampler.steps: expected int, got 'abc'")
    assert "override 'sampler.steps=abc'" in msg


def test_wrong_type_in_yaml_names_file_and_type(tmp_path):
    path = write(tmp_path, "sampler:\n  cfg_scale: high\n")
    msg = raises(path)
    assert msg.startswith("sampler.cfg_scale: expected float, got 'high'") and str(path) in msg
    msg = raises({"sampler": {"seed": "x"}})
    assert msg.startswith("sampler.seed: expected int or null, got 'x'")
    msg = raises(overrides=["sampler.steps=null"])
    assert msg.startswith("sampler.steps: expected int, got null")


def test_section_given_a_scalar():
    msg = raises(overrides=["diffusion.schedule=3"])
    assert msg.startswith("diffusion.schedule: expected a mapping (section ScheduleConfig")
    assert "beta_schedule, num_train_timesteps" in msg and "got 3" in msg


def test_value_not_among_choices_lists_them():
    msg = raises(overrides=["sampler.sigma_spacing=foo"])
    assert msg.startswith("sampler.sigma_spacing: 'foo' is not an allowed value")
    assert "expected str, one of: discrete, karras, exponential" in msg
    assert "override 'sampler.sigma_spacing=foo'" in msg


def test_choice_from_yaml_names_the_file_unless_overridden(tmp_path):
    path = write(tmp_path, "sampler:\n  final: last\n  timestep_spacing: bogus\n")
    msg = raises(path, ["sampler.final=zero"])
    assert msg.startswith("sampler.timestep_spacing: 'bogus' is not an allowed value")
    assert "leading, trailing, linspace" in msg and str(path) in msg


@pytest.mark.parametrize("item", ["sampler.steps", "=3", "sampler..steps=3", "sampler.steps 3"])
def test_malformed_override(item):
    msg = raises(overrides=[item])
    assert msg.startswith(f"malformed override {item!r}")
    if "=" not in item:
        assert "expected KEY=VALUE" in msg


def test_overrides_must_be_a_list():
    with pytest.raises(ConfigError, match="list of KEY=VALUE"):
        parse_overrides("sampler.steps=3")


def test_sampler_name_validated_against_registry():
    assert load_config(RunConfig, None, ["sampler.name=euler"]).sampler.name == "euler"
    msg = raises(overrides=["sampler.name=bogus"])
    assert msg.startswith("sampler.name: unknown sampler 'bogus'; allowed: ")
    assert "euler" in msg and "override 'sampler.name=bogus'" in msg
    with pytest.raises(ValueError, match="sampler.name: unknown sampler 'bogus'"):
        SamplerConfig(name="bogus")


@pytest.mark.parametrize("override, key, text", [
    ("sampler.steps=0", "sampler.steps", ">= 1"),
    ("sampler.guidance_rescale=1.5", "sampler.guidance_rescale", "[0, 1]"),
    ("sampler.cfg_scale=-1", "sampler.cfg_scale", ">= 0"),
    ("sampler.eta=0.5", "sampler.eta", "has no eta"),  # the default dpmpp_2m is deterministic
    ("sampler.rho=0", "sampler.rho", "> 0"),
    ("sampler.seed=-1", "sampler.seed", "2**64"),
])
def test_sampler_range_checks(override, key, text):
    with pytest.raises(ConfigError) as info:
        load_config(RunConfig, None, [override])
    assert str(info.value).startswith(key) and text in str(info.value) and info.value.key == key


def test_schedule_and_diffusion_validators_surface_with_their_key():
    msg = raises(overrides=["diffusion.schedule.num_train_timesteps=1"])
    assert msg.startswith("diffusion.schedule.num_train_timesteps must be >= 2")
    msg = raises({"diffusion": {"schedule": {"beta_schedule": "cosine"}}})
    assert msg.startswith("diffusion.schedule.beta_schedule: unknown value 'cosine'")
    assert "scaled_linear, linear, squaredcos_cap_v2" in msg
    msg = raises(overrides=["diffusion.prediction=vv"])
    assert msg.startswith("diffusion.prediction: unknown value 'vv'") and "eps, v, x0" in msg


def test_unknown_preset_and_missing_file(tmp_path):
    msg = raises("sd16")
    assert msg.startswith("unknown preset 'sd16'") and "Did you mean 'sd15'?" in msg and "sdxl-base" in msg
    msg = raises(tmp_path / "nope.yaml")
    assert "config file not found" in msg and "nope.yaml" in msg


def test_invalid_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "sampler: [unclosed\n")
    msg = raises(path)
    assert msg.startswith("invalid YAML") and str(path) in msg
    msg = raises(write(tmp_path, "- a\n- b\n", "list.yaml"))
    assert "expected a mapping at the top of the YAML" in msg


# --------------------------------------------------------------------- choice() in a new config


@dataclass
class _Block:
    kind: str = choice("resnet", "resnet", "transformer")
    channel_mult: List[int] = field(default_factory=lambda: [1, 2])
    dropout: Optional[float] = None

    def __post_init__(self):
        check_choices(self, "block")


@dataclass
class _Net:
    block: _Block = field(default_factory=_Block)
    depth: int = choice(2, 1, 2, 3)


def test_choice_helper_in_new_configs():
    cfg = load_config(_Net, None, ["block.kind=transformer", "block.channel_mult=[1,2,4]", "depth=3"])
    assert cfg == _Net(_Block("transformer", [1, 2, 4]), 3)
    msg = raises(None, ["depth=5"], cls=_Net)
    assert msg.startswith("depth: 5 is not an allowed value; expected int, one of: 1, 2, 3")
    msg = raises({"block": {"kind": "mlp"}}, cls=_Net)
    assert msg.startswith("block.kind: 'mlp' is not an allowed value; expected str, one of: resnet, transformer")
    msg = raises(None, ["block.channel_mult=[1,x]"], cls=_Net)
    assert msg.startswith("block.channel_mult[1]: expected int, got 'x' (str)")
    assert load_config(_Net, None, ["block.channel_mult[1]=5"]).block.channel_mult == [1, 5]
    msg = raises(None, ["block.channel_mult[1]=y"], cls=_Net)
    assert msg.startswith("block.channel_mult[1]: expected int")
    assert load_config(_Net, None, ["block.dropout=0.1", "block.dropout=null"]).block.dropout is None
    with pytest.raises(ValueError, match="block.kind: 'mlp' is not an allowed value"):
        _Block(kind="mlp")  # direct construction validates too
    with pytest.raises(TypeError, match="not among the allowed values"):
        choice("x", "a", "b")


# -------------------------------------------------------------------------------- writing


@pytest.mark.parametrize("name", list_presets())
def test_yaml_round_trip(name):
    cfg = load_config(RunConfig, name, ["sampler.seed=123", "sampler.name=ddim", "sampler.eta=0.25"])
    assert config_from_yaml_text(RunConfig, to_yaml(cfg)) == cfg


def test_save_config_writes_loadable_yaml(tmp_path):
    cfg = load_config(RunConfig, "sd21-v", ["sampler.steps=17"])
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert load_config(RunConfig, path) == cfg
    assert os.listdir(tmp_path) == ["config.yaml"]


def test_save_config_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    path.write_text("previous: content\n")

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(config_module.os, "fsync", boom)  # fails after the text went to the temporary file
    with pytest.raises(OSError, match="disk full"):
        save_config(RunConfig(), path)
    assert path.read_text() == "previous: content\n"  # the old file is untouched
    assert os.listdir(tmp_path) == ["config.yaml"]  # and no temporary file is left behind


def test_format_config_lists_every_key():
    text = format_config(load_config(RunConfig, "tiny"))
    lines = text.splitlines()
    assert lines[0] == "# RunConfig"
    assert len(lines) == 1 + 7 + len(SAMPLER_KEYS)
    assert any(line.split() == ["sampler.name", "=", "'euler'"] for line in lines)
    assert any(line.split() == ["sampler.seed", "=", "0"] for line in lines)
    assert any(line.split() == ["diffusion.schedule.zero_terminal_snr", "=", "false"] for line in lines)


# -------------------------------------------------------------------------------- sigmas


def test_make_sigmas_passes_every_setting():
    sched = DiscreteSchedule(ScheduleConfig())
    cfg = SamplerConfig(name="euler", steps=7, sigma_spacing="karras", timestep_spacing="trailing", steps_offset=0,
                        final="sigma_min", rho=5.0)
    want = sched.sample_sigmas(steps=7, spacing="trailing", sigma_spacing="karras", steps_offset=0,
                               final="sigma_min", rho=5.0)
    torch.testing.assert_close(make_sigmas(sched, cfg), want, rtol=0, atol=0)
    assert len(want) == 8 and want[-1] == sched.sigma_min


def test_make_sigmas_matches_diffusers_sd_defaults():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           timestep_spacing="leading", steps_offset=1)
    ref.set_timesteps(10)
    ours = make_sigmas(DiscreteSchedule(ScheduleConfig()), SamplerConfig(name="euler", steps=10))
    torch.testing.assert_close(ours, ref.sigmas.double(), rtol=2e-6, atol=0)


def test_no_import_cycle_between_config_modules():
    code = ("from ldm.samplers.config import SamplerConfig; from ldm.run_config import RunConfig; "
            "print(RunConfig().sampler.name)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "dpmpp_2m"


def test_eta_range_and_sampler_options():
    from ldm.samplers.config import sampler_options

    with pytest.raises(ConfigError, match="sampler.eta: must be >= 0"):
        load_config(RunConfig, None, ["sampler.name=ddim", "sampler.eta=-0.5"])
    cfg = load_config(RunConfig, None, ["sampler.name=ddim", "sampler.eta=0.3"])
    assert sampler_options(cfg.sampler) == {"eta": 0.3}
    assert sampler_options(load_config(RunConfig).sampler) == {}


@pytest.mark.parametrize("name, cls_name", [("dpmpp_2m", "DPMSolverMultistepScheduler"), ("ddim", "DDIMScheduler"),
                                            ("euler", "EulerDiscreteScheduler")])
def test_make_sigmas_follows_the_diffusers_scheduler_of_each_sampler(name, cls_name):
    import diffusers

    ref = getattr(diffusers, cls_name)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       timestep_spacing="linspace")
    ref.set_timesteps(20)
    cfg = SamplerConfig(name=name, steps=20, timestep_spacing="linspace", steps_offset=0)
    sig = make_sigmas(DiscreteSchedule(), cfg)
    ref_sig = ref.sigmas.double() if hasattr(ref, "sigmas") else None
    if ref_sig is None:  # DDIM has no sigma table: compare its timesteps
        assert DiscreteSchedule().sigma_to_t(sig[:-1]).round().long().tolist() == ref.timesteps.tolist()
    else:
        torch.testing.assert_close(sig, ref_sig, rtol=2e-5, atol=0)  # float32 tables in diffusers
