"""Session 25 review (adversarial) of the session's source changes: defects found and fixed.

* the float32 acceptance's note (a float32 model whose own forward pass differs from the
  analysed chain within its float32 rounding) was missing from ``local_bound_rows``'s
  :class:`RowBounds` (which carried none of the analyzer's notes), from the rival methods'
  rows of ``compare`` (the FC extraction accepts such a model too), and from the text and JSON
  of ``lipbound bound`` on many inputs and ``lipbound radius``;
* ``certified_radius(an, x0, seed=an.seed)`` (a setting equal to the analyzer's own) was
  refused since the session's bad-input fixes, unlike ``sweep`` and ``bound_many``.

Also kept here: the block Lanczos constructions the review ran against the pivoted remainder
(no defect: bounds above the float64 SVD norm at the overlap floor).
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lipbound
from lipbound.errors import InputError

sys.path.insert(0, str(Path(__file__).parent))

from test_float32_acceptance import X0, _big_net  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

F32 = "float32 rounding"


def _f32(notes) -> list[str]:
    return [n for n in notes if n.startswith(F32)]


def test_row_bounds_carry_the_analyzers_notes():
    """RowBounds (local_bound_rows) carries the float32 note and the user's notes, as every
    BoundResult does; the tight bound's own note is kept after them."""
    an = lipbound.Analyzer(_big_net(), (4,), notes=["mine"])
    assert _f32(an.notes)
    c = torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]])
    rb = an.local_bound_rows(X0, 0.1, c)
    assert "mine" in rb.notes and _f32(rb.notes)
    rbt = an.local_bound_rows(X0, 0.1, c, tight=True)
    assert "mine" in rbt.notes and _f32(rbt.notes)
    assert any(n.startswith("tight bound") for n in rbt.notes)
    # (the same values as the float64 copy's: the note changes nothing else)
    an64 = lipbound.Analyzer(copy.deepcopy(_big_net()).double(), (4,))
    rb64 = an64.local_bound_rows(X0.double(), 0.1, c.double())
    assert not _f32(rb64.notes)
    assert torch.allclose(rb.values, rb64.values, rtol=1e-12, atol=0)


def test_rival_rows_carry_the_float32_note():
    """compare's rival rows (run on the FC chain that the extraction accepted within the
    model's float32 rounding) say so, as lipbound's own rows do; not for a float64 model."""
    from lipbound.baselines import compare

    methods = ["local", "fastlip", "autolip"]
    rows = {r.method: r for r in compare(_big_net(), X0, 0.1, methods)}
    for m in methods:
        assert rows[m].guarantee is not None, (m, rows[m].note)
        assert F32 in rows[m].note, (m, rows[m].note)
    rows64 = compare(copy.deepcopy(_big_net()).double(), X0.double(), 0.1, methods)
    assert all(F32 not in r.note for r in rows64)


def test_radius_accepts_the_analyzers_own_settings():
    """Settings equal to the analyzer's own are fine next to it (as in sweep / bound_many);
    different ones and unknown names are refused, naming them."""
    from lipbound.radius import certified_radii, certified_radius

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    an = lipbound.Analyzer(net, (4,), seed=5)
    x0 = torch.tensor([[0.1, 0.2, -0.3, 0.4]])
    want = certified_radius(an, x0).radius
    assert certified_radius(an, x0, seed=an.seed).radius == want
    assert certified_radius(an, x0, seed=np.int64(5), device="cpu", spectral=an.spectral,
                            failure_prob=an.failure_prob).radius == want
    assert certified_radius(net, x0, analyzer=an, device=torch.device("cpu")).radius == want
    assert [r.radius for r in certified_radii(an, x0, seed=5)] == \
        [r.radius for r in certified_radii(an, x0)]
    with pytest.raises(InputError, match="seed=3"):
        certified_radius(an, x0, seed=3)
    with pytest.raises(InputError, match="spectral"):
        certified_radius(an, x0, spectral="exact" if an.spectral != "exact" else "lanczos")
    with pytest.raises(InputError, match="unknown option.*sede"):
        certified_radius(an, x0, sede=5)


def _user_model(tmp_path: Path) -> list[str]:
    src = tmp_path / "net.py"
    src.write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                   "from test_float32_acceptance import _big_net\n"
                   "def make():\n    return _big_net()\n")
    np.save(tmp_path / "two.npy", torch.cat([X0, -X0]).numpy())  # a batch of 2
    np.save(tmp_path / "a.npy", X0[0].numpy())
    return ["--model", f"{src}:make", "--input-shape", "4", "--input"]


