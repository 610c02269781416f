"""PNG generation parameters: written, read back equal, and readable in the web UI's layout."""
import hashlib

import pytest
from PIL import Image

from inference.metadata import GenerationParams, format_parameters, model_hash, parse_parameters, png_info, read_png_params


def test_round_trip_through_png(tmp_path):
    p = GenerationParams(prompt="a cat, on a mat: (red:1.2)", negative="blurry, low quality", steps=30,
                         sampler="dpmpp_2m_sde", schedule="karras", cfg_scale=6.5, seed=1234567890123, width=640,
                         height=384, model="sd15", model_hash="0123456789", strength=0.6, guidance_rescale=0.7,
                         clip_skip=2, eta=0.5, mode="img2img")
    path = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=png_info(p))
    assert read_png_params(path) == p
    assert parse_parameters(format_parameters(p)) == p  # the human-readable chunk alone is enough too


def test_text_layout_is_the_webui_one():
    p = GenerationParams(prompt="a cat", negative="dog", steps=20, sampler="euler", cfg_scale=7.0, seed=3,
                         width=512, height=768, model="m", model_hash="abcdef0123")
    assert format_parameters(p) == (
        "a cat\nNegative prompt: dog\n"
        "Steps: 20, Sampler: euler, Schedule type: discrete, CFG scale: 7.0, Seed: 3, Size: 512x768, "
        "Model hash: abcdef0123, Model: m, Mode: txt2img"
    )


def test_reads_a_webui_file():
    text = ("masterpiece, a castle\nNegative prompt: ugly\nSteps: 28, Sampler: DPM++ 2M, Schedule type: Karras, "
            "CFG scale: 5, Seed: 42, Size: 832x1216, Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Version: v1.9.4")
    p = parse_parameters(text)
    assert (p.prompt, p.negative, p.steps, p.sampler, p.schedule) == ("masterpiece, a castle", "ugly", 28, "dpmpp_2m", "karras")
    assert (p.cfg_scale, p.seed, p.width, p.height, p.model_hash) == (5.0, 42, 832, 1216, "31e35c80fc")


def test_model_hash_is_sha256_prefix(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"abc" * 1000)
    assert model_hash(f) == hashlib.sha256(b"abc" * 1000).hexdigest()[:10]


@pytest.mark.parametrize("text", ["", "just a prompt", "a\nb"])
def test_bad_parameters_text(text):
    with pytest.raises(ValueError):
        parse_parameters(text)


def test_png_without_parameters(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(path)
    with pytest.raises(ValueError, match="plain.png: carries no generation parameters"):
        read_png_params(path)
    with pytest.raises(ValueError, match="no such file"):
        read_png_params(tmp_path / "missing.png")
