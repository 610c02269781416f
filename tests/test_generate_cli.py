"""``ldm txt2img | img2img | inpaint``: arguments, checks before loading, files and their metadata, --from-png, grid.

Most tests drive the command with a fake Pipeline (a deterministic function of prompt and seed) so that they test
the command line alone; the last ones run the real inference.pipeline.Pipeline on a tiny random model.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from inference import generate_cli
from inference.metadata import GenerationParams, png_info, read_png_params
from ldm.cli import main

MODEL_FILE = "model.safetensors"  # a name that detect_format reads as an original single file; never opened


# ------------------------------------------------------------------------------------------------ the fake


class FakePipeline:
    """The Pipeline contract, with images that are a function of (prompt, seed, size) only."""

    instances: list["FakePipeline"] = []

    def __init__(self, path, kwargs):
        self.path, self.load_kwargs = path, kwargs
        self.name, self.model_hash = "fake", "0123456789"
        self.calls, self.checks = [], []
        self.bundle = SimpleNamespace(unet=SimpleNamespace(compiled=False))
        self.bundle.unet.compile = lambda: setattr(self.bundle.unet, "compiled", True)

    @classmethod
    def load(cls, path, **kwargs):
        cls.instances.append(pipe := cls(path, kwargs))
        return pipe

    @property
    def default_size(self):
        return (40, 24)

    def check(self, **kwargs):
        self.checks.append(kwargs)
        if kwargs.get("cfg_scale") == 13.0:  # something only the loaded model can know
            raise ValueError("cfg_scale 13 is unlucky for this model")

    def __call__(self, prompt, *, seed, n=1, width, height, callback=None, init_image=None, mask=None, **kw):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        self.calls.append(dict(prompt=prompts, seed=seed, n=n, width=width, height=height, init_image=init_image,
                               mask=mask, **kw))  # fmt: skip
        mode = "txt2img" if init_image is None else "inpaint" if mask is not None else "img2img"
        images, params = [], []
        for k, p in enumerate(q for q in prompts for _ in range(n)):
            s = seed + k
            images.append(fake_image(p, s, width, height))
            params.append(GenerationParams(
                prompt=p, negative=kw["negative"], steps=kw["steps"], sampler=kw["sampler"], schedule=kw["schedule"],
                cfg_scale=kw["cfg_scale"], seed=s, width=width, height=height, model=self.name,
                model_hash=self.model_hash, strength=kw.get("strength") if mode != "txt2img" else None,
                guidance_rescale=kw["guidance_rescale"], clip_skip=kw["clip_skip"], eta=kw["eta"], mode=mode,
            ))  # fmt: skip
        for i in range(kw["steps"]):
            if callback is not None:
                callback(SimpleNamespace(i=i))
        return SimpleNamespace(images=images, params=params, latents=None)


def fake_image(prompt: str, seed: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(f"{prompt}|{seed}".encode()).digest()[:8], "little"))
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """The fake pipeline in place of Pipeline.load; a model file that is never read; run in tmp_path."""
    FakePipeline.instances = []
    monkeypatch.setattr(generate_cli, "load_pipeline", FakePipeline.load)
    monkeypatch.chdir(tmp_path)
    (tmp_path / MODEL_FILE).write_bytes(b"never read")
    return FakePipeline


def run(*argv) -> int:
    return main([str(a) for a in argv])


def pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def write_image(path: Path, size: tuple[int, int], mode: str = "RGB") -> Path:
    Image.new(mode, size, color=128 if mode == "L" else (10, 20, 30)).save(path)
    return path


# ------------------------------------------------------------------------------------------------ bad input


def bad_input_cases(tmp: Path) -> list[tuple[list, str]]:
    write_image(tmp / "init.png", (64, 48))
    write_image(tmp / "init-odd.png", (60, 48))
    write_image(tmp / "mask.png", (64, 48), "L")
    write_image(tmp / "mask-small.png", (32, 48), "L")
    (tmp / "blank.txt").write_text("\n  \n\n")
    (tmp / "notes.txt").write_text("not an image")
    write_image(tmp / "plain.png", (8, 8))  # a PNG without metadata
    m = ["--model", MODEL_FILE]
    return [
        (["txt2img", *m, "a", "--width", "60"], "--width: must be a positive multiple of 8, got 60"),
        (["txt2img", *m, "a", "--height", "-8"], "--height: must be a positive multiple of 8, got -8"),
        (["txt2img", *m, "a", "--height", "0"], "--height: must be a positive multiple of 8, got 0"),
        (["txt2img", *m, "a", "--steps", "0"], "--steps: must be >= 1, got 0"),
        (["txt2img", *m, "a", "--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
        (["txt2img", *m, "a", "--sampler", "eulr"], "--sampler: unknown sampler 'eulr'; one of: ddim, ddpm, dpm2"),
        (["txt2img", *m, "a", "--schedule", "cosine"], "--schedule: unknown value 'cosine'; one of: discrete, karras"),
        (["txt2img", *m, "a", "--sampler", "euler", "--eta", "0.5"], "--eta: sampler 'euler' has no eta"),
        (["txt2img", *m, "a", "--rescale", "1.5"], "--rescale: must be in [0, 1], got 1.5"),
        (["txt2img", *m, "a", "--cfg", "-1"], "--cfg: must be >= 0, got -1.0"),
        (["txt2img", *m, "a", "--n", "0"], "--n: must be >= 1, got 0"),
        (["txt2img", *m, "a", "--batch", "0"], "--batch: must be >= 1, got 0"),
        (["txt2img", *m, "a", "--seed", "-3"], "--seed: must be >= 0, got -3"),
        (["txt2img", *m, "a", "--clip-skip", "0"], "--clip-skip: must be >= 1, got 0"),
        (["txt2img", *m, "a", "--dtype", "fp8"], "--dtype: unknown value 'fp8'; one of: fp32, fp16, bf16"),
        (["txt2img", *m, "a", "--device", "potato"], "--device: "),
        (["txt2img", *m], "no prompt: give PROMPT arguments, --prompt-file FILE or --from-png FILE"),
        (["txt2img", *m, "--prompt-file", "nope.txt"], "--prompt-file nope.txt: no such file"),
        (["txt2img", *m, "--prompt-file", "blank.txt"], "--prompt-file blank.txt: no prompts (only blank lines)"),
        (["txt2img", *m, "--from-png", "plain.png"], "plain.png: carries no generation parameters"),
        (["txt2img", *m, "--from-png", "gone.png"], "gone.png: no such file"),
        (["txt2img", "--model", "no/such/model", "a"], "--model no/such/model: no such file or folder"),
        (["txt2img", "--model", "notes.txt", "a"], "notes.txt"),  # exists, but no model format
        (["txt2img", *m, "a", "--out", "notes.txt"], "--out notes.txt: exists and is not a folder"),
        (["txt2img", "a", "--grid-scale", "0"], "--grid-scale: must be in [1, 16], got 0"),
        (["img2img", *m, "a"], "the following arguments are required: --init"),
        (["img2img", *m, "a", "--init", "none.png"], "--init none.png: no such file"),
        (["img2img", *m, "a", "--init", "notes.txt"], "--init notes.txt: not a readable image"),
        (["img2img", *m, "a", "--init", "init-odd.png"], "--init init-odd.png: 60x48 is not a multiple of 8"),
        (["img2img", *m, "a", "--init", "init.png", "--width", "128"], "--init init.png: is 64x48, but the size asked"
                                                                       " for is 128x48"),
        (["img2img", *m, "a", "--init", "init.png", "--strength", "1.2"], "--strength: must be in [0, 1], got 1.2"),
        (["img2img", *m, "a", "--init", "init.png", "--strength", "0.1", "--steps", "5"],
         "--strength 0.1 with --steps 5 runs int(steps * strength) = 0 steps"),
        (["inpaint", *m, "a", "--init", "init.png"], "the following arguments are required: --mask"),
        (["inpaint", *m, "a", "--init", "init.png", "--mask", "mask-small.png"],
         "--mask mask-small.png: is 32x48, the --init image 64x48; they must be the same size"),
        (["inpaint", *m, "a", "--init", "init.png", "--mask", "mask.png", "--inpaint-mode", "glue"],
         "argument --inpaint-mode: invalid choice: 'glue'"),
    ]  # fmt: skip


def test_bad_input_is_one_line_exit_2_before_loading(fake, tmp_path, capsys):
    for argv, message in bad_input_cases(tmp_path):
        assert exit_code(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, (argv, err)
        assert err.startswith(f"ldm {argv[0]}: error: "), err
        assert message in err, (argv, err)
    assert fake.instances == []  # nothing loaded
    assert not (tmp_path / "outputs").exists()  # nothing written


def exit_code(argv) -> int:
    try:
        return run(*argv)
    except SystemExit as e:  # argparse's own errors (bad int, missing required option) exit from parse_args
        return e.code


def test_error_found_by_the_loaded_model_comes_before_any_step(fake, tmp_path, capsys):
    assert run("txt2img", "--model", MODEL_FILE, "a", "--cfg", "13") == 2
    err = capsys.readouterr().err.strip()
    assert err == "ldm txt2img: error: cfg_scale 13 is unlucky for this model"
    assert fake.instances[0].checks and fake.instances[0].calls == []
    assert pngs(tmp_path / "outputs") == []


def test_module_entry_point_reports_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "inference.txt2img", "--model", str(tmp_path / "nope"), "a"],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[1])  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"ldm txt2img: error: --model {tmp_path / 'nope'}: no such file or folder"
    proc = subprocess.run([sys.executable, "-m", "inference.txt2img", "--bogus"],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[1])  # fmt: skip
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("ldm txt2img: error: ")


# ------------------------------------------------------------------------------------------------ help


def test_help_explains_every_option_with_its_default(capsys):
    for mode in ("txt2img", "img2img", "inpaint"):
        with pytest.raises(SystemExit):
            main([mode, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        for flag in ("--model", "--prompt-file", "--negative", "--steps", "--sampler", "--schedule", "--cfg",
                     "--rescale", "--seed", "--width", "--height", "--batch", "--n", "--device", "--dtype", "--tile",
                     "--compile", "--clip-skip", "--eta", "--out", "--grid", "--from-png"):  # fmt: skip
            assert flag in out, (mode, flag)
        for default in ("else 25", "else dpmpp_2m", "else discrete", "else 7.5", "else random", "default: outputs/",
                        "default: fp32", "images per prompt (default: 1)"):  # fmt: skip
            assert default in out, (mode, default)
        assert ("--strength" in out) == (mode != "txt2img") and ("--mask" in out) == (mode == "inpaint")
        if mode == "inpaint":
            assert "--inpaint-mode" in out and "(default: auto)" in out


# ------------------------------------------------------------------------------------------------ runs


def test_prompts_n_seeds_names_and_metadata(fake, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a cat\n\n   \na dog, at night\n")
    argv = ["txt2img", "--model", MODEL_FILE, "a fox", "--prompt-file", "prompts.txt", "--n", "2", "--seed", "7",
            "--batch", "4", "--steps", "3", "--sampler", "euler", "--schedule", "karras", "--cfg", "5",
            "--negative", "blurry", "--width", "32", "--height", "16", "--clip-skip", "2", "-q"]  # fmt: skip
    assert run(*argv) == 0
    out = tmp_path / "outputs"
    prompts = ["a fox", "a fox", "a cat", "a cat", "a dog, at night", "a dog, at night"]
    names = [f"{k:05d}-{7 + k}.png" for k in range(6)]
    assert pngs(out) == names
    printed = capsys.readouterr().out.split()
    assert printed == [str(Path("outputs") / n) for n in names]  # where the images are
    for k, name in enumerate(names):
        got = read_png_params(out / name)
        want = GenerationParams(prompt=prompts[k], negative="blurry", steps=3, sampler="euler", schedule="karras",
                                cfg_scale=5.0, seed=7 + k, width=32, height=16, model="fake",
                                model_hash="0123456789", clip_skip=2)  # fmt: skip
        assert got == want
        assert np.array_equal(pixels(out / name), np.asarray(fake_image(prompts[k], 7 + k, 32, 16)))
    pipe = fake.instances[0]
    assert [len(c["prompt"]) for c in pipe.calls] == [4, 2]  # --batch 4
    assert [c["seed"] for c in pipe.calls] == [7, 11] and all(c["n"] == 1 for c in pipe.calls)
    from ldm.speed import SpeedConfig

    assert pipe.load_kwargs == dict(device="cpu", dtype="fp32", family=None, prediction=None, config_overrides=[],
                                    speed=SpeedConfig())  # fmt: skip
    assert Path(pipe.path) == Path(MODEL_FILE)


def test_defaults_size_from_model_random_seed_and_numbering_continues(fake, tmp_path):
    assert run("txt2img", "--model", MODEL_FILE, "a", "b", "-q") == 0
    first = pngs(tmp_path / "outputs")
    params = [read_png_params(tmp_path / "outputs" / n) for n in first]
    assert [(p.width, p.height) for p in params] == [fake.instances[0].default_size] * 2
    d = GenerationParams(prompt="")
    assert all((p.steps, p.sampler, p.schedule, p.cfg_scale, p.negative) == (25, "dpmpp_2m", "discrete", 7.5, "")
               and p.eta is None and p.clip_skip is None and p.guidance_rescale == d.guidance_rescale
               for p in params)  # fmt: skip
    assert params[1].seed == params[0].seed + 1
    assert [n.split("-")[0] for n in first] == ["00000", "00001"]
    assert run("txt2img", "--model", MODEL_FILE, "c", "--seed", "3", "-q") == 0  # next run: the next number
    assert pngs(tmp_path / "outputs") == sorted(first + ["00002-3.png"])


def test_batch_size_does_not_change_the_files(fake, tmp_path):
    for batch in (1, 3):
        assert run("txt2img", "--model", MODEL_FILE, "x", "y", "--n", "2", "--seed", "1", "--batch", batch,
                   "--out", f"b{batch}", "-q") == 0  # fmt: skip
    assert pngs(tmp_path / "b1") == pngs(tmp_path / "b3")
    for name in pngs(tmp_path / "b1"):
        assert np.array_equal(pixels(tmp_path / "b1" / name), pixels(tmp_path / "b3" / name))
        assert read_png_params(tmp_path / "b1" / name) == read_png_params(tmp_path / "b3" / name)


def test_from_png_takes_its_settings_and_flags_override(fake, tmp_path):
    src = GenerationParams(prompt="a lighthouse, storm", negative="text", steps=4, sampler="ddim",
                           schedule="exponential", cfg_scale=3.5, seed=1234, width=24, height=40, model="other",
                           model_hash="ffffffffff", guidance_rescale=0.5, clip_skip=2, eta=0.3)  # fmt: skip
    fake_image("ignored", 0, 24, 40).save(tmp_path / "src.png", pnginfo=png_info(src))
    assert run("txt2img", "--model", MODEL_FILE, "--from-png", "src.png", "--out", "same", "-q") == 0
    (name,) = pngs(tmp_path / "same")
    assert name == "00000-1234.png"
    got = read_png_params(tmp_path / "same" / name)
    assert asdict(got) == {**asdict(src), "model": "fake", "model_hash": "0123456789"}
    assert run("txt2img", "--model", MODEL_FILE, "--from-png", "src.png", "--out", "changed", "--steps", "6",
               "--seed", "9", "--sampler", "euler", "--negative", "", "a boat", "-q") == 0  # fmt: skip
    got = read_png_params(tmp_path / "changed" / "00000-9.png")
    assert (got.prompt, got.steps, got.seed, got.sampler, got.negative) == ("a boat", 6, 9, "euler", "")
    assert (got.schedule, got.cfg_scale, got.width, got.height, got.clip_skip) == ("exponential", 3.5, 24, 40, 2)
    assert got.eta is None  # the stored eta belongs to ddim; euler has none, so it is dropped, not an error


def test_img2img_and_inpaint_pass_images_and_strength(fake, tmp_path):
    write_image(tmp_path / "init.png", (32, 24))
    write_image(tmp_path / "mask.png", (32, 24), "L")
    assert run("img2img", "--model", MODEL_FILE, "a", "--init", "init.png", "--strength", "0.5", "--steps", "4",
               "-q") == 0  # fmt: skip
    call = fake.instances[-1].calls[0]
    assert (call["width"], call["height"], call["strength"]) == (32, 24, 0.5)
    assert np.array_equal(np.asarray(call["init_image"].convert("RGB")), pixels(tmp_path / "init.png"))
    assert call["mask"] is None and "inpaint" not in call
    p = read_png_params(tmp_path / "outputs" / pngs(tmp_path / "outputs")[0])
    assert (p.mode, p.strength, p.width, p.height) == ("img2img", 0.5, 32, 24)
    assert run("inpaint", "--model", MODEL_FILE, "a", "--init", "init.png", "--mask", "mask.png",
               "--inpaint-mode", "blend", "--out", "inp", "-q") == 0  # fmt: skip
    call = fake.instances[-1].calls[0]
    assert call["inpaint"] == "blend" and call["strength"] == 0.8 and call["mask"] is not None


def test_grid_compile_tile_and_progress(fake, tmp_path, capsys):
    assert run("txt2img", "--model", MODEL_FILE, "p", "q", "--n", "3", "--seed", "0", "--width", "16",
               "--height", "8", "--grid", "--compile", "--tile", "--steps", "2") == 0  # fmt: skip
    out = tmp_path / "outputs"
    assert (out / "grid-00000.png").exists() and "grid-00000.png" in capsys.readouterr().out
    grid = pixels(out / "grid-00000.png")
    assert grid.shape == (2 * 8, 3 * 16, 3)  # one row per prompt, n per row
    for k in range(6):
        r, c = divmod(k, 3)
        cell = grid[r * 8 : (r + 1) * 8, c * 16 : (c + 1) * 16]
        assert np.array_equal(cell, np.asarray(fake_image("pq"[r], k, 16, 8)))
    pipe = fake.instances[0]
    assert pipe.load_kwargs["speed"].compile == "default"  # --compile alone: torch.compile's default mode
    assert pipe.calls[0]["tile"] == generate_cli.TILE
    assert run("txt2img", "--model", MODEL_FILE, "p", "--tile", "32", "--steps", "2", "--out", "t") == 0
    assert fake.instances[-1].calls[0]["tile"] == 32 and fake.instances[-1].load_kwargs["speed"].compile == "none"
    err = capsys.readouterr().err
    assert "2/2" in err and "step" in err  # the tqdm bar


def test_choices_are_those_of_the_library():
    """The command keeps its own copies (``ldm --help`` imports no torch); they must match the library's."""
    from inference.pipeline import INPAINT_MODES
    from ldm.bundle import DTYPES
    from ldm.schedule import SIGMA_SPACINGS

    assert generate_cli.SCHEDULES == SIGMA_SPACINGS
    assert generate_cli.INPAINT_MODES == INPAINT_MODES
    assert tuple(generate_cli.DTYPES) == tuple(DTYPES)


