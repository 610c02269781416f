"""The per-sample draws made by the data workers (training/draws.py) and the token cache (training/conditions.py).

The workers must produce exactly the numbers the losses would draw themselves from one keyed generator per sample
(DiffusionLoss.draw and sample_posterior with generator lists), so moving the draws out of the step changed no run.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from autoencoder.vae import sample_posterior
from ldm.denoiser import DiffusionConfig
from ldm.loss import DiffusionLoss, LossConfig
from tests.test_train_smoke import tiny_config
from training.collate import collate_rows
from training.conditions import TextTowers, TokenCache, keyed_generators, tokenize
from training.draws import KeyedDraws, noise_draw
from training.train_data import ROW_INDEX, train_rows


def test_worker_draws_equal_the_losses_own_keyed_draws(tmp_path):
    cfg = tiny_config(tmp_path, "shapes.rows=6")
    rows = KeyedDraws(train_rows(cfg), seed=5, latent_channels=4, factor=4, cached=False, num_train_timesteps=1000)
    rows.set_epoch(3)
    batch = next(iter(DataLoader(rows, batch_size=4, collate_fn=collate_rows, num_workers=2)))  # drawn in workers
    idx = batch[ROW_INDEX].tolist()
    loss = DiffusionLoss(lambda *a: None, DiffusionConfig(), LossConfig())
    z = torch.zeros(4, 4, 4, 4)  # (B, z, 16/4, 16/4)
    want = loss.draw(z, keyed_generators(5, 3, idx, "loss", "cpu"))
    got = noise_draw(batch, "cpu")
    for name in ("t", "noise", "offset", "perturbation"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    mean, logvar = torch.randn(4, 4, 4, 4), torch.randn(4, 4, 4, 4)
    assert torch.equal(sample_posterior(mean, logvar, eps=batch["_eps"]),
                       sample_posterior(mean, logvar, keyed_generators(5, 3, idx, "vae", "cpu")))  # fmt: skip
    rows.set_epoch(4)  # another epoch, other numbers
    assert not torch.equal(rows[idx[0]]["_noise"], batch["_noise"][0])


def test_token_cache_equals_tokenizing_each_time():
    from ldm.bundle import Bundle
    from ldm.model_config import ModelConfig

    towers = TextTowers(Bundle(ModelConfig.tiny("sdxl")).text)  # two towers, two pad conventions
    cache = TokenCache(towers, max_items=3)
    for texts in (["a red circle", "", "a red circle"], ["b", "c", "d", "a red circle"], ["x " * 100]):
        got, want = cache(texts, "cpu"), tokenize(towers, texts, "cpu")
        assert len(got) == len(want) == 2 and all(torch.equal(g, w) for g, w in zip(got, want))
