import os
import sys

import pytest
import torch

# tests import the top-level modules (model, data, ...) of the repository
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Every test uses toy models, which run fastest on one thread: on a shared 2-core machine
    a second OpenMP thread mostly spin-waits, and two busy processes with two threads each
    slow each other down tenfold. Session-scoped, so module fixtures (which train tiny
    checkpoints) get it too."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
