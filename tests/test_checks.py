"""ldm/checks.py: check_int / check_number accept exactly the values in range and name the argument otherwise."""
from __future__ import annotations

import re

import pytest

from ldm.checks import check_int, check_number


@pytest.mark.parametrize("value", [0, 3, 10])
def test_int_in_range_passes(value):
    check_int("k", value, 0, 10)


@pytest.mark.parametrize("value,allowed", [(-1, r"in \[0, 10\]"), (11, r"in \[0, 10\]"), (True, r"in \[0, 10\]"),
                                           (2.0, r"in \[0, 10\]"), ("3", r"in \[0, 10\]")])
def test_int_refused_names_it(value, allowed):
    with pytest.raises(ValueError, match=rf"^k: must be an integer {allowed}, got {re.escape(repr(value))}$"):
        check_int("k", value, 0, 10)


def test_int_without_upper_bound():
    check_int("lora.rank", 10**9, 1)
    with pytest.raises(ValueError, match=r"^lora\.rank: must be an integer >= 1, got 0$"):
        check_int("lora.rank", 0, 1)


@pytest.mark.parametrize("value", [0, 0.5, 1, 1.0])
def test_number_in_range_passes(value):
    check_number("x", value, 0.0, 1.0)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), float("inf"), False, "0.5", None])
def test_number_refused_names_it(value):
    with pytest.raises(ValueError, match=r"^x: must be a number in \[0\.0, 1\.0\], got "):
        check_number("x", value, 0.0, 1.0)
