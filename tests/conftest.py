"""Shared pytest configuration: the hypothesis settings profile and common fixtures."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "lipbound",
    deadline=None,  # analysis times vary a lot on a shared machine; never a timing assertion
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
    derandomize=True,  # CI runs the same examples every time; use the "explore" profile
)
settings.register_profile(
    "explore",  # HYPOTHESIS_PROFILE=explore: fresh random examples each run
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "lipbound"))


@pytest.fixture(scope="module")
def torch_one_thread():
    """Run a module's tests with one intra-op thread (tiny float64 ops are faster that way on
    a loaded machine), restoring the previous setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
