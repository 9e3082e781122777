import pytest
import torch


@pytest.fixture
def one_thread():
    """torch on one thread for the test: with small tensors thread hand-offs cost more than they save, badly
    so on a shared machine (tiny models ran ~10x faster on one thread than on two busy ones)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
