import os
import sys

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py

settings.register_profile("functx", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("functx")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
