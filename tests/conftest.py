import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path[:0] = [ROOT, os.path.join(ROOT, "data"), os.path.join(ROOT, "tools")]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA (run on the GPU machine with `pytest -m gpu`)")


@pytest.fixture
def shared_dir():
    """../shared beside the checkout (stand-in data and the official tokenizers), or skip."""
    if not os.path.isdir(SHARED):
        pytest.skip("../shared not present")
    return SHARED
