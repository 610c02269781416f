"""``ldm eval`` and inference/evaluate.py: prompt adherence as numbers.

The expectations come from outside the code under test: a stand-in pipeline that "generates" the ground-truth
rendering of each prompt's scene (ldm.shapes.place + render) must score 100% on every check, and one that draws
each object in another colour must score 0% on colour and 100% on shape (the checker's rules, ldm/shapes/checker.py).
The command then runs end to end on a tiny random model, and every bad argument must stop it before the model loads.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from inference import eval_cli
from inference.evaluate import GRID_TILE, evaluate_adherence, labelled_grid
from ldm.cli import main
from ldm.shapes import COLOURS, Scene, SceneObject, parse_caption, place, prompt_set, render, score

SHAPES_COLUMNS = eval_cli.SUITES["shapes"].columns
CHECKS = ("colour_ok", "shape_ok", "count_ok", "colour_shape_ok", "size_ok", "position_ok", "relation_ok", "ok")


# ------------------------------------------------------------------------------------------------ stand-ins


def shifted_colour(colour: str) -> str:
    """The next palette colour: a shift by one over 8 colours maps no colour, nor any pair, onto itself."""
    names = list(COLOURS)
    return names[(names.index(colour) + 1) % len(names)]


class RenderingPipeline:
    """The Pipeline contract; image k is the prompt's scene placed by seed k and rendered (the ground truth), with
    each object's colour shifted when ``recolour``."""

    def __init__(self, recolour: bool = False):
        self.recolour, self.calls = recolour, []
        self.name, self.model_hash, self.default_size = "stand-in", "0123456789", (32, 32)

    def check(self, **kwargs) -> None:
        self.checked = kwargs

    def __call__(self, prompts, *, seed, n, width, height, steps, sampler, cfg_scale, callback=None):
        assert n == 1 and width == height
        self.calls.append(dict(prompts=list(prompts), seeds=list(seed), steps=steps, sampler=sampler, cfg=cfg_scale))
        images = []
        for prompt, s in zip(prompts, seed):
            scene = parse_caption(prompt)
            if self.recolour:
                objects = [SceneObject(shifted_colour(o.colour), o.shape, o.size, o.position) for o in scene.objects]
                scene = Scene(tuple(objects), scene.relation)
            images.append(render(place(scene, np.random.default_rng(s)), width))
        for i in range(steps):
            if callback is not None:
                callback(SimpleNamespace(i=i))
        return SimpleNamespace(images=images)


PROMPTS = prompt_set("single", 12) + prompt_set("relation", 12)


# ------------------------------------------------------------------------------------------------ the library


def test_ground_truth_images_adhere_fully_with_seed_i_in_batches():
    pipe = RenderingPipeline()
    result = evaluate_adherence(pipe, PROMPTS, sampler="euler", steps=3, cfg_scale=4.0, seed=7, batch_size=5)
    assert all(result[k] == 1.0 for k in CHECKS) and result["n"] == 24
    for kind, unstated in (("single", "relation_ok"), ("relation", "position_ok")):
        summary = result["by_kind"][kind]
        assert summary["n"] == 12 and summary[unstated] is None
        assert all(summary[k] == 1.0 for k in CHECKS if k != unstated)
    assert [r["prompt"] for r in result["scores"]] == PROMPTS
    assert [r["seed"] for r in result["scores"]] == result["seeds"] == list(range(7, 31))
    assert [r["kind"] for r in result["scores"]] == ["single"] * 12 + ["relation"] * 12
    assert [len(c["prompts"]) for c in pipe.calls] == [5, 5, 5, 5, 4]
    assert [s for c in pipe.calls for s in c["seeds"]] == list(range(7, 31))
    assert {(c["steps"], c["sampler"], c["cfg"]) for c in pipe.calls} == {(3, "euler", 4.0)}
    assert len(result["images"]) == 24 and result["images"][0].size == (32, 32)  # the model's default size


