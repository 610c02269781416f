"""The further conditions of a model (ldm/conditions/) at inference: call arguments -> ``Cond.extra``.

    pipe("a red circle", conditions={"edges": "edges.png"}, condition_weights={"edges": 0.8},
         condition_ranges={"edges": (0.0, 0.6)}, condition_scales={"image": 1.5})

- ``conditions``: name -> one value for every prompt, or a list with one per prompt. Image conditions take a
  PIL image, a path or a (1, 3, H, W) tensor in [-1, 1] of the generated image's size; ``class_label`` an int;
  ``scalars`` a number or a list of numbers. A condition left out gets its "no condition".
- ``condition_scales``: a guidance scale of its own (InstructPix2Pix-style chained guidance,
  ldm.conditions.guidance); default: the model config's ``scale``, or none (present in every branch).
- ``condition_weights`` / ``condition_ranges``: a control's strength and the (start, end) fractions of the steps
  where it acts (diffusers' ``controlnet_conditioning_scale``, ``control_guidance_start`` / ``_end``); defaults:
  the model config's ``weight``, ``start``, ``end``.

Every argument is checked before any network runs; errors name ``conditions[NAME]``.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from ldm.bundle import Bundle
from ldm.conditions import Env
from ldm.controlnet import ControlNet, control_active
from ldm.speed import SpeedConfig, apply_speed

from .images import image_size, image_to_tensor, open_image

__all__ = ["check_condition_args", "condition_extra", "set_control_windows"]


def check_condition_args(bundle: Bundle, n_prompts: int, size_wh: tuple[int, int], conditions, scales, weights,
                         ranges) -> dict[str, Any]:  # fmt: skip
    """The Request fields (conditions per prompt, scales, weights, ranges), checked; ValueError names the problem."""
    stack = bundle.conditions
    have = stack.names() if stack is not None else []
    for arg, given in (("conditions", conditions), ("condition_scales", scales), ("condition_weights", weights),
                       ("condition_ranges", ranges)):  # fmt: skip
        if given is None:
            continue
        if not isinstance(given, Mapping):
            raise ValueError(f"{arg}: a mapping from condition name to value, got {type(given).__name__}")
        for name in given:
            if name not in have:
                raise ValueError(f"{arg}: unknown condition {name!r}; this model has: {', '.join(have) or '(none)'}")
    values = {}
    for name, value in (conditions or {}).items():
        c = stack[name]
        if c.value in ("number", "raw"):  # a list of lists (or strings) is one value per prompt
            nested = isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple, str))
            per = list(value) if nested else [value]
        else:
            per = list(value) if isinstance(value, (list, tuple)) else [value]
        if len(per) == 1:
            per = per * n_prompts
        if len(per) != n_prompts:
            raise ValueError(f"conditions[{name}]: one value for all prompts or one per prompt ({n_prompts}), "
                             f"got {len(per)}")  # fmt: skip
        values[name] = [_value(c, v, f"conditions[{name}]", size_wh) for v in per]
        if c.value == "raw":  # the type's own checks now (images are checked above)
            c.prepare(values[name], Env(latent_hw=(1, 1)))
        elif c.value != "image":
            c.prepare(torch.cat(values[name]), Env(latent_hw=(1, 1)))
    out_scales = {}
    for c in stack or []:
        s = (scales or {}).get(c.spec.name, c.spec.scale)
        if s is not None and c.spec.name in values:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or s < 0:
                raise ValueError(f"condition_scales[{c.spec.name}]: a guidance scale >= 0, got {s!r}")
            out_scales[c.spec.name] = float(s)
    for name in scales or {}:
        if name not in values:
            raise ValueError(f"condition_scales[{name}]: no value is given for it in conditions")
    for name, w in (weights or {}).items():
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise ValueError(f"condition_weights[{name}]: a number, got {w!r}")
    for name, r in (ranges or {}).items():
        if not (isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(v, (int, float)) for v in r)
                and 0.0 <= r[0] < r[1] <= 1.0):  # fmt: skip
            raise ValueError(f"condition_ranges[{name}]: (start, end) with 0 <= start < end <= 1, got {r!r}")
        if stack[name].enters not in ("control", "adapter"):
            raise ValueError(f"condition_ranges[{name}]: only controls have a step range; {name!r} enters "
                             f"{stack[name].enters!r}")  # fmt: skip
    return {"conditions": values or None, "condition_scales": out_scales or None,
            "condition_weights": dict(weights) if weights else None,
            "condition_ranges": {k: tuple(map(float, v)) for k, v in ranges.items()} if ranges else None}  # fmt: skip


def _value(c, v, where: str, size_wh: tuple[int, int]) -> Any:
    if c.value == "image":
        im = open_image(v, where)
        if image_size(im, where) != size_wh:
            w, h = image_size(im, where)
            raise ValueError(f"{where}: is {w}x{h}, but the image to generate is {size_wh[0]}x{size_wh[1]}")
        return image_to_tensor(im)  # (1, 3, H, W) in [-1, 1]
    if c.value == "raw":
        return v
    if c.value == "label":
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{where}: a class label (int), got {v!r}")
        return torch.tensor([v])
    nums = v if isinstance(v, (list, tuple)) else [v]
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in nums):
        raise ValueError(f"{where}: a number or a list of numbers, got {v!r}")
    return torch.tensor([list(map(float, nums))])


def condition_extra(
    bundle: Bundle, req, per_prompt: list[int], latent_hw: tuple[int, int], device
) -> dict[str, Tensor]:
    """``Cond.extra`` for the rows whose prompts are ``per_prompt``."""
    stack, values = bundle.conditions, req.conditions or {}
    rows = {}
    for name, vals in values.items():
        picked = [vals[p] for p in per_prompt]
        rows[name] = picked if stack[name].value == "raw" else torch.cat(picked)
    env = Env(latent_hw=latent_hw, device=device, vae=bundle.vae)
    return stack.prepare(rows, env, len(per_prompt))


def set_control_windows(denoiser, req, sigmas: Tensor) -> None:
    """Each control's strength for this call, and the time inputs of the steps where it acts
    (ldm.controlnet.control_active)."""
    net = denoiser.net
    stack = getattr(net, "stack", None)
    if stack is None:
        return
    net.set_weights(req.condition_weights or {})
    n = len(sigmas) - 1
    windows = {}
    for c in stack:
        if c.enters not in ("control", "adapter"):
            continue
        start, end = (req.condition_ranges or {}).get(c.spec.name, (c.spec.start, c.spec.end))
        if (start, end) == (0.0, 1.0):
            continue
        active = [i for i in range(n) if control_active(i, n, start, end)]
        if not active:
            windows[c.spec.name] = (float("inf"), float("-inf"))  # never
            continue
        ts = denoiser.sigma_to_input(sigmas[active].to(torch.float64).clamp_min(1e-12))
        windows[c.spec.name] = (float(ts.min()), float(ts.max()))
    net.set_windows(windows)


def speed_controls(bundle: Bundle, speed: SpeedConfig | None) -> None:
    """``speed`` (ldm/speed.py) on every ControlNet among the model's conditions that has no speed switches yet: the
    pipeline's own, at its creation and at each call, so one attached later (``attach_controlnet``) gets them too."""
    for c in bundle.conditions or ():
        net = getattr(c, "net", None)
        if isinstance(net, ControlNet) and getattr(net, "speed", None) is None:
            apply_speed(net, speed)


