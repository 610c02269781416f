"""T2I-Adapter weights: diffusers' ``T2IAdapter`` (adapter_type="full_adapter") layout <-> ours.

Ours IS TencentARC's original ``Adapter`` layout (the released t2iadapter_*.pth files hold exactly these keys, no
prefix). With r = num_res_blocks, level l and block j:

    ours                          diffusers
    conv_in                       adapter.conv_in
    body.{l r + j}.block1 / 2     adapter.body.{l}.resnets.{j}.block1 / block2
    body.{l r}.in_conv            adapter.body.{l}.in_conv          (levels whose width changes)
"""
from __future__ import annotations

from typing import Mapping

from torch import Tensor

from .t2i_adapter import T2IAdapterConfig

StateDict = dict[str, Tensor]


def module_map(cfg: T2IAdapterConfig) -> list[tuple[str, str]]:
    """(our module, diffusers module) for every module that holds parameters."""
    r, c = cfg.num_res_blocks, cfg.channels
    pairs = [("conv_in", "adapter.conv_in")]
    for l in range(len(c)):
        if l and c[l - 1] != c[l]:
            pairs.append((f"body.{l * r}.in_conv", f"adapter.body.{l}.in_conv"))
        for j in range(r):
            for conv in ("block1", "block2"):
                pairs.append((f"body.{l * r + j}.{conv}", f"adapter.body.{l}.resnets.{j}.{conv}"))
    return pairs


def diffusers_to_ours(sd: Mapping[str, Tensor], cfg: T2IAdapterConfig) -> StateDict:
    return _convert(sd, {theirs: ours for ours, theirs in module_map(cfg)}, "diffusers")


def ours_to_diffusers(sd: Mapping[str, Tensor], cfg: T2IAdapterConfig) -> StateDict:
    return _convert(sd, dict(module_map(cfg)), "ours")


def _convert(sd: Mapping[str, Tensor], table: dict[str, str], side: str) -> StateDict:
    out, unknown = {}, []
    for key, value in sd.items():
        module, _, param = key.rpartition(".")
        if module in table:
            out[f"{table[module]}.{param}"] = value
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" ... ({len(unknown)} in all)" if len(unknown) > 8 else "")
        raise ValueError(f"sd: keys not in the {side} T2I-Adapter layout for this T2IAdapterConfig: {shown}")
    return out


def config_from_diffusers(d: Mapping) -> dict:
    """A diffusers ``T2IAdapter`` config.json -> T2IAdapterConfig fields (plain data)."""
    kind = d.get("adapter_type", "full_adapter")
    if kind != "full_adapter":
        raise ValueError(f"unsupported diffusers T2IAdapter config: adapter_type={kind!r} (supported: 'full_adapter')")
    return dict(
        in_channels=d.get("in_channels", 3),
        channels=list(d.get("channels", (320, 640, 1280, 1280))),
        num_res_blocks=d.get("num_res_blocks", 2),
        downscale_factor=d.get("downscale_factor", 8),
    )
