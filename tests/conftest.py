import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "data"), os.path.join(ROOT, "tools"), os.path.dirname(os.path.abspath(__file__))]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA (run on the GPU machine with `pytest -m gpu`)")


_built = {}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """(data folder, tokenizer path): stdlib-docstring shards shared by the tests that train, built once per run."""
    from helpers import make_dataset

    if "dataset" not in _built:
        _built["dataset"] = make_dataset(str(tmp_path_factory.mktemp("dataset")))
    return _built["dataset"]
