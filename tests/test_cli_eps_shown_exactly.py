"""The radius a bound was computed for is shown exactly in every CLI table and title (session
23): ``fmt``'s 4 decimals / ``:g``'s 6 digits stated 0.123456 as 0.1235 (and 0.1234567 as
0.123457), a larger ball than the one bounded."""

from __future__ import annotations

import pytest

from lipbound.cli import main
from lipbound.cli.rounding import fmt_eps, fmt_radius_in

EPS = "0.1234567"


def test_fmt_eps_reads_back_as_the_same_float():
    for v in (0.1234567, 0.46415888336127786, 1e-7, 7.0, 2.0 ** -1074, 1e300):
        assert float(fmt_eps(v)) == v
    assert fmt_radius_in(0.1234567, 0.1234567) == "0.1234567"
    assert fmt_eps(None) == "-"


@pytest.mark.parametrize("cmd", [
    ["bound", "--model", "mnist", "--input", "mnist:8", "--eps", EPS],
    ["bound", "--model", "mnist", "--input", "mnist:test/0-1", "--eps", EPS],
    ["layers", "--model", "mnist", "--input", "mnist:8", "--eps", EPS],
])
def test_the_radius_is_shown_exactly(cmd, capsys):
    assert main(cmd) == 0
    out = capsys.readouterr().out
    assert EPS in out
    assert "0.1235" not in out and "0.123457" not in out


def test_analyzer_refuses_notes_given_as_one_string():
    """``Analyzer(notes="seeded weights")`` kept the note letter by letter (s, e, e, ...)."""
    from torch import nn

    from lipbound import Analyzer
    from lipbound.errors import InputError

    net = nn.Sequential(nn.Linear(2, 2)).double().eval()
    with pytest.raises(InputError, match="sequence of strings"):
        Analyzer(net, (2,), notes="seeded weights")
    an = Analyzer(net, (2,), notes=["seeded weights"])
    assert an.global_bound().notes[:1] == ("seeded weights",)


@pytest.mark.parametrize("seed", [2 ** 64, -1])
def test_lower_bounds_refuse_a_seed_outside_torchs_range(seed):
    """A seed of 2**64 reached torch's manual_seed (a bare ValueError 'Overflow when unpacking
    long long'); -1 was silently the stream of 2**64 - 1."""
    import torch
    from torch import nn

    from lipbound.errors import InputError
    from lipbound.lower import random_lower_bound

    net = nn.Sequential(nn.Linear(2, 2)).double().eval()
    x0 = torch.zeros(1, 2, dtype=torch.float64)
    with pytest.raises(InputError, match=r"2\*\*64"):
        random_lower_bound(net, x0, 0.1, seed=seed)
