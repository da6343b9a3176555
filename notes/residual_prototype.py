"""Prototype (not part of the package): a local bound for residual blocks ``y = relu(x + F(x))``
composed from lipbound's bounds of the blocks' chains (see ``notes/residual_proposal.md``).

Run: ``.venv/bin/python notes/residual_prototype.py``. Float64 toy network, no rounding
margins on the composition itself (a real implementation adds them as the chain rules do).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import jacrev

import lipbound
from lipbound.lower import best_lower_bound

N_IN, N_HID, N_OUT, N_BLOCKS = 8, 24, 5, 2


class Block(nn.Module):
    """``relu(x + W2 relu(W1 x + b1) + b2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.F = nn.Sequential(nn.Linear(N_IN, N_HID), nn.ReLU(), nn.Linear(N_HID, N_IN))
        with torch.no_grad():
            self.F[2].weight.mul_(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.F(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(N_BLOCKS)])
        self.head = nn.Linear(N_IN, N_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def secant(z0: torch.Tensor, zlow: torch.Tensor, zbar: torch.Tensor) -> torch.Tensor:
    """Slopes ``r`` with ``|relu(z) - relu(z0)| <= r |z - z0|`` on ``[zlow, zbar]`` (rule 3)."""
    one, zero = torch.ones_like(z0), torch.zeros_like(z0)
    inactive_start = zbar.clamp(min=0) / (zbar - z0).clamp(min=1e-300)
    return torch.where(zlow >= 0, one, torch.where(zbar <= 0, zero,
                       torch.where(z0 >= 0, one, inactive_start)))


def composed_bound(net: Net, x0: torch.Tensor, eps: float) -> tuple[float, list[float]]:
    """Upper bound on the local Lipschitz constant of ``net`` over the ball ``B(x0, eps)``.

    Per block: ``|z_i(x) - z_i(x0)| <= e (1 + L_i)`` with ``L_i`` lipbound's bound of row ``i``
    of ``F`` (``local_bound_rows``), secant slopes ``R`` from those limits, and the block's
    factor ``max r + L(R F)`` (``||R (dx + dF)|| <= ||R|| e + ||R dF||``).
    """
    total, e, x, factors = 1.0, eps, x0, []
    for b in net.blocks:
        an = lipbound.Analyzer(b.F, (N_IN,))
        z0 = (x + b.F(x))[0]
        rows = an.local_bound_rows(x, e, torch.eye(N_IN)).values
        r = secant(z0, z0 - e * (1 + rows), z0 + e * (1 + rows))
        fac = float(r.max()) + an.local_bound(x, e, output_map=torch.diag(r)).value
        factors.append(fac)
        total, e, x = total * fac, e * fac, torch.relu(z0)[None]
    head = nn.Sequential(net.head).eval()
    return total * lipbound.Analyzer(head, (N_IN,)).local_bound(x, e).value, factors


def main() -> None:
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)
    net = Net().eval()
    x0 = torch.randn(1, N_IN)
    with torch.no_grad():
        naive = 1.0
        for b in net.blocks:
            naive *= 1 + float(torch.linalg.matrix_norm(b.F[2].weight, 2)
                               * torch.linalg.matrix_norm(b.F[0].weight, 2))
        naive *= float(torch.linalg.matrix_norm(net.head.weight, 2))
    print(f"global product (1 + ||W2|| ||W1||) per block x ||W_head||: {naive:.4f}")
    for eps in (1e-3, 1e-2, 0.1, 0.3, 1.0):
        with torch.no_grad():
            ub, factors = composed_bound(net, x0, eps)
        lb = best_lower_bound(net, x0, eps).value
        print(f"eps {eps:g}: composed {ub:.4f} (block factors "
              f"{', '.join(f'{f:.4f}' for f in factors)}), lower {lb:.4f}, ratio {ub / lb:.2f}")
    # where the looseness comes from as eps -> 0
    x, jac = x0, []
    for b in net.blocks:
        jb = jacrev(b)(x)[0, :, 0, :].detach()
        jf = jacrev(b.F)(x)[0, :, 0, :].detach()
        r = ((x + b.F(x))[0] > 0).double()
        tri = float(r.max() + torch.linalg.matrix_norm(torch.diag(r) @ jf, 2))
        print(f"block at x0: ||R|| + ||R J_F|| = {tri:.4f}, ||R (I + J_F)|| = "
              f"{float(torch.linalg.matrix_norm(jb, 2)):.4f}")
        jac.append(jb)
        x = b(x).detach()
    w = net.head.weight.detach()
    prod = float(torch.linalg.matrix_norm(jac[0], 2) * torch.linalg.matrix_norm(jac[1], 2)
                 * torch.linalg.matrix_norm(w, 2))
    print(f"product of exact per-block norms x head: {prod:.4f}; exact ||J(x0)||: "
          f"{float(torch.linalg.matrix_norm(w @ jac[1] @ jac[0], 2)):.4f}")


if __name__ == "__main__":
    main()
