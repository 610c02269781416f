"""Shared test settings: one torch thread everywhere; each test starts from a seeded global RNG.

The models here are tiny, so one thread is fastest on the 2-core CI machine and leaves the other core to
subprocess tests; it also makes CPU results independent of the machine's core count (BLAS splits sums by thread).
"""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def seeded_global_rng():
    """Every test starts from the same global RNG state (torch, random, numpy), so what a test draws without its
    own generator does not depend on which tests ran before it (a bf16 margin once did: 2.1e-2 against 2e-2 in one
    order only). Tests that need particular values still seed or pass their own generator."""
    import random

    import numpy as np

    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    yield
