import os
import sys
from pathlib import Path

import pytest
import torch

# The shared fixtures (_export_fixture.py, _trainer_fixture.py, _fsdp_worker.py) sit next to this file; the tests
# import them from the mirrored package tree below it.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Two cores, several test processes: one intra-op thread keeps runs predictable.
torch.set_num_threads(int(os.environ.get("HF_OSCQ_TEST_THREADS", "1")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
