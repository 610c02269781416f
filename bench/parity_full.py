"""Full-size parity on the GPU: our U-Net / VAE / text encoders vs diffusers / transformers / open_clip.

Same random weights moved through our key maps (the CPU tests do this at tiny sizes). Reports, per model and
dtype, max |ours - ref| / max |ref| where ref is the reference library in the same dtype, and both against the
fp32 reference (so bf16 rounding is visible next to the difference between implementations).

    python bench/parity_full.py --out results.json        (on a GPU; see BENCHMARKS.md for the device command)
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from ldm.conditioning import Cond
from ldm.unet import UNet, UNetConfig
from ldm.unet_keys import diffusers_to_ours
from tests.test_unet_params import PUBLISHED
from tests.test_unet_parity import randomize_ as randomize_unet_


def err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).abs().max() / ref.float().abs().max())


def unet_case(name: str, dev: str, results: dict) -> None:
    from diffusers import UNet2DConditionModel

    _, make_cfg, dcfg = PUBLISHED[name]
    cfg = make_cfg()
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**dcfg).eval()
    randomize_unet_(ref, seed=1)
    ours = UNet(cfg).eval()
    ours.load_state_dict(diffusers_to_ours(ref.state_dict(), cfg), strict=True)
    ref, ours = ref.to(dev), ours.to(dev)
    g = torch.Generator(dev).manual_seed(2)
    H = 128 if name == "sdxl_base" else 64
    x = torch.randn(2, 4, H, H, generator=g, device=dev)
    t = torch.tensor([17.0, 731.0], device=dev)
    ctx = torch.randn(2, 77, cfg.context_dim, generator=g, device=dev)
    kw, vec = {}, None
    if cfg.adm_in_channels:
        te = torch.randn(2, 1280, generator=g, device=dev)
        ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768.0, 1344, 16, 32, 1024, 1024]], device=dev)
        kw["added_cond_kwargs"] = {"text_embeds": te, "time_ids": ids}
        with torch.no_grad():
            vec = torch.cat([te, ref.add_time_proj(ids.flatten()).reshape(2, -1)], -1)
    out = {}
    with torch.no_grad():
        r32 = ref(x, t, encoder_hidden_states=ctx, **kw).sample
        o32 = ours(x, t, Cond(context=ctx, vector=vec))
        out["fp32_ours_vs_ref"] = err(o32, r32)
        out["fp32_bitwise_equal"] = bool(torch.equal(o32, r32))
        ref, ours = ref.bfloat16(), ours.bfloat16()
        kwb = {"added_cond_kwargs": {k: v.bfloat16() for k, v in kw["added_cond_kwargs"].items()}} if kw else {}
        rb = ref(x.bfloat16(), t, encoder_hidden_states=ctx.bfloat16(), **kwb).sample
        ob = ours(x.bfloat16(), t, Cond(context=ctx.bfloat16(), vector=None if vec is None else vec.bfloat16()))
        out["bf16_ours_vs_ref"] = err(ob, rb)
        out["bf16_bitwise_equal"] = bool(torch.equal(ob, rb))
        out["bf16_ours_vs_fp32_ref"] = err(ob, r32)
        out["bf16_ref_vs_fp32_ref"] = err(rb, r32)
    results[f"unet_{name}"] = out
    del ref, ours
    torch.cuda.empty_cache()


def vae_case(dev: str, results: dict) -> None:
    from diffusers import AutoencoderKL as RefVAE

    from autoencoder import AutoencoderConfig, AutoencoderKL
    from autoencoder.keys import config_to_diffusers, diffusers_to_ours as vae_d2o

    cfg = AutoencoderConfig.sd()
    torch.manual_seed(0)
    ref = RefVAE(**config_to_diffusers(cfg)).eval()
    randomize_unet_(ref, seed=3)
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(vae_d2o(ref.state_dict(), cfg), strict=True)
    ref, ours = ref.to(dev), ours.to(dev)
    g = torch.Generator(dev).manual_seed(4)
    img = torch.rand(1, 3, 512, 512, generator=g, device=dev) * 2 - 1
    lat = torch.randn(1, 4, 64, 64, generator=g, device=dev)
    out = {}
    with torch.no_grad():
        rm = ref.encode(img).latent_dist.mean
        om, _ = ours.moments(img)
        rd = ref.decode(lat / cfg.scale_factor).sample
        od = ours.decode(lat)
        out["fp32_encode_mean"] = err(om, rm)
        out["fp32_decode"] = err(od, rd)
        ref, ours = ref.bfloat16(), ours.bfloat16()
        rdb = ref.decode((lat / cfg.scale_factor).bfloat16()).sample
        odb = ours.decode(lat.bfloat16())
        out["bf16_decode_ours_vs_ref"] = err(odb, rdb)
        out["bf16_decode_ours_vs_fp32_ref"] = err(odb, rd)
        out["bf16_decode_ref_vs_fp32_ref"] = err(rdb, rd)
    results["vae_sd"] = out


def text_cases(dev: str, results: dict) -> None:
    import open_clip
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.text_config import TextEncoderConfig
    from tests.test_text_encoder_parity import randomize_ as randomize_text_, ref_sd2_frozen_openclip, ref_sgm_frozen_openclip2
    from text_encoder import ClipTextEncoder
    from text_encoder.keys import hf_to_ours, open_clip_to_ours
    from text_encoder.tokenizer import tokenize

    prompts = ["a photograph of an astronaut riding a horse", "a red circle above a small blue square, oil on canvas"]

    def ours_for(cfg, sd):
        m = ClipTextEncoder(cfg)
        m.load_state_dict(sd, strict=True)
        return m.eval().to(dev)

    # SD1: OpenAI CLIP ViT-L/14 text (transformers) -> last hidden state after the final norm
    hcfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                          projection_dim=768, eos_token_id=49407, pad_token_id=49407, bos_token_id=49406)
    ref = randomize_text_(CLIPTextModel(hcfg), seed=5).to(dev)
    ours = ours_for(TextEncoderConfig.sd1(), hf_to_ours(ref.state_dict()))
    ids = tokenize(prompts, pad_id=TextEncoderConfig.sd1().pad_id).to(dev)
    with torch.no_grad():
        results["text_sd1_clip_l"] = {"fp32": err(ours(ids)[0], ref(ids).last_hidden_state)}
    del ref, ours

    def open_clip_model(width, layers, heads, proj, seed):
        text_cfg = dict(context_length=77, vocab_size=49408, width=width, heads=heads, layers=layers)
        vision_cfg = dict(image_size=32, patch_size=16, width=32, layers=1, head_width=16)
        return randomize_text_(open_clip.CLIP(proj, vision_cfg, text_cfg), seed).to(dev)

    # SD2: OpenCLIP ViT-H/14 text, penultimate + ln_final
    m = open_clip_model(1024, 24, 16, 1024, 6)
    cfg = TextEncoderConfig.sd2()
    ours = ours_for(cfg, open_clip_to_ours(m.state_dict()))
    ids = tokenize(prompts, pad_id=cfg.pad_id).to(dev)
    with torch.no_grad():
        results["text_sd2_openclip_h"] = {"fp32": err(ours(ids)[0], ref_sd2_frozen_openclip(m, ids))}
    del m, ours
    # SDXL bigG: penultimate without norm + pooled
    m = open_clip_model(1280, 32, 20, 1280, 7)
    cfg = TextEncoderConfig.sdxl_bigg()
    ours = ours_for(cfg, open_clip_to_ours(m.state_dict()))
    ids = tokenize(prompts, pad_id=cfg.pad_id).to(dev)
    with torch.no_grad():
        h, p = ours(ids)
        rh, rp = ref_sgm_frozen_openclip2(m, ids)
        results["text_sdxl_bigg"] = {"fp32_hidden": err(h, rh), "fp32_pooled": err(p, rp)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="parity_full.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    torch.backends.cudnn.allow_tf32 = False
    results: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__}
    for step in (lambda: unet_case("sd15", args.device, results), lambda: unet_case("sd21", args.device, results),
                 lambda: unet_case("sdxl_base", args.device, results), lambda: vae_case(args.device, results),
                 lambda: text_cases(args.device, results)):
        t0 = time.time()
        step()
        print(f"done in {time.time() - t0:.1f}s", flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    for k, v in results.items():
        print(k, v)


if __name__ == "__main__":
    main()
