"""Class-conditioned U-Nets against diffusers' UNet2DConditionModel with the same random weights.

- ``num_classes`` (the original LDM's integer ``num_classes``: ``label_emb = nn.Embedding``) vs diffusers'
  ``class_embed_type=None, num_class_embeds=N`` (``class_embedding = nn.Embedding``), labels in ``cond.vector``;
- ``adm_in_channels`` (``label_emb`` MLP, the original's ``num_classes="sequential"``) vs diffusers'
  ``class_embed_type="projection"``, whose converter of original checkpoints also confirms our names.

Our key map (ldm/unet_keys.py) does not know diffusers' ``class_embedding`` yet: the test renames that one module
itself. Error measure: max |ours - ref| / max |ref| (fp32, CPU).
"""
from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from ldm.conditioning import Cond
from ldm.unet import UNet, UNetConfig
from ldm.unet_keys import diffusers_to_ours
from tests.test_unet_parity import CONFIGS, DIFFUSERS_CONFIGS, make_inputs, randomize_, rel_err

TOL = 1e-5
NUM_CLASSES = 10
ADM = 12


def make_pair(**diffusers_extra):
    cfg = UNetConfig.sd15().tiny(**({"num_classes": NUM_CLASSES} if "num_class_embeds" in diffusers_extra
                                    else {"adm_in_channels": ADM}))  # fmt: skip
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**DIFFUSERS_CONFIGS["sd1"], **diffusers_extra).eval()
    randomize_(ref, seed=1)
    theirs = ref.state_dict()
    rename = {"class_embedding": "label_emb", "class_embedding.linear_1": "label_emb.0.0",
              "class_embedding.linear_2": "label_emb.0.2"}  # fmt: skip
    own = {}
    for key in [k for k in theirs if k.startswith("class_embedding.")]:
        module, _, param = key.rpartition(".")
        own[f"{rename[module]}.{param}"] = theirs.pop(key)
    assert own  # the class embedding exists on both sides
    ours = UNet(cfg).eval()
    ours.load_state_dict({**diffusers_to_ours(theirs, cfg), **own}, strict=True)
    return cfg, ours, ref


def run_both(ours, ref, labels):
    x, t, cond, _ = make_inputs("sd1", CONFIGS["sd1"], ref)  # the latent, timesteps and tokens of the plain twin
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=cond.context, class_labels=labels).sample
        out = ours(x, t, Cond(context=cond.context, vector=labels))
    return out, want


def test_class_embedding_matches_diffusers_num_class_embeds():
    cfg, ours, ref = make_pair(num_class_embeds=NUM_CLASSES)
    assert isinstance(ours.label_emb, torch.nn.Embedding)
    out, want = run_both(ours, ref, torch.tensor([3, 7]))
    assert rel_err(out, want) < TOL, rel_err(out, want)
    other, _ = run_both(ours, ref, torch.tensor([4, 7]))
    assert rel_err(other[:1], want[:1]) > 1e-3  # the label reaches the output
    assert torch.equal(other[1:], out[1:])  # ... of its own image only


def test_projection_matches_diffusers_and_its_original_converter():
    cfg, ours, ref = make_pair(class_embed_type="projection", projection_class_embeddings_input_dim=ADM)
    vector = torch.randn(2, ADM, generator=torch.Generator().manual_seed(4))
    out, want = run_both(ours, ref, vector)
    assert rel_err(out, want) < TOL, rel_err(out, want)
    # diffusers reads label_emb.0.0 / .0.2 of an original checkpoint into class_embedding: our names are the original's
    randomize_(ours, seed=5)
    converted = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in ours.state_dict().items()},
                                            ref.config)  # fmt: skip
    ref.load_state_dict(converted, strict=True)
    out, want = run_both(ours, ref, vector)
    assert rel_err(out, want) < TOL, rel_err(out, want)


def test_config_and_label_checks():
    params = dict(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2], num_res_blocks=1,
                  channel_mult=[1, 2], num_heads=2, context_dim=24, num_classes=NUM_CLASSES)  # fmt: skip
    assert UNetConfig.from_original(params).num_classes == NUM_CLASSES
    assert UNetConfig.from_original({**params, "num_classes": "sequential", "adm_in_channels": 8}).num_classes == 0
    with pytest.raises(ValueError, match="unet.num_classes=10 and unet.adm_in_channels=12: both feed label_emb"):
        UNetConfig.sd15().tiny(num_classes=NUM_CLASSES, adm_in_channels=ADM)
    with pytest.raises(ValueError, match="unet.num_classes: must be >= 0"):
        UNetConfig(num_classes=-1)

    cfg = UNetConfig.sd15().tiny(num_classes=NUM_CLASSES)
    net = UNet(cfg)
    x, t, ctx = torch.zeros(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.zeros(2, 3, cfg.context_dim)
    bad = {
        "missing": None,
        "float": torch.tensor([1.0, 2.0]),
        "one-hot": torch.eye(NUM_CLASSES)[:2].long(),
        "batch": torch.tensor([1]),
    }
    message = r"cond.vector: required as \(2,\) integer class labels \(unet.num_classes=10\)"
    for labels in bad.values():
        with pytest.raises(ValueError, match=message):
            net(x, t, Cond(context=ctx, vector=labels))
    with pytest.raises(ValueError, match=r"cond.vector: class labels must be in \[0, 10\) \(unet.num_classes\), got 3"):
        net(x, t, Cond(context=ctx, vector=torch.tensor([3, 10])))
