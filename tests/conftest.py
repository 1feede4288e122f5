"""Shared test set-up: two torch threads (the CI machine has two cores), quiet transformers, and
the fixtures several test files use."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Fixtures shared by several test files, registered once: ``hub`` (a local test double of the Hub),
# ``chain`` (stories260K re-charted twice on disk), ``world`` and ``here`` (two charts of a tiny llama
# and the objects on them, in a directory).
pytest_plugins = ["helpers.hub_double", "helpers.recharted", "helpers.contract"]


@pytest.fixture
def token_ids() -> torch.Tensor:
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
