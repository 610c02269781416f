"""Shared test settings: one torch thread everywhere.

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