def test_wrong_colour_scores_zero_colour_and_full_shape():
    result = evaluate_adherence(RenderingPipeline(recolour=True), PROMPTS, steps=1, seed=0, batch_size=24)
    assert result["colour_ok"] == result["colour_shape_ok"] == result["ok"] == 0.0
    assert result["shape_ok"] == result["count_ok"] == 1.0
    # no detection has the prompt's colour and shape, so nothing can be matched: sizes, places, relations fail
    assert result["size_ok"] == result["position_ok"] == result["relation_ok"] == 0.0


def test_seed_list_resolution_and_bad_arguments():
    pipe = RenderingPipeline()
    result = evaluate_adherence(pipe, PROMPTS[:3], seed=[5, 0, 5], resolution=48, steps=1)
    assert [r["seed"] for r in result["scores"]] == [5, 0, 5] and result["images"][0].size == (48, 48)
    for kwargs, name in ((dict(prompts=[]), "prompts"), (dict(seed=[1]), "seed"), (dict(seed=-1), "seed"),
                         (dict(batch_size=0), "batch_size")):  # fmt: skip
        args = dict(prompts=PROMPTS[:2]) | kwargs
        with pytest.raises(ValueError, match=f"^{name}"):
            evaluate_adherence(pipe, args.pop("prompts"), **args)


