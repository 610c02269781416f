"""bench/perf.py refuses a --variants filter that would select none of our training rows, before any work."""
from __future__ import annotations

import pytest

perf = pytest.importorskip("bench.perf")


def test_variants_filter_that_matches_nothing_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        perf.main(["--only", "train512_compile", "--variants", "Triton GEGLU|no such variant", "--tiny"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--variants: 'no such variant' matches no variant" in err and "train512_compile" in err


def test_variants_without_a_training_case_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        perf.main(["--only", "vae", "--variants", "GEGLU", "--tiny"])
    assert e.value.code == 2
    assert "(none)" in capsys.readouterr().err


def test_conv_plans_reach_inference_variants_only():
    """--conv-plans: every inference variant of ours gets speed.conv_plans and says so in its label; training
    variants (where the switch is refused) neither."""
    import torch

    from bench.perf_measure import Plan

    plan = Plan(device="cpu", dtype=torch.float32, tiny=True, warmup=1, reps=1, train_reps=1, peak=1.0, tol=1.0,
                conv_plans="p.json")
    spec = dict(compile="default", attention_kernel="auto")
    assert plan.speed(spec).conv_plans == "p.json" and plan.label("x", spec) == "x [conv_plans]"
    assert plan.speed(spec, training=True).conv_plans is None and plan.label("x", spec, training=True) == "x"
    assert Plan(device="cpu", dtype=torch.float32, tiny=True, warmup=1, reps=1, train_reps=1, peak=1.0,
                tol=1.0).speed(spec).conv_plans is None
