"""GPU suite: collected everywhere, skipped unless CUDA is available (CPU CI is unchanged)."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (tests/gpu)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
