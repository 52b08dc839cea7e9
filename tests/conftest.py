import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each worker (and every CLI subprocess it starts) keeps to one thread; see pyproject's addopts.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

import gc  # noqa: E402

import retain.cli  # noqa: E402, F401
import retain.engine.loop  # noqa: E402, F401
from retain.models.tiny import tiny_model, tiny_tokenizer  # noqa: E402

from .helpers import SHARED_DATA  # noqa: E402

# The full strategy x method matrix (every method under DDP, every gradient-reading method's state under
# DDP, FSDP resume after SIGKILL, DeepSpeed ZeRO where installed) takes tens of minutes of torchrun jobs on
# two cores, and every accepted pair of combined methods (tests/methods/test_combine.py) a few minutes more;
# `make test` runs one case of each mechanism (each method in each role of a pair once) and
# `make test-matrix` runs them all.
FULL_MATRIX = os.environ.get("RETAIN_TEST_MATRIX") == "1"

# What the imports above created lives for the whole session: frozen out of the cyclic collector, whose full
# passes (the Trainer forces one after every task) would walk it in every test. A fifth of make test's time
# went there. runtime.frozen_heap leaves a caller's freeze alone, so tests keep this one.
gc.collect()
gc.freeze()


def pytest_collection_modifyitems(config, items):
    if FULL_MATRIX:
        return
    skip = pytest.mark.skip(reason="part of the strategy x method matrix: run it with `make test-matrix`")
    for item in items:
        if "matrix" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def model(tokenizer):
    return tiny_model(tokenizer)


@pytest.fixture
def shared_data():
    """Path to ../shared/data (real public data, read in place); skips when the folder is absent."""
    path = os.path.abspath(SHARED_DATA)
    if not os.path.isdir(path):
        pytest.skip(f"real data folder {path} is absent (it lives beside the repository, never in it)")
    return path
