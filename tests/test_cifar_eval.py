"""The cifar10 eval suite and its parts: Fréchet distance (ldm/metrics/fd.py), the CIFAR-10 classifier
(ldm/metrics/cifar_net.py, training/classifier.py) and ``ldm eval --suite cifar10`` (inference/cifar_eval.py).

References are independent of the code: closed forms of the Fréchet distance between Gaussians (diagonal, commuting,
and the 2x2 identity tr(sqrt(M)) = sqrt(tr M + 2 sqrt(det M)) for a non-commuting pair), a learning problem the
classifier must actually solve, a stand-in "model" whose samples are the test split itself (so FD-cls must be 0 and
the class accuracy must equal the classifier's own test accuracy), and a stand-in VAE with a known error (PSNR closed
form). Real-data tests read $LDM_DATA or ../shared/data and skip, saying why, when it is absent.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from inference import eval_cli
from inference.cifar_eval import class_prompts, evaluate_cifar10, vae_reconstruction_psnr
from ldm.cli import main
from ldm.metrics.cifar_data import load_cifar_split
from ldm.metrics.cifar_net import (CIFAR10_CLASSES, CifarNet, CifarNetConfig, class_caption, embed, load_classifier,
                                   save_classifier)  # fmt: skip
from ldm.metrics.fd import feature_stats, frechet_distance
from training.classifier import augment, predict, train_steps

DATA = Path(os.environ.get("LDM_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
CIFAR = DATA / "cifar10"
needs_cifar = pytest.mark.skipif(not (CIFAR / "test.parquet").is_file(), reason=f"CIFAR-10 not found at {CIFAR}; "
                                 "set LDM_DATA to the folder holding cifar10/ (see shared/data/README.md)")  # fmt: skip


# ------------------------------------------------------------------------------------------------ Fréchet distance


def random_spd(d: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_fd_diagonal_and_commuting_closed_forms():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = (torch.randn(6, generator=g, dtype=torch.float64) for _ in range(2))
    s1, s2 = (torch.rand(6, generator=g, dtype=torch.float64) + 0.1 for _ in range(2))
    want = float((mu1 - mu2).square().sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum())
    assert frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(want, rel=1e-10)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))  # a common eigenbasis: S1 S2 = S2 S1
    c1, c2 = q @ torch.diag(s1.double()) @ q.T, q @ torch.diag(s2.double()) @ q.T
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(want, rel=1e-9)


def test_fd_non_commuting_2x2_hand_computation():
    s1 = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    s2 = torch.tensor([[1.0, -0.3], [-0.3, 0.5]], dtype=torch.float64)
    assert not torch.allclose(s1 @ s2, s2 @ s1)
    m = s1 @ s2  # eigenvalues l1, l2 > 0: tr sqrt(M) = sqrt(l1) + sqrt(l2) = sqrt(tr M + 2 sqrt(det M))
    tr_sqrt = math.sqrt(float(torch.trace(m)) + 2 * math.sqrt(float(torch.linalg.det(m))))
    mu1, mu2 = torch.tensor([1.0, 2.0]), torch.tensor([0.0, -1.0])
    want = 1 + 9 + 3.0 + 1.5 - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-10)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(want, rel=1e-10)  # symmetric


def test_fd_zero_for_identical_sets_and_symmetric_even_when_singular():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 50, generator=g)  # fewer samples than dimensions: a singular covariance
    stats = feature_stats(x)
    assert frechet_distance(*stats, *stats) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(*feature_stats(x[torch.randperm(20, generator=g)]), *stats) == pytest.approx(0, abs=1e-8)
    y = torch.randn(30, 50, generator=g) * 1.5 + 0.2
    a, b = frechet_distance(*stats, *feature_stats(y)), frechet_distance(*feature_stats(y), *stats)
    assert a > 1 and a == pytest.approx(b, rel=1e-7)  # rank 19 of 50: the zero eigenvalues' round-off, square-rooted
    mu, sigma = feature_stats(x)  # np.cov's unbiased covariance and the mean
    assert torch.allclose(sigma, torch.from_numpy(np.cov(x.double().numpy(), rowvar=False)))
    assert torch.allclose(mu, x.double().mean(0))
    with pytest.raises(ValueError, match="features"):
        feature_stats(torch.zeros(1, 3))


def test_fd_sample_estimate_converges_to_the_closed_form():
    g = torch.Generator().manual_seed(2)
    d = 4
    s1, s2 = random_spd(d, g), random_spd(d, g)
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.full((d,), 0.5, dtype=torch.float64)
    exact = frechet_distance(mu1, s1, mu2, s2)
    l1, l2 = torch.linalg.cholesky(s1), torch.linalg.cholesky(s2)
    errors = []
    for n in (100, 200_000):
        x = mu1 + torch.randn(n, d, generator=g, dtype=torch.float64) @ l1.T
        y = mu2 + torch.randn(n, d, generator=g, dtype=torch.float64) @ l2.T
        errors.append(abs(frechet_distance(*feature_stats(x), *feature_stats(y)) - exact))
    assert errors[1] < 0.02 * exact and errors[1] < errors[0]


# ------------------------------------------------------------------------------------------------ the classifier


def tiny_classifier(seed: int = 0, width: int = 4) -> CifarNet:
    torch.manual_seed(seed)
    return CifarNet(CifarNetConfig(width=width)).eval()


def test_classifier_shapes_batch_independence_and_round_trip(tmp_path):
    net = tiny_classifier()
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    assert net(x.float() / 255).shape == (6, 10) and net.features(x.float() / 255).shape == (6, 32)
    feats, preds = embed(net, x, batch_size=4)
    alone, alone_preds = embed(net, x[5:], batch_size=1)
    assert feats.shape == (6, 32) and torch.allclose(feats[5:], alone, atol=1e-5) and preds[5] == alone_preds[0]
    assert sum(p.numel() for p in CifarNet().parameters()) == pytest.approx(6.57e6, rel=0.01)  # ResNet-9
    save_classifier(net, tmp_path / "c")
    assert json.loads((tmp_path / "c" / "config.json").read_text())["width"] == 4
    again = load_classifier(tmp_path / "c")
    assert torch.equal(embed(again, x)[0], feats)
    with pytest.raises(ValueError, match="holds no classifier.safetensors"):
        load_classifier(tmp_path)


def test_augment_crops_a_window_of_the_padded_image_and_flips():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    g = torch.Generator().manual_seed(0)
    seen_flip = set()
    for _ in range(10):
        out = augment(x, g)
        for b in range(2):
            windows = [(padded[b, :, i : i + 8, j : j + 8], f) for i in range(9) for j in range(9) for f in (0, 1)]
            match = [f for w, f in windows if torch.equal(out[b], w.flip(-1) if f else w)]
            assert match, "not a crop of the padded image"
            seen_flip.update(match)
    assert seen_flip == {0, 1}


def test_thirty_sgd_steps_learn_a_two_class_problem():
    """Colour-coded classes under heavy pixel noise: chance is 50%; 30 steps of the real recipe must reach >= 95%."""
    g = torch.Generator().manual_seed(0)

    def make(n):
        y = torch.arange(n) % 2
        base = torch.where(y[:, None, None, None] == 1, torch.tensor([0.35, 0.5, 0.65]).view(1, 3, 1, 1),
                           torch.tensor([0.65, 0.5, 0.35]).view(1, 3, 1, 1))  # fmt: skip
        x = base + 0.25 * torch.randn(n, 3, 32, 32, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    train_x, train_y = make(240)
    test_x, test_y = make(200)
    net = CifarNet(CifarNetConfig(width=4, num_classes=2, classes=("red", "blue")))
    torch.manual_seed(0)
    losses = train_steps(net, train_x, train_y, epochs=3, batch_size=24, seed=0, progress=True)
    assert len(losses) == 30 and losses[-1] < losses[0]
    accuracy = float((predict(net, test_x) == test_y).float().mean())
    assert accuracy >= 0.95, accuracy


def test_training_command_checks_arguments_before_work(tmp_path, capsys):
    from training.classifier import main as train_main

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "test.parquet").write_text("")
    for argv, message in ((["--data", tmp_path / "nope"], f"--data {tmp_path / 'nope'}: no such folder"),
                          (["--data", tmp_path / "d"], f"--data {tmp_path / 'd'}: holds no train.parquet"),
                          (["--epochs", 0], "--epochs: must be >= 1, got 0"),
                          (["--label-smoothing", 1], "--label-smoothing: must be in [0, 1)")):  # fmt: skip
        assert train_main([*map(str, argv)]) == 2
        assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the suite


def write_fake_cifar(folder: Path, per_class: int = 2, seed: int = 0) -> None:
    """train.parquet and test.parquet in the shared layout: image {bytes: PNG, path}, label, text."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        rows = {"image": [], "label": [], "text": []}
        for c, name in enumerate(CIFAR10_CLASSES):
            for k in range(per_class):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
                rows["image"].append({"bytes": buf.getvalue(), "path": f"{name}{k}.png"})
                rows["label"].append(c)
                rows["text"].append(class_caption(name))
        pq.write_table(pa.table(rows), folder / f"{split}.parquet")