def test_grid_layout():
    from inference.grid import grid_columns, image_grid

    assert grid_columns(6, 2) == 3 and grid_columns(5, 5) == 3 and grid_columns(4, 1) == 2 and grid_columns(1, 1) == 1
    ims = [Image.new("RGB", (4, 2), (k, 0, 0)) for k in range(1, 6)]
    g = np.asarray(image_grid(ims, cols=2))
    assert g.shape == (3 * 2, 2 * 4, 3)
    assert [g[r * 2, c * 4, 0] for r in range(3) for c in range(2)] == [1, 2, 3, 4, 5, 0]  # last cell empty
    with pytest.raises(ValueError, match="differ in size"):
        image_grid([Image.new("RGB", (4, 2)), Image.new("RGB", (2, 4))])


def test_generation_params_fields_are_all_written(fake, tmp_path):
    """Every field of GenerationParams reaches the PNG (a new field would need the command to fill it)."""
    assert run("txt2img", "--model", MODEL_FILE, "z", "--seed", "1", "--rescale", "0.25", "--sampler", "ddim",
               "--eta", "0.5", "-q") == 0  # fmt: skip
    got = read_png_params(tmp_path / "outputs" / "00000-1.png")
    assert {f.name for f in fields(GenerationParams)} == set(asdict(got))
    assert (got.guidance_rescale, got.eta, got.sampler) == (0.25, 0.5, "ddim")


