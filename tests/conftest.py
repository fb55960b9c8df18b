"""Test set-up: every compile verifies its IR after each pass (MPCOMPILER_DEBUG=1)."""

import os

import pytest
import torch

os.environ.setdefault("MPCOMPILER_DEBUG", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