def test_cli_many_inputs_and_radius_show_the_float32_note(tmp_path, capsys):
    from lipbound.cli import main

    args = _user_model(tmp_path)
    folder = str(tmp_path / "two.npy")
    assert main(["bound", *args, folder, "--eps", "0.1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["rows"]) == 2 and _f32(out["notes"])
    assert main(["bound", *args, folder, "--eps", "0.1"]) == 0
    assert "note: float32 rounding" in capsys.readouterr().out
    one = str(tmp_path / "a.npy")
    assert main(["radius", *args, one, "--attacks", "fgsm", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert _f32(out["notes"])
    assert main(["radius", *args, one, "--attacks", "fgsm"]) == 0
    assert "note: float32 rounding" in capsys.readouterr().out


@pytest.mark.parametrize("n, b, rank, steps", [
    (31, 8, 1, 8),     # rank below the block at step 1, n not divisible by b
    (45, 4, 9, 12),    # deficiency at step 3 (2 b < rank < 3 b)
    (48, 4, 0, 12),    # the zero operator
    (48, 8, 3, 64),    # the basis reaches every coordinate: the exact route (dim == n)
    (97, 3, 5, 16),    # repeated top singular value (rank 5, all equal)
])
def test_block_runs_through_deficient_remainders_stay_above_the_norm(n, b, rank, steps,
                                                                       monkeypatch):
    """Block Lanczos on exact low-rank operators from a start block whose overlap with the
    top singular space is exactly the floor the bound allows (the rest of the block
    orthogonal to it): the Ritz value is at most numpy's float64 SVD norm, and the a
    posteriori bound (or the exact value of a basis spanning every coordinate) at least."""
    from lipbound import lanczos
    from lipbound.lanczos import run_lanczos
    from lipbound.posterior import block_overlap_floor

    g = torch.Generator().manual_seed(n + rank)
    u = torch.linalg.qr(torch.randn(n, max(rank, 1), generator=g, dtype=torch.float64))[0]
    s = torch.full((rank,), 2.0, dtype=torch.float64) if n == 97 else \
        torch.linspace(1.0, 3.0, rank, dtype=torch.float64)
    m = (u[:, :rank] * s).T.contiguous() if rank else torch.zeros(2, n, dtype=torch.float64)
    true = float(np.linalg.norm(m.numpy(), 2))
    c = block_overlap_floor(n, b, 1e-6)
    if rank:
        top = u[:, :rank][:, s >= s.max()]  # the top singular space (all of it when repeated)
        x1 = top[:, 0]
        start = torch.randn(n, b, generator=g, dtype=torch.float64)
        start -= top @ (top.T @ start)
        start = torch.linalg.qr(start)[0]
        start[:, 0] = math.sqrt(c) * x1 + math.sqrt(1.0 - c) * start[:, 0]
        assert float(((start.T @ top) ** 2).sum()) == pytest.approx(c, rel=1e-6)
        monkeypatch.setattr(lanczos, "_start_block", lambda *a, **k: start.T.contiguous())
    res = run_lanczos(lambda x: x @ m.T, lambda y: y @ m, n, steps,
                      torch.Generator().manual_seed(1), "cpu", block=b, post_c=c)
    if not rank:
        assert res.sqrt_theta == 0.0 or not math.isfinite(res.sqrt_theta)
        return
    assert res.sqrt_theta <= true * (1 + 1e-12)
    if res.dim >= n:
        assert res.sqrt_theta >= true * (1 - 1e-12)
    else:
        assert res.k >= 3 and res.post_sqrt >= true * (1 - 1e-12)


def test_normalize_pixels_takes_numpy_scalars():
    """A numpy scale (np.float32(1 / 255), as computed from an array's dtype) is a number:
    accepted as before session 25's checks; a bool or a non-positive scale is not."""
    from lipbound.inputs import normalize_pixels

    p = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    want = normalize_pixels(p, mean=[0.5] * 3, std=[0.2] * 3, scale=1 / 255)
    for scale in (np.float32(1 / 255), np.float64(1 / 255)):
        got = normalize_pixels(p, mean=np.array([0.5] * 3), std=np.array([0.2] * 3),
                               scale=scale)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    for bad in (True, 0, -1.0, float("nan"), np.float32("inf")):
        with pytest.raises(InputError, match="scale"):
            normalize_pixels(p, mean=None, std=None, scale=bad)


def test_a_cuda_device_string_matches_an_analyzer_on_cuda_0(monkeypatch):
    """device="cuda" next to an analyzer on cuda:0 (a model moved with .cuda(): its
    parameters' device has an index) is the analyzer's own device, not another; cuda:1 is
    another. (Without a GPU: CUDA's availability is simulated, only the comparison runs.)"""
    from types import SimpleNamespace

    from lipbound.analyzer import check_analyzer_settings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    an = SimpleNamespace(device=torch.device("cuda", 0))
    for same in ("cuda", "cuda:0", torch.device("cuda"), " CUDA:0 ".lower(), None, "auto"):
        check_analyzer_settings(an, device=(same, None))
    with pytest.raises(InputError, match="device"):
        check_analyzer_settings(an, device=("cuda:1", None))
    with pytest.raises(InputError, match="device"):
        check_analyzer_settings(an, device=("cpu", None))
    cpu = SimpleNamespace(device=torch.device("cpu"))
    check_analyzer_settings(cpu, device=("cpu", None))
    with pytest.raises(InputError, match="device"):
        check_analyzer_settings(cpu, device=("cuda", None))
