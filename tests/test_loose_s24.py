"""Loose ends closed in session 24: each test failed on the code before its fix (or pins a
behaviour a fix must keep: the same bits, soundness)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import lipbound
from cli_helpers import run_err, run_json
from lipbound import Analyzer
from lipbound.analyzer import TIGHT_ROWS
from lipbound.batch import bound_many
from lipbound.errors import InputError

DT = torch.float64


def _mlp(seed: int = 0, widths=(3, 8, 8, 3)) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=False):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).to(DT).eval()


# ------------------------------------------------------------------ 1. tight_rows validated
BAD_ROWS = (-3, 0, 2.5, 2.0, True, False, "7", [4], float("nan"))


@pytest.mark.parametrize("rows", [*BAD_ROWS, 4, TIGHT_ROWS, np.int64(4)])
def test_tight_rows_with_tight_off_is_refused_naming_the_fix(rows):
    """A row budget with ``tight=False`` budgets a bound that is not computed: refused (it was
    silently ignored, even ``tight_rows=-3``), in the Analyzer, the top-level function and
    bound_many, before any work."""
    net = _mlp()
    x0 = torch.randn(1, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    an = Analyzer(net, (3,))
    calls = (lambda: an.local_bound(x0, 0.1, tight_rows=rows),
             lambda: an.local_bound(x0, 0.1, tight=False, tight_rows=rows),
             lambda: an.local_bound_rows(x0, 0.1, torch.eye(3, dtype=DT), tight_rows=rows),
             lambda: lipbound.local_bound(net, x0, 0.1, tight_rows=rows),
             lambda: lipbound.local_bound(an, x0, 0.1, tight_rows=rows),
             lambda: bound_many(an, [x0], 0.1, tight_rows=rows))
    for call in calls:
        with pytest.raises(InputError, match=r"tight_rows=.*tight=False.*pass tight=True.*"
                                             r"drop tight_rows"):
            call()


@pytest.mark.parametrize("rows", BAD_ROWS)
def test_invalid_tight_rows_with_tight_on_is_refused(rows):
    """Not a count of rows: refused (``2.0`` and ``"7"`` were read as 2 and 7)."""
    net = _mlp()
    x0 = torch.randn(1, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    an = Analyzer(net, (3,))
    for call in (lambda: an.local_bound(x0, 0.1, tight=True, tight_rows=rows),
                 lambda: an.local_bound_rows(x0, 0.1, torch.eye(3, dtype=DT), tight=True,
                                             tight_rows=rows),
                 lambda: lipbound.local_bound(net, x0, 0.1, tight=True, tight_rows=rows),
                 lambda: bound_many(an, [x0], 0.1, tight=True, tight_rows=rows)):
        with pytest.raises(InputError, match=r"tight_rows must be an integer >= 1"):
            call()


def test_valid_tight_rows_give_the_same_bits_in_every_spelling():
    """``None`` is the default budget; an int, a NumPy integer and a one-element integer
    tensor are the same budget; tight=False without a budget is the plain bound."""
    net = _mlp(2)
    x0 = torch.randn(1, 3, dtype=DT, generator=torch.Generator().manual_seed(3))
    an = Analyzer(net, (3,), spectral="exact")
    default = an.local_bound(x0, 0.5, tight=True).value
    assert an.local_bound(x0, 0.5, tight=True, tight_rows=None).value == default
    assert an.local_bound(x0, 0.5, tight=True, tight_rows=TIGHT_ROWS).value == default
    one = an.local_bound(x0, 0.5, tight=True, tight_rows=1)
    for rows in (np.int64(1), torch.tensor(1)):
        assert an.local_bound(x0, 0.5, tight=True, tight_rows=rows).value == one.value
    plain = an.local_bound(x0, 0.5)
    assert an.local_bound(x0, 0.5, tight=False).value == plain.value
    assert lipbound.local_bound(an, x0, 0.5).value == plain.value


def test_cli_tight_rows_is_checked_with_and_without_tight(capsys):
    for argv, match in (
            (["--tight-rows", "-3"], r"--tight-rows needs --tight \(-3 is the row budget"
                                     r".*add --tight.*drop --tight-rows"),
            (["--tight-rows", "5"], r"--tight-rows needs --tight \(5 is.*add --tight"),
            (["--tight", "--tight-rows", "0"], "--tight-rows must be a positive integer"),
            (["--tight", "--tight-rows", "-3"], "--tight-rows must be a positive integer")):
        err = run_err(capsys, ["bound", "--model", "tiny", "--eps", "0.5", *argv])
        assert re.search(match, err), err
    plain = run_json(capsys, ["bound", "--model", "tiny", "--eps", "0.5"])
    tight = run_json(capsys, ["bound", "--model", "tiny", "--eps", "0.5", "--tight",
                              "--tight-rows", "1"])
    assert plain["source"] != "tight" and tight["value"] <= plain["value"]

