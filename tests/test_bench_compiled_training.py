"""bench/compiled_training.py's comparison: what it accepts and what it refuses (the GPU runs are in BENCHMARKS.md)."""
from __future__ import annotations

import pytest

from bench.compiled_training import compare, main


def _run(loss, grad_norm):
    return {"loss": loss, "grad_norm": grad_norm, "images_per_s": [1.0] * len(loss)}


def test_compare_accepts_rounding_and_refuses_a_different_step():
    ref = _run([1.0, 0.5, 0.4], [2.0, 1.0, 0.8])
    near = _run([1.0 + 5e-5, 0.5 + 1e-4, 0.4], [2.0 * (1 + 3e-4), 1.0, 0.8])
    c = compare(near, ref)
    assert c["ok"] and c["step1_loss_rel"] == pytest.approx(5e-5) and c["max_loss_rel"] == pytest.approx(2e-4)
    assert not compare(_run([1.01, 0.5, 0.4], [2.0, 1.0, 0.8]), ref)["ok"]  # step 1's loss 1% off
    assert not compare(_run([1.0, 0.5, 0.4], [2.1, 1.0, 0.8]), ref)["ok"]  # a gradient 5% off
    assert not compare(_run([1.0, 0.6, 0.5], [2.0, 1.0, 0.8]), ref)["ok"]  # drifted: the tail's mean 20% off
    assert not compare(_run([1.0, float("nan"), 0.4], [2.0, 1.0, 0.8]), ref)["ok"]
    assert not compare({"error": "boom"}, ref)["ok"]
    frozen = _run([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])  # nothing received a gradient: equal, but not a check
    assert not compare(frozen, frozen)["ok"]


@pytest.mark.parametrize("argv, flag", [(["--setups", "full,dreambooth"], "--setups"),
                                        (["--modes", "none,max"], "--modes"), (["--steps", "1"], "--steps")])
def test_bad_arguments_name_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and flag in capsys.readouterr().err
