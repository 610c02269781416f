"""bench.perf_measure.in_fresh_thread: runs the function in another thread with the cuDNN flags asked for, hands back
its result or its exception, and restores the flags (bench/ab_unet.py builds each variant with it)."""
from __future__ import annotations

import threading

import pytest
import torch

from bench.perf_measure import in_fresh_thread


def test_result_flags_and_restore():
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.benchmark_limit)

    def probe(k):
        return (k, threading.current_thread() is threading.main_thread(), torch.backends.cudnn.benchmark,
                torch.backends.cudnn.benchmark_limit)  # fmt: skip

    assert in_fresh_thread(probe, 7, cudnn={"benchmark": True, "benchmark_limit": 0}) == (7, False, True, 0)
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.benchmark_limit) == before


def test_exception_is_raised_here_and_flags_restored():
    before = torch.backends.cudnn.benchmark

    def boom():
        raise KeyError("inside")

    with pytest.raises(KeyError, match="inside"):
        in_fresh_thread(boom, cudnn={"benchmark": not before})
    assert torch.backends.cudnn.benchmark == before


def test_unknown_flag_is_refused():
    with pytest.raises(ValueError, match=r"cudnn\.enabled"):
        in_fresh_thread(lambda: None, cudnn={"enabled": False})