class TestSplitPipeline:
    """The Pipeline contract; the k-th image prompted with class c is the k-th test image of class c."""

    __test__ = False

    def __init__(self, data: Path):
        x, y, _ = load_cifar_split(data, "test")
        self.by_class = {c: [Image.fromarray(x[i].permute(1, 2, 0).numpy()) for i in (y == c).nonzero().flatten()]
                         for c in range(10)}  # fmt: skip
        self.name, self.model_hash, self.default_size, self.device = "test-split", "0", (32, 32), torch.device("cpu")
        self.used = {c: 0 for c in range(10)}

    def check(self, **kwargs) -> None:
        pass

    def __call__(self, prompts, *, seed, n, width, height, steps, sampler, cfg_scale, callback=None):
        images = []
        for p in prompts:
            c = [class_caption(name) for name in CIFAR10_CLASSES].index(p)
            images.append(self.by_class[c][self.used[c]])
            self.used[c] += 1
        return SimpleNamespace(images=images)


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "cifar10"
    write_fake_cifar(folder)
    return folder


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    return save_classifier(tiny_classifier(seed=1), tmp_path_factory.mktemp("clf") / "c").parent


def test_samples_equal_to_the_test_split_give_fd_zero_and_the_test_accuracy(fake_data, classifier):
    pipe = TestSplitPipeline(fake_data)
    result = evaluate_cifar10(pipe, class_prompts("classes", 2), seed=0, steps=1, batch_size=7,
                              classifier=classifier, data=fake_data)  # fmt: skip
    assert result["fd_cls"] == pytest.approx(0.0, abs=1e-6)
    assert result["ok"] == pytest.approx(result["classifier"]["test_accuracy"])  # the same 20 images, same labels
    x, y, _ = load_cifar_split(fake_data, "test")
    _, preds = embed(load_classifier(classifier), x)  # the accuracy of the stored classifier, independently
    assert result["classifier"]["test_accuracy"] == pytest.approx(float((preds == y).float().mean()))
    assert [r["kind"] for r in result["scores"]] == [c for c in CIFAR10_CLASSES for _ in range(2)]