def test_labelled_grid_frames_scales_and_lays_out():
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (90, 90, 90), (250, 250, 0)]
    images = [Image.new("RGB", (32, 32), c) for c in colours]
    ok = [True, False, True, False, False]
    grid = labelled_grid(images, [f"image {k}\nline two" for k in range(5)], ok, cols=4)
    cell = GRID_TILE + 4
    assert grid.width == 4 * cell and grid.height % 2 == 0 and grid.height > 2 * cell  # 2 rows, text below
    row_h = grid.height // 2
    for k, (colour, good) in enumerate(zip(colours, ok)):
        x, y = (k % 4) * cell, (k // 4) * row_h
        assert grid.getpixel((x, y)) == ((40, 160, 60) if good else (200, 40, 40))  # the frame
        assert grid.getpixel((x + 2 + GRID_TILE // 2, y + 2 + GRID_TILE // 2)) == colour  # the image, scaled
        text = np.asarray(grid.crop((x, y + cell, x + cell, y + row_h)))
        assert (text < 100).any()  # dark label pixels under the image
    with pytest.raises(ValueError, match="equally long"):
        labelled_grid(images, ["a"], ok)


def test_table_prints_percentages_and_dashes():
    kind = dict(n=2, colour_shape_ok=0.5, size_ok=None, position_ok=1.0, relation_ok=None, ok=0.5)
    result = dict(n=3, colour_shape_ok=2 / 3, size_ok=0.0, position_ok=1.0, relation_ok=0.0, ok=1 / 3,
                  by_kind={"single": kind, "relation": dict(kind, n=1, position_ok=None, relation_ok=0.0, ok=0.0)})
    lines = [line.split() for line in eval_cli.table(result, SHAPES_COLUMNS).splitlines()]
    assert lines == [["kind", "n", "colour+shape", "size", "position", "relation", "all"],
                     ["single", "2", "50.0%", "-", "100.0%", "-", "50.0%"],
                     ["relation", "1", "50.0%", "-", "-", "0.0%", "0.0%"],
                     ["all", "3", "66.7%", "0.0%", "100.0%", "0.0%", "33.3%"]]  # fmt: skip


# ------------------------------------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random SD 1.x model (VAE factor 4, default size 32 px) in our folder format."""
    from ldm.bundle import save_bundle
    from tests.test_format_native import random_bundle

    path = tmp_path_factory.mktemp("model") / "tiny"
    save_bundle(random_bundle("sd1", seed=3), path)
    return path


def run(*argv) -> int:
    return main(["eval", *map(str, argv)])


def test_command_with_a_stand_in_reports_the_checker_numbers(tiny_model, tmp_path, monkeypatch, capsys):
    """Prompts from a file (comments and blanks skipped, --n caps them): ground truth is 100%, recoloured 0%."""
    (tmp_path / "prompts.txt").write_text("# mine\na red circle on the left\n\na blue square above a green cross\n"
                                          "a small black diamond\n")  # fmt: skip
    for recolour, want in ((False, "100.0%"), (True, "0.0%")):
        pipes = []
        monkeypatch.setattr(eval_cli, "load_pipeline", lambda path, **kw: pipes.append(RenderingPipeline(recolour))
                            or pipes[-1])  # fmt: skip
        out = tmp_path / f"out{recolour}"
        assert run("--model", tiny_model, "--prompts", tmp_path / "prompts.txt", "--n", 2, "--out", out, "-q") == 0
        rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
        assert rows["single"][1:3] == ["1", want] and rows["relation"][1:3] == ["1", want]
        report = json.loads((out / "adherence.json").read_text())
        want = ["a red circle on the left", "a blue square above a green cross"]
        assert [r["prompt"] for r in report["scores"]] == want
        assert [r["seed"] for r in report["scores"]] == [0, 1]
        assert report["settings"]["n"] == {"prompts.txt": 2} and report["summary"]["colour_ok"] == float(not recolour)
        assert pipes[0].checked["width"] == 32  # checked by the model before the run, at the model's default size


def test_command_end_to_end_on_a_tiny_model(tiny_model, tmp_path, monkeypatch, capsys):
    from inference.metadata import model_hash
    from inference.pipeline import Pipeline

    monkeypatch.chdir(tmp_path)
    assert run("--model", tiny_model, "--n", 4, "--steps", 2, "--seed", 5, "--batch-size", 3, "--sampler", "euler",
               "--cfg-scale", 3, "--out", "ev", "-q") == 0  # fmt: skip
    out = capsys.readouterr().out
    assert [line.split()[:2] for line in out.splitlines()[2:5]] == [["single", "4"], ["relation", "4"], ["all", "8"]]
    assert "wrote ev/adherence.json" in out and "wrote ev/grid-relation.png" in out

    report = json.loads((tmp_path / "ev" / "adherence.json").read_text())
    assert set(report) == {"suite", "model", "settings", "seconds", "summary", "scores"}
    assert report["model"] == {"path": str(tiny_model), "name": "tiny", "hash": model_hash(tiny_model)}
    assert report["settings"] == dict(prompts="both", n={"single": 4, "relation": 4}, prompt_seed=0, sampler="euler",
                                      steps=2, cfg_scale=3.0, seed=5, batch_size=3, resolution=32, device="cpu",
                                      dtype="fp32", teleport=0.0, teleport_stats=None)  # fmt: skip
    scores = report["scores"]
    assert [r["prompt"] for r in scores] == prompt_set("single", 4) + prompt_set("relation", 4)
    assert [r["seed"] for r in scores] == [5, 6, 7, 8] * 2  # each set's seeds start at --seed
    assert [r["kind"] for r in scores] == ["single"] * 4 + ["relation"] * 4
    summary = report["summary"]
    for rows, s in ((scores, summary), (scores[:4], summary["by_kind"]["single"]),
                    (scores[4:], summary["by_kind"]["relation"])):  # fmt: skip
        assert s["n"] == len(rows)
        for key in CHECKS:
            stated = [r[key] for r in rows if r[key] is not None]
            assert s[key] == (pytest.approx(np.mean(stated)) if stated else None)

    # relation prompt 1's image is the pipeline's image of (prompt, seed 6) made alone, pixel for pixel (the grid
    # shows it scaled 4x by nearest neighbour, in a 2 px frame), and the checker scores it the same
    prompt = scores[5]["prompt"]
    alone = Pipeline.load(tiny_model)(prompt, seed=6, steps=2, sampler="euler", cfg_scale=3.0, width=32, height=32)
    again = score(prompt, alone.images[0])
    assert {k: scores[5][k] for k in (*CHECKS, "n_detected")} == {k: again[k] for k in (*CHECKS, "n_detected")}
    cell = GRID_TILE + 4
    for kind in ("single", "relation"):
        with Image.open(tmp_path / "ev" / f"grid-{kind}.png") as grid:
            assert grid.width == 4 * cell and grid.height > cell  # the 4 images of the kind in one row, labels below
            if kind == "relation":
                shown = np.asarray(grid.convert("RGB"))[2 : 2 + GRID_TILE : 4, cell + 2 : cell + 2 + GRID_TILE : 4]
                assert np.array_equal(shown, np.asarray(alone.images[0]))


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--suite", "--model", "--prompts", "--n", "--prompt-seed", "--steps", "--sampler", "--cfg-scale",
                   "--seed", "--batch-size", "--resolution", "--out", "--device", "--dtype", "--quiet"):  # fmt: skip
        assert option in text
    assert "default: both" in text and "single, relation" in text and "seed + i" in text


def bad_input_cases(tmp: Path) -> list[tuple[list, str]]:
    (tmp / "empty.txt").write_text("\n# only a comment\n  \n")
    (tmp / "bad.txt").write_text("a red circle\na dog on a sofa\n")
    (tmp / "notes.txt").write_text("not a model")
    (tmp / "afile").write_text("")
    return [
        (["--model", tmp / "missing"], f"--model {tmp / 'missing'}: no such file or folder"),
        (["--model", tmp / "notes.txt"], f"--model {tmp / 'notes.txt'}: unknown checkpoint file type"),
        (["--n", 0], "--n: must be >= 1, got 0"),
        (["--steps", 0], "--steps: must be >= 1, got 0"),
        (["--batch-size", 0], "--batch-size: must be >= 1, got 0"),
        (["--seed", -1], "--seed: must be >= 0, got -1"),
        (["--cfg-scale", -1], "--cfg-scale: must be >= 0, got -1.0"),
        (["--sampler", "nope"], "--sampler: unknown sampler 'nope'"),
        (["--prompts", "triple"], "--prompts triple: neither a prompt set of the shapes suite (single, relation, "
                                  "both) nor an existing file"),
        (["--prompts", tmp / "empty.txt"], f"--prompts {tmp / 'empty.txt'}: no prompts"),
        (["--prompts", tmp / "bad.txt"], f"--prompts {tmp / 'bad.txt'} line 2: caption 'a dog on a sofa' is outside"),
        (["--resolution", 30], "--resolution: must be a multiple of 4 (the VAE's downsampling factor"),
        (["--resolution", 4], "--resolution: must be >= 8, got 4"),
        (["--out", tmp / "afile"], f"--out {tmp / 'afile'}: exists and is not a folder"),
        (["--suite", "nope"], "argument --suite: invalid choice: 'nope'"),
        (["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    ]  # fmt: skip


def exit_code(*argv) -> int:
    try:
        return run(*argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


def test_bad_input_is_one_line_exit_2_before_loading(tiny_model, tmp_path, monkeypatch, capsys):
    def never(path, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(eval_cli, "load_pipeline", never)
    for argv, message in bad_input_cases(tmp_path):
        model = [] if "--model" in argv else ["--model", tiny_model]
        out = [] if "--out" in argv else ["--out", tmp_path / "out"]
        assert exit_code(*model, *argv, *out) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, (argv, err)


def test_resolution_of_a_single_file_model_is_checked_once_loaded_before_any_step(tiny_model, tmp_path, capsys):
    """A single .safetensors file's VAE factor is known only from its weights: the loaded model checks it."""
    from ldm.bundle import load_bundle, save_bundle

    save_bundle(load_bundle(tiny_model), tmp_path / "tiny.safetensors", format="original")
    assert run("--model", tmp_path / "tiny.safetensors", "--resolution", 30, "--out", tmp_path / "out", "-q") == 2
    err = capsys.readouterr().err
    assert "--resolution: must be a positive multiple of 4 (the VAE's downsampling factor), got 30" in err
    assert not (tmp_path / "out").exists()


def test_no_model_and_no_default_model_names_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "inference.default_model", None)  # the module does not exist
    assert run("--out", tmp_path) == 2
    assert "no --model given and no embedded default model found at inference.default_model" in capsys.readouterr().err
    module = ModuleType("inference.default_model")
    module.default_model_path = lambda: tmp_path / "default-model"
    module.__spec__ = SimpleNamespace(name="inference.default_model")
    monkeypatch.setitem(sys.modules, "inference.default_model", module)
    assert run("--out", tmp_path) == 2
    assert f"no --model given and no embedded default model found at {tmp_path / 'default-model'}" in (
        capsys.readouterr().err)  # fmt: skip