def attach_controlnet(bundle: Bundle, path, name: str = "control", *, hint_channels: int = 3, weight: float = 1.0,
                      start: float = 0.0, end: float = 1.0) -> None:  # fmt: skip
    """Add a published ControlNet (a .safetensors file in the original cldm layout or diffusers' ControlNetModel
    layout, ldm.controlnet_keys.read_controlnet) to ``bundle`` as the control condition ``name``; its encoder must
    have the bundle's U-Net shape. Afterwards ``conditions={name: image}`` steers generation with it."""
    from ldm.conditions import ConditionSpec, ConditionStack
    from ldm.controlnet_keys import read_controlnet

    cfg = bundle.config
    if name in [s.name for s in cfg.conditions]:
        raise ValueError(f"controlnet: the model already has a condition named {name!r}; choose another name")
    spec = ConditionSpec(type="controlnet", name=name, weight=weight, start=start, end=end,
                         args={"hint_channels": hint_channels})  # fmt: skip
    grown = cfg.with_conditions(list(cfg.conditions) + [spec])
    p = next(bundle.unet.parameters())
    with torch.device("meta"):
        stack = ConditionStack(grown.conditions, grown)
    stack = stack.to_empty(device=p.device).to(p.dtype)
    if bundle.conditions is not None:
        stack.load_state_dict(bundle.conditions.state_dict(), strict=False)
    net = stack[name].net
    sd = read_controlnet(path, net.cfg)
    try:
        net.load_state_dict({k: v.to(p.dtype) for k, v in sd.items()}, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: not a ControlNet for this model's U-Net ({str(e).splitlines()[0]})") from None
    bundle.conditions, bundle.config = stack, grown
