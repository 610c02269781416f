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
