"""Guidance per condition: separate scales for separately guided conditions (InstructPix2Pix, Brooks et al. 2023,
eq. 3, generalised), through ldm.guidance.guide's chained form.

With guided conditions g_1 .. g_m (in their configured order) and the text last, branch k switches on the first k
of them (the text branch is the negative prompt until the last one):

    c_0 = (g_1 = 0, .., g_m = 0, negative)     c_k = (g_1 .. g_k on, negative)     c_{m+1} = (all on, prompt)
    D = D(c_0) + sum_k s_k (D(c_k) - D(c_{k-1})),   s = (scale of g_1, .., scale of g_m, the text's cfg scale)

For one image condition I and the text T this is InstructPix2Pix's
``e(0, 0) + s_I (e(I, 0) - e(0, 0)) + s_T (e(I, T) - e(I, 0))``. Conditions without a scale of their own (a
ControlNet, by default) are on in every branch, as diffusers runs its ControlNet for both CFG halves.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from ..conditioning import Cond
from .stack import KEEP


def guided_branches(cond: Cond, uncond: Cond, guided: Sequence[str], scales: Sequence[float],
                    text_scale: float) -> tuple[list[Cond], list[float]]:  # fmt: skip
    """(conds c_0 .. c_{m+1}, scales s_1 .. s_{m+1}) for ldm.guidance.guide(..., chain=True).

    ``cond`` / ``uncond``: the prompt's and the negative's Cond, both with the same ``extra`` (every condition
    present); ``guided``: names of the separately guided conditions, ``scales`` theirs."""
    if len(guided) != len(scales):
        raise ValueError(f"guided_branches: {len(guided)} conditions and {len(scales)} scales")
    extra = cond.extra or {}
    for name in guided:
        if name not in extra:
            raise ValueError(f"conditions[{name}]: a guidance scale is given but no value for it")

    def branch(text: Cond, on: set[str]) -> Cond:
        e = dict(text.extra or extra)
        for name in guided:
            e[name + KEEP] = extra[name + KEEP] * (1.0 if name in on else 0.0)
        return replace(text, extra=e)

    conds = [branch(uncond, set(guided[:k])) for k in range(len(guided) + 1)]
    conds.append(branch(cond, set(guided)))
    return conds, [float(s) for s in scales] + [float(text_scale)]

