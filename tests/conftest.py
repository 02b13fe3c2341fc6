"""Shared pytest setup: keep CPU tests single-threaded-ish and quiet."""
import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def rng():
    import numpy as np
    return np.random.default_rng(0)
