import os

import pytest
import torch

# Two cores, several test processes: one intra-op thread keeps runs predictable.
torch.set_num_threads(int(os.environ.get("HF_OSCQ_TEST_THREADS", "1")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