def test_vae_psnr_against_a_known_error():
    """A stand-in VAE whose reconstruction is the image + 0.1: MSE 0.01, PSNR = 10 log10(4 / 0.01) = 26.02 dB."""
    vae = SimpleNamespace(moments=lambda x: (x, None), _decode_z=lambda z: z + 0.1)
    pipe = SimpleNamespace(bundle=SimpleNamespace(vae=vae), factor=4, device="cpu", dtype=torch.float32)
    images = torch.randint(0, 200, (9, 3, 32, 32), dtype=torch.uint8)  # <= 200: + 0.1 stays under the clamp at 1
    assert vae_reconstruction_psnr(pipe, images, batch_size=4) == pytest.approx(10 * math.log10(400), abs=1e-6)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from ldm.bundle import save_bundle
    from tests.test_format_native import random_bundle

    path = tmp_path_factory.mktemp("model") / "tiny"
    save_bundle(random_bundle("sd1", seed=3), path)
    return path


def test_command_end_to_end_on_a_tiny_model(tiny_model, fake_data, classifier, tmp_path, capsys):
    argv = ["eval", "--suite", "cifar10", "--model", tiny_model, "--classifier", classifier, "--data", fake_data,
            "--n", 2, "--steps", 1, "--sampler", "euler", "--batch-size", 8, "--baselines", "--vae-psnr",
            "--out", tmp_path / "ev", "-q"]  # fmt: skip
    assert main([*map(str, argv)]) == 0
    out = capsys.readouterr().out
    assert "FD-cls" in out and "baseline real" in out and "baseline cfg1" in out and "VAE reconstruction PSNR" in out
    report = json.loads((tmp_path / "ev" / "adherence.json").read_text())
    s = report["summary"]
    assert set(s) == {"n", "ok", "fd_cls", "by_kind", "classifier", "baselines", "vae_psnr"}
    assert s["n"] == 20 and list(s["by_kind"]) == list(CIFAR10_CLASSES)
    assert sum(k["n"] * k["ok"] for k in s["by_kind"].values()) == pytest.approx(s["n"] * s["ok"])
    assert sum(r["ok"] for r in report["scores"]) == round(s["n"] * s["ok"])
    assert all(r["ok"] == (r["kind"] == r["predicted"]) for r in report["scores"])
    for name in ("real", "cfg1"):
        assert set(s["baselines"][name]) == {"n", "ok", "fd_cls"} and s["baselines"][name]["n"] == 20
        assert s["baselines"][name]["fd_cls"] >= 0
    assert s["fd_cls"] > 0 and math.isfinite(s["vae_psnr"])
    assert s["classifier"]["feature_dim"] == 32 and 0 <= s["classifier"]["test_accuracy"] <= 1
    assert report["settings"]["classifier"] == str(classifier / "classifier.safetensors")
    assert report["settings"]["baselines"] is True and report["settings"]["n"] == {"classes": 20}
    assert (tmp_path / "ev" / "grid-cat.png").is_file()