# ------------------------------------------------------------------------------------------------ the real pipeline


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random SD 1.x model in our folder format."""
    from ldm.bundle import save_bundle
    from tests.test_format_native import random_bundle

    path = tmp_path_factory.mktemp("model") / "tiny"
    save_bundle(random_bundle("sd1", seed=3), path)
    return path


@pytest.fixture
def real_pipeline():
    return pytest.importorskip("inference.pipeline").Pipeline


def test_real_txt2img_metadata_equals_the_parameters_and_from_png_is_bit_exact(real_pipeline, tiny_model, tmp_path,
                                                                                monkeypatch):  # fmt: skip
    from inference.metadata import model_hash

    monkeypatch.chdir(tmp_path)
    assert run("txt2img", "--model", tiny_model, "a fox", "a cat, at night", "--n", "2", "--seed", "3",
               "--steps", "2", "--sampler", "euler_ancestral", "--eta", "0.7", "--schedule", "karras", "--cfg", "5",
               "--negative", "blur", "--width", "32", "--height", "24", "-q") == 0  # fmt: skip
    names = pngs(tmp_path / "outputs")
    assert names == ["00000-3.png", "00001-4.png", "00002-5.png", "00003-6.png"]
    prompts = ["a fox", "a fox", "a cat, at night", "a cat, at night"]
    for k, name in enumerate(names):
        assert read_png_params(tmp_path / "outputs" / name) == GenerationParams(
            prompt=prompts[k], negative="blur", steps=2, sampler="euler_ancestral", schedule="karras", cfg_scale=5.0,
            seed=3 + k, width=32, height=24, model="tiny", model_hash=model_hash(tiny_model), eta=0.7,
        )  # fmt: skip
    # the same image straight from the Pipeline: the command passed every setting on
    direct = real_pipeline.load(tiny_model)("a cat, at night", negative="blur", steps=2, sampler="euler_ancestral",
                                            schedule="karras", cfg_scale=5.0, seed=5, width=32, height=24, eta=0.7)
    assert np.array_equal(pixels(tmp_path / "outputs" / names[2]), np.asarray(direct.images[0]))
    # --from-png alone reproduces each image bit for bit, metadata included
    assert run("txt2img", "--model", tiny_model, "--from-png", "outputs/00003-6.png", "--out", "again", "-q") == 0
    assert pngs(tmp_path / "again") == ["00000-6.png"]
    assert np.array_equal(pixels(tmp_path / "again" / "00000-6.png"), pixels(tmp_path / "outputs" / "00003-6.png"))
    assert read_png_params(tmp_path / "again" / "00000-6.png") == read_png_params(tmp_path / "outputs" / names[3])


def test_real_img2img_and_inpaint(real_pipeline, tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save("init.png")
    mask = np.zeros((24, 32), np.uint8)
    mask[:, 16:] = 255  # regenerate the right half
    Image.fromarray(mask).save("mask.png")
    assert run("img2img", "--model", tiny_model, "a fox", "--init", "init.png", "--strength", "0.5", "--steps", "4",
               "--seed", "11", "--out", "i2i", "-q") == 0  # fmt: skip
    p = read_png_params(tmp_path / "i2i" / "00000-11.png")
    assert (p.mode, p.strength, p.steps, p.width, p.height, p.seed) == ("img2img", 0.5, 4, 32, 24, 11)
    assert run("img2img", "--model", tiny_model, "--from-png", "i2i/00000-11.png", "--init", "init.png",
               "--out", "i2i-again", "-q") == 0  # fmt: skip
    assert np.array_equal(pixels(tmp_path / "i2i-again" / "00000-11.png"), pixels(tmp_path / "i2i" / "00000-11.png"))
    assert run("inpaint", "--model", tiny_model, "a fox", "--init", "init.png", "--mask", "mask.png", "--steps", "2",
               "--strength", "1", "--seed", "2", "--inpaint-mode", "blend", "--out", "inp", "-q") == 0  # fmt: skip
    p = read_png_params(tmp_path / "inp" / "00000-2.png")
    assert (p.mode, p.strength) == ("inpaint", 1.0)
    assert pixels(tmp_path / "inp" / "00000-2.png").shape == (24, 32, 3)


def test_without_model_the_embedded_default_makes_the_images(tmp_path):
    """No --model: the committed model (inference/default_model), 32 px, with its own config; the enlarged grid is
    the images scaled by nearest neighbour."""
    from PIL import Image

    from inference.default_model import default_model_path
    from inference.pipeline import Pipeline

    out = tmp_path / "out"
    assert exit_code(["txt2img", "a red circle", "--steps", "4", "--seed", "3", "--cfg", "5", "--grid",
                      "--grid-scale", "2", "--out", str(out), "-q"]) == 0  # fmt: skip
    made = np.asarray(Image.open(out / "00000-3.png").convert("RGB"))
    assert made.shape == (32, 32, 3)
    want = Pipeline.load(default_model_path())("a red circle", steps=4, seed=3, cfg_scale=5).images[0]
    np.testing.assert_array_equal(made, np.asarray(want.convert("RGB")))
    grid = np.asarray(Image.open(out / "grid-00000.png").convert("RGB"))
    np.testing.assert_array_equal(grid, made.repeat(2, axis=0).repeat(2, axis=1))
