import os
import sys

import pytest
import torch

# tests import the top-level modules (model, data, ...) of the repository
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test uses toy models, which run fastest on one thread (on a shared 2-core machine
    a second OpenMP thread mostly waits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