def test_bad_cifar10_input_is_one_line_exit_2_before_loading(tiny_model, fake_data, classifier, tmp_path,
                                                             monkeypatch, capsys):  # fmt: skip
    def never(path, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(eval_cli, "load_pipeline", never)
    (tmp_path / "p.txt").write_text("a photo of a cat\na photo of a dragon\n")
    (tmp_path / "only-test").mkdir()
    (tmp_path / "only-test" / "test.parquet").write_bytes((fake_data / "test.parquet").read_bytes())
    cifar = ["--suite", "cifar10"]
    cases = [
        (cifar, "--classifier: required by --suite cifar10"),
        ([*cifar, "--classifier", tmp_path / "nope"], f"--classifier {tmp_path / 'nope'}: no such file"),
        ([*cifar, "--classifier", classifier, "--data", tmp_path / "nope"], f"--data {tmp_path / 'nope'}: no such"),
        ([*cifar, "--classifier", classifier, "--data", tmp_path / "only-test", "--baselines"],
         f"--data {tmp_path / 'only-test'}: holds no train.parquet"),
        ([*cifar, "--classifier", classifier, "--data", fake_data, "--prompts", tmp_path / "p.txt"],
         f"--prompts {tmp_path / 'p.txt'} line 2: prompt 'a photo of a dragon' is not a CIFAR-10 class caption"),
        (["--classifier", classifier], "--classifier: only for --suite cifar10"),
        (["--vae-psnr"], "--vae-psnr: only for --suite cifar10"),
    ]  # fmt: skip
    for argv, message in cases:
        code = main(["eval", "--model", str(tiny_model), "--out", str(tmp_path / "o"), *map(str, argv)])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (argv, err)


def test_help_names_the_cifar10_options(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--classifier", "--data", "--baselines", "--vae-psnr", "cifar10", "LDM_DATA"):
        assert option in text


# ------------------------------------------------------------------------------------------------ real data


@needs_cifar
def test_real_test_split_loads_balanced_with_the_suite_captions():
    import pyarrow.parquet as pq

    x, y, names = load_cifar_split(CIFAR, "test")
    assert x.shape == (10000, 3, 32, 32) and x.dtype == torch.uint8 and names == CIFAR10_CLASSES
    assert y.bincount().tolist() == [1000] * 10
    texts = pq.read_table(CIFAR / "test.parquet", columns=["text"]).column("text").to_pylist()
    assert all(t == class_caption(names[c]) for t, c in zip(texts, y.tolist()))  # the prompts are the data's captions
    assert set(class_prompts("classes", 1)) == set(texts)
    assert 60 < float(x.float().mean()) < 160  # real photographs, not a constant
