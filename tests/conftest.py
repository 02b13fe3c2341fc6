"""Shared pytest setup: keep CPU tests single-threaded-ish and quiet."""
import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)  # tiny tensors: more threads only add overhead on 2 shared cores


@pytest.fixture(autouse=True)
def _one_thread():
    """Code under test may change the thread count (training entry points do): restore it."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture
def rng():
    import numpy as np
    return np.random.default_rng(0)
