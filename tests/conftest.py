import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """Test tensors are tiny: intra-op threads gain nothing, and on a busy 2-core machine
    their spin-waiting made each step ~40x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
