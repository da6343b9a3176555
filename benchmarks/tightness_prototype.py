"""Prototype (not library code): a centre-plus-deviation local Lipschitz bound, measured against
the paper's product of layer factors (Avant & Morgansen, IEEE TNNLS 2023; method.md rules 1-8).

For x in the ball every ReLU and max-pooling output difference is a *secant* of a known set:
``relu(y) - relu(y0) = s (y - y0)`` with ``s`` in ``[lo_i, hi_i]`` (``hi_i`` = the paper's
``r_i``), ``max(u) - max(u0) = w^T (u - u0)`` with ``w`` in the simplex over the window's
possible winners. Writing each secant as a fixed centre plus a deviation and telescoping the
product gives (notes/tightness_spike.md has the proof)::

    L(x0, eps) <= ||J^c|| + sum_j U_j * dev_j,

``J^c`` the network's Jacobian with every secant at its centre, ``dev_j`` a bound on the
deviation at secant ``j`` applied to the centre prefix (an exact norm of a dense matrix), and
``U_j`` a bound on the norm of the rest of the network after ``j`` on the rows where ``j``
can deviate: the paper's product of the later layers' factors (the plain "first order"
formula uses it unrestricted), or the same expansion applied to that tail, recursively,
or a product of such segment bounds (:func:`analyse`). Variants (:data:`VARIANTS`): the
pooling centre at x0's winner or at the simplex's centroid, and limits tightened by the
centre prefix. Every variant is sound; "new" = the least of them and the paper's product.

Everything is formed densely in float64 and norms are taken by exact eigenvalues of Gram
matrices (inflated by ``NORM_SLACK``): only for small networks (the MNIST LeNet, the zoo's
``tiny`` and ``compnet``, random small nets). A development measurement; nothing here is
shipped.

Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/tightness_prototype.py            # all parts
    PYTHONPATH=src .venv/bin/python benchmarks/tightness_prototype.py --part mnist
    PYTHONPATH=src .venv/bin/python benchmarks/tightness_prototype.py --part random
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import lipbound  # noqa: E402
from lipbound.inputs import load_sample, load_samples  # noqa: E402
from lipbound.lower import best_lower_bound  # noqa: E402
from lipbound.radius import certified_radii  # noqa: E402
from lipbound.zoo import load_model  # noqa: E402

NORM_SLACK = 1.0 + 1e-9
"""Relative inflation of every spectral norm and row norm (covers float64 rounding of the
eigenvalue solver and of the dense products in this prototype, by a wide margin)."""

LIMIT_SLACK = 1e-12
"""Absolute+relative widening of every pre-activation limit (rounding of y0 and row norms)."""

DT = torch.float64

LAST_B: dict = {}
"""The segment bounds of the last :func:`analyse` call (for inspection)."""


# ----------------------------------------------------------------------------------------
# dense float64 chain
# ----------------------------------------------------------------------------------------

@dataclass
class Affine:
    """``y = A z + b`` (flat), optionally followed by ReLU."""

    A: Tensor
    b: Tensor
    relu: bool = False


@dataclass
class Pool:
    """Max pooling; ``win[j]`` lists the flat input indices of output ``j``'s window."""

    win: Tensor


def dense_chain(model: nn.Module, in_shape: tuple[int, ...]) -> list[Affine | Pool]:
    """The model's layers (a chain of Linear/Conv2d/ReLU/MaxPool2d/Flatten children, in
    order) as dense float64 matrices and pooling windows."""
    chain: list[Affine | Pool] = []
    shape = tuple(in_shape)
    mods = [m for m in model.modules() if not list(m.children())]
    for m in mods:
        if isinstance(m, nn.Linear):
            chain.append(Affine(m.weight.detach().to(DT).clone(), m.bias.detach().to(DT).clone()))
            shape = (m.out_features,)
        elif isinstance(m, nn.Conv2d):
            n = math.prod(shape)
            eye = torch.eye(n, dtype=DT).reshape(n, *shape)
            w = m.weight.detach().to(DT)
            out = F.conv2d(eye, w, None, m.stride, m.padding, m.dilation, m.groups)
            shape = tuple(out.shape[1:])
            A = out.reshape(n, -1).T.contiguous()
            b = m.bias.detach().to(DT)[:, None].expand(shape[0], shape[1] * shape[2]).reshape(-1)
            chain.append(Affine(A, b.clone()))
        elif isinstance(m, nn.ReLU):
            last = chain[-1]
            if not isinstance(last, Affine) or last.relu:
                raise ValueError("prototype: ReLU must follow an affine layer")
            last.relu = True
        elif isinstance(m, nn.MaxPool2d):
            c, h, w_ = shape
            idx = torch.arange(c * h * w_, dtype=DT).reshape(c, 1, h, w_)
            k, s = m.kernel_size, m.stride
            if m.padding not in (0, (0, 0)) or m.dilation not in (1, (1, 1)):
                raise ValueError("prototype: max pooling without padding/dilation only")
            cols = F.unfold(idx, k, stride=s)                      # (c, kk, L)
            win = cols.permute(0, 2, 1).reshape(-1, cols.shape[1]).round().long()
            kh, sh = (k if isinstance(k, int) else k[0]), (s if isinstance(s, int) else s[0])
            ho = (h - kh) // sh + 1
            wo = cols.shape[2] // ho
            chain.append(Pool(win))
            shape = (c, ho, wo)
        elif isinstance(m, (nn.Flatten, nn.Identity, nn.Dropout)):
            shape = (math.prod(shape),)
        else:
            raise ValueError(f"prototype: unsupported layer {type(m).__name__}")
    return chain


def chain_forward(chain: list[Affine | Pool], x: Tensor) -> Tensor:
    z = x.reshape(-1).to(DT)
    for op in chain:
        if isinstance(op, Affine):
            z = op.A @ z + op.b
            if op.relu:
                z = z.clamp_min(0)
        else:
            z = z[op.win].amax(dim=1)
    return z


def snorm(M: Tensor) -> float:
    """Spectral norm (exact: top eigenvalue of the smaller Gram matrix), inflated."""
    if M.numel() == 0:
        return 0.0
    G = M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M
    return math.sqrt(max(float(torch.linalg.eigvalsh(G)[-1]), 0.0)) * NORM_SLACK


# ----------------------------------------------------------------------------------------
# the analysis
# ----------------------------------------------------------------------------------------

@dataclass
class Secant:
    """One secant set: a ReLU (diagonal, centre ``c``, half-width ``rho``) or a max pool
    (centre = x0's winner selection; deviation rows ``pairs`` and stacked selection ``sel``)."""

    kind: str                  # "relu" | "pool"
    block: int                 # index of the paper block it belongs to
    c: Tensor | None = None    # relu: centre slopes
    rho: Tensor | None = None  # relu: half-widths
    win: Tensor | None = None  # pool: windows
    i0: Tensor | None = None   # pool: flat input index of x0's winner per window
    pairs: tuple[Tensor, Tensor] | None = None   # pool: (i, i0) per deviation row
    sel: Tensor | None = None  # pool: input indices of every possible winner of unstable windows
    mask_out: Tensor | None = None   # 0/1 mask of outputs that can move
    n_unstable: int = 0
    rows: Tensor | None = None  # pool: indices of the unstable windows
    cmat: Tensor | None = None  # pool: centre (sparse, out x in)
    umat: Tensor | None = None  # pool: deviation rows of mean-centred windows (sparse)

    def support(self) -> Tensor:
        """Output rows where the secant can differ from its centre."""
        if self.kind == "relu":
            return torch.nonzero(self.rho > 0).flatten()
        return self.rows

    def centre(self, G: Tensor) -> Tensor:
        """Centre applied to the rows of ``G`` (the centre prefix into this secant)."""
        if self.kind == "relu":
            return self.c[:, None] * G
        return self.cmat @ G

    def dev(self, G: Tensor) -> float:
        """Upper bound on ``sup ||E G v|| / ||v||`` over the deviation set ``E``."""
        if self.n_unstable == 0 or G.shape[1] == 0:
            return 0.0
        if self.kind == "relu":
            nz = self.rho > 0
            return snorm(self.rho[nz, None] * G[nz])
        i, j = self.pairs
        u = self.umat @ G if self.umat is not None else G[:0]
        d_pair = snorm(torch.cat([G[i] - G[j], u]))
        d_sel = snorm(torch.cat([math.sqrt(2.0) * NORM_SLACK * G[self.sel], u]))
        return min(d_pair, d_sel)


@dataclass
class Analysis:
    eps: float
    paper: float                 # product of the paper's factors (the library's when not tightened)
    factors: list[float]
    bound: float                 # B(0, K): best of paper, splits and expansions
    first_order: float           # ||J^c|| + sum_s (paper tail after s) dev_s: the plain version
    jc: float                    # ||J^c||
    n_unstable: list[int] = field(default_factory=list)

    @property
    def new(self) -> float:
        return min(self.paper, self.bound)


def _select(n: int, cols: Tensor) -> Tensor:
    g = torch.zeros(n, cols.numel(), dtype=DT)
    g[cols, torch.arange(cols.numel())] = 1.0
    return g


def analyse(chain: list[Affine | Pool], x0: Tensor, eps: float, tighten: bool = False,
            pool_centre: str = "tied-mean", splits: bool = True,
            nested: bool = True) -> Analysis:
    """Paper product (rules 1-8, our replica) and the segment bound ``B(0, K)`` at ``(x0, eps)``.

    ``B(i, j, key)`` bounds the norm of the secant product of blocks ``i..j-1`` on vectors
    supported on ``key`` = "m" (the mask at boundary ``i``) or "s" (the rows where the secant
    of block ``i-1`` can deviate from its centre). It is the least of: the paper's product
    (first factor restricted to the columns), a split ``B(i, m, key) B(m, j, "m")``, and the
    expansion ``||C_(i->j)|| + sum_s B(b_s + 1, j, "s") dev_s(C_(i->s))``.

    ``tighten``: every pre-activation limit also from the centre prefix (rows of
    ``A_k C_(0->k)``) plus the deviations, and every radius from ``B(0, k)`` (fewer unstable
    units, smaller ``r``); otherwise the limits, masks and ``r`` are exactly the library's.
    ``splits=False``: no split option; ``nested=False``: expansions only from the input
    (boundary 0), every tail a paper product with its first factor on the support (ablation)."""
    z0 = x0.reshape(-1).to(DT)
    n0 = z0.numel()
    d = torch.ones(n0, dtype=DT)       # mask at the current boundary
    lo_box, hi_box = z0 - eps, z0 + eps
    factors: list[float] = []
    secs: list[Secant | None] = []
    # segment states, keyed by (boundary i, "m" | "s"): columns, centre product, devs
    cols_of: dict[tuple[int, str], Tensor] = {(0, "m"): torch.arange(n0)}
    state: dict[tuple[int, str], Tensor] = {(0, "m"): torch.eye(n0, dtype=DT)}
    devs: dict[tuple[int, str], list[tuple[int, float]]] = {(0, "m"): []}
    pfirst: dict[tuple[int, str], float] = {}
    B: dict[tuple[int, int, str], float] = {}

    def b_of(i: int, j: int, key: str) -> float:
        if i == j:
            return 1.0
        return B.get((i, j, key), 0.0)   # absent: empty support, nothing deviates

    n_blocks = len(chain)
    for k, op in enumerate(chain):
        eps_k = eps * (b_of(0, k, "m") if tighten else math.prod(factors))
        if k > 0:
            cols_of[(k, "m")] = torch.nonzero(d).flatten()
            prev = secs[k - 1]
            sup = prev.support() if prev is not None else torch.zeros(0, dtype=torch.long)
            cols_of[(k, "s")] = sup
            for key in ("m", "s"):
                if cols_of[(k, key)].numel():
                    state[(k, key)] = _select(d.numel(), cols_of[(k, key)])
                    devs[(k, key)] = []
        if isinstance(op, Affine):
            y0 = op.A @ z0 + op.b
            rown = torch.sqrt((op.A ** 2) @ d) * NORM_SLACK
            rad = eps_k * rown
            if tighten and k > 0:
                ag0 = op.A @ state[(0, "m")]
                delta = sum(b_of(sb + 1, k, "s") * dv for sb, dv in devs[(0, "m")])
                rad2 = eps * (torch.sqrt((ag0 ** 2).sum(1)) * NORM_SLACK + rown * delta)
                rad = torch.minimum(rad, rad2)
            slack = LIMIT_SLACK * (1 + y0.abs() + rad)
            ybar, ylow = y0 + rad + slack, y0 - rad - slack
            if op.relu:
                pos = ybar > 0
                r = torch.where(y0 >= 0, torch.ones_like(y0), ybar / (ybar - y0))
                r = torch.where(pos, r, torch.zeros_like(r))
                # secant slopes lie in [lo, r]: lo = y0 / (y0 - ylow) when y0 > 0 >= ylow
                lo = torch.where(ylow > 0, torch.ones_like(y0),
                                 torch.where(y0 > 0, y0 / (y0 - ylow), torch.zeros_like(y0)))
                lo = torch.minimum(torch.where(pos, lo, torch.zeros_like(lo)), r)
                sec: Secant | None = Secant("relu", k, c=(lo + r) / 2, rho=(r - lo) / 2,
                                            mask_out=pos.to(DT),
                                            n_unstable=int((r > lo).sum()))
                scale = r
            else:
                sec, scale = None, torch.ones_like(y0)
            for key in ("m", "s"):
                if (k, key) in state:
                    c = cols_of[(k, key)]
                    pfirst[(k, key)] = snorm(scale[:, None] * op.A[:, c])
            factors.append(pfirst.get((k, "m"), 0.0))
            for key, g in list(state.items()):
                ag = op.A if key == (0, "m") and k == 0 else op.A @ g
                if sec is not None:
                    devs[key].append((k, sec.dev(ag)))
                    ag = sec.centre(ag)
                state[key] = ag
            z0 = y0.clamp_min(0) if op.relu else y0
            if op.relu:
                d = pos.to(DT)
                lo_box, hi_box = ylow.clamp_min(0), ybar.clamp_min(0)
            else:
                d = torch.ones_like(y0)
        else:
            win = op.win
            lo_box = torch.maximum(lo_box, z0 - eps_k)
            hi_box = torch.minimum(hi_box, z0 + eps_k)
            i0 = win.gather(1, z0[win].argmax(1, keepdim=True)).squeeze(1)
            best_lo = lo_box[win].amax(1, keepdim=True)
            poss = hi_box[win] >= best_lo                                    # possible winners
            moving = d[win].amax(1) > 0
            unstable = (poss.sum(1) > 1) & moving
            ii, jj, sel = [], [], []
            crow, ccol, cval = list(range(win.shape[0])), i0.tolist(), [1.0] * win.shape[0]
            urow, ucol, uval = [], [], []
            n_urow = 0
            for w_idx in torch.nonzero(unstable).flatten().tolist():
                cand = win[w_idx][poss[w_idx]]
                vals = z0[cand]
                tied = float(vals.max() - vals.min()) <= 1e-12 * (1 + float(vals.abs().max()))
                if pool_centre == "mean" or (pool_centre == "tied-mean" and tied):
                    # centre: the simplex's centroid; |(w - 1/p)^T v| <= sqrt(1 - 1/p)
                    # ||(I - 11^T/p) v_P|| (w - 1/p sums to 0, ||w - 1/p|| <= sqrt(1 - 1/p))
                    p_ = cand.numel()
                    cval[w_idx] = 0.0
                    a_ = math.sqrt(1 - 1 / p_) * NORM_SLACK
                    for i in cand.tolist():
                        crow.append(w_idx)
                        ccol.append(i)
                        cval.append(1.0 / p_)
                        r_ = n_urow
                        n_urow += 1
                        for i2 in cand.tolist():
                            urow.append(r_)
                            ucol.append(i2)
                            uval.append(a_ * ((1.0 if i2 == i else 0.0) - 1.0 / p_))
                    continue
                sel.append(cand)
                for i in cand.tolist():
                    if i != int(i0[w_idx]):
                        ii.append(i)
                        jj.append(int(i0[w_idx]))
            n_in = z0.numel()
            cmat = torch.sparse_coo_tensor(torch.tensor([crow, ccol]), torch.tensor(cval, dtype=DT),
                                           (win.shape[0], n_in), check_invariants=True).coalesce()
            umat = None
            if urow:
                umat = torch.sparse_coo_tensor(torch.tensor([urow, ucol]),
                                               torch.tensor(uval, dtype=DT), (n_urow, n_in),
                                               check_invariants=True).coalesce()
            counts = torch.zeros(z0.numel(), dtype=DT)
            counts.index_add_(0, win.reshape(-1), torch.ones(win.numel(), dtype=DT))
            sec = Secant("pool", k, win=win, i0=i0,
                         pairs=(torch.tensor(ii, dtype=torch.long),
                                torch.tensor(jj, dtype=torch.long)),
                         sel=torch.cat(sel) if sel else torch.zeros(0, dtype=torch.long),
                         mask_out=moving.to(DT), n_unstable=int(unstable.sum()),
                         rows=torch.nonzero(unstable).flatten(), cmat=cmat, umat=umat)
            for key in ("m", "s"):
                if (k, key) in state:
                    c = cols_of[(k, key)]
                    pfirst[(k, key)] = math.sqrt(float(counts[c].max())) * (1 + 1e-12)
            factors.append(pfirst.get((k, "m"), 0.0))
            for key, g in list(state.items()):
                devs[key].append((k, sec.dev(g)))
                state[key] = sec.centre(g)
            lo_box, hi_box = lo_box[win].amax(1), hi_box[win].amax(1)
            z0 = z0[win].amax(1)
            d = moving.to(DT)
        secs.append(sec)
        # bounds B(i, k + 1, key), i decreasing (expansions use B(b_s + 1, k + 1, "s"))
        for i in range(k, -1, -1):
            for key in ("s", "m"):
                if (i, key) not in state:
                    continue
                best = pfirst[(i, key)] * math.prod(factors[i + 1:k + 1])
                for m in range(i + 1, k + 1) if splits else ():
                    best = min(best, b_of(i, m, key) * b_of(m, k + 1, "m"))
                if not nested and i > 0:
                    B[(i, k + 1, key)] = best
                    continue
                exp = snorm(state[(i, key)]) + sum(
                    b_of(sb + 1, k + 1, "s") * dv for sb, dv in devs[(i, key)])
                B[(i, k + 1, key)] = min(best, exp)
        if not isinstance(op, Pool) and not op.relu:
            if k != n_blocks - 1:
                raise ValueError("prototype: an affine layer without ReLU must be the last")
    paper = math.prod(factors)
    jc = snorm(state[(0, "m")])
    first = jc + sum(math.prod(factors[sb + 1:]) * dv for sb, dv in devs[(0, "m")])
    LAST_B.clear()
    LAST_B.update(B)
    LAST_B["devs0"] = devs[(0, "m")]
    return Analysis(eps, paper, factors, b_of(0, n_blocks, "m"), first, jc,
                    [s.n_unstable for s in secs if s is not None])


def jacobian_norm(model: nn.Module, x0: Tensor) -> float:
    m64 = _double(model)
    J = torch.autograd.functional.jacobian(lambda x: m64(x), x0.to(DT))
    J = J.reshape(J.shape[1], -1)
    return float(torch.linalg.matrix_norm(J, 2))


_DOUBLE: dict[int, nn.Module] = {}


def _double(model: nn.Module) -> nn.Module:
    key = id(model)
    if key not in _DOUBLE:
        import copy
        _DOUBLE[key] = copy.deepcopy(model).to(DT).eval()
    return _DOUBLE[key]


# ----------------------------------------------------------------------------------------
# radius
# ----------------------------------------------------------------------------------------

VARIANTS = {
    "winner": {"pool_centre": "winner"},
    "mean": {"pool_centre": "mean"},
    "tight": {"pool_centre": "mean", "tighten": True},
}
"""The bound variants measured: pooling centre at x0's winner / at the simplex's centroid for
every unstable window, and the centroid with the tightened limits. Every one is sound; the
reported "new" bound is the least of them and the paper's product."""


def variants(chain: list[Affine | Pool], x0: Tensor, eps: float,
             names: tuple[str, ...] = tuple(VARIANTS)) -> dict[str, Analysis]:
    return {n: analyse(chain, x0, eps, **VARIANTS[n]) for n in names}


def best_of(vs: dict[str, Analysis]) -> float:
    return min(v.new for v in vs.values())


def radius_new(chain: list[Affine | Pool], x0: Tensor, names: tuple[str, ...],
               start: float, tol: float = 1e-2) -> tuple[float, int]:
    """Largest eps passing ``eps * L_new(eps) < margin / sqrt(2)`` (bracket by doubling from
    ``start``, then bisection to ``tol``); returns (radius, evaluations). Every passing eps
    is a certificate on its own."""
    y = chain_forward(chain, x0)
    top = y.topk(2).values
    thr = float(top[0] - top[1]) / math.sqrt(2.0)
    n = 0

    def ok(e: float) -> bool:
        nonlocal n
        n += 1
        return e * best_of(variants(chain, x0, e, names)) < thr

    lo, hi = 0.0, start
    while ok(hi):
        lo, hi = hi, hi * 2
        if hi > 100:
            return lo, n
    if lo == 0.0:
        while not ok(hi / 2):
            hi /= 2
            if hi < 1e-8:
                return 0.0, n
        lo = hi / 2
    while hi / lo > 1 + tol:
        mid = math.sqrt(lo * hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo, n


# ----------------------------------------------------------------------------------------
# parts
# ----------------------------------------------------------------------------------------

def fmt(v: float) -> str:
    return f"{v:10.4g}"


def part_mnist(n_images: int, grid: list[float], do_radius: bool) -> list[str]:
    lm = load_model("mnist")
    model = lm.model.eval()
    chain = dense_chain(model, (1, 28, 28))
    an = lipbound.Analyzer(model, (1, 28, 28), spectral="exact")
    samples = [load_sample("mnist:8", entry=lm.entry)]
    samples += load_samples(f"mnist:test/0-{n_images - 2}", entry=lm.entry) if n_images > 1 else []
    out: list[str] = []
    violations = mism = 0
    summary: dict[float, list[tuple[float, ...]]] = {e: [] for e in grid}
    for s in samples:
        x0 = s.x.to(DT)
        y_ref = _double(model)(x0).reshape(-1)
        if float((y_ref - chain_forward(chain, x0)).abs().max()) > 1e-9:
            raise RuntimeError("the dense chain differs from the model")
        jn = jacobian_norm(model, x0)
        print(f"\n{s.name} (label {s.label}), ||J(x0)|| = {jn:.4f}")
        print(f"{'eps':>8} {'library':>10} {'replica':>10} {'1st-order':>10} {'seg-winnr':>10} "
              f"{'seg-mean':>10} {'tight':>10} {'new':>10} {'||J^c||':>10} {'lower':>10} "
              f"{'lib/new':>8} {'new/low':>8} {'unstable':>22} {'s':>5}")
        for e in grid:
            lib = an.local_bound(s.x, e).value
            t1 = time.perf_counter()
            vs = variants(chain, x0, e)
            t2 = time.perf_counter()
            low = best_lower_bound(model, s.x, e, n_random=256, pgd_restarts=8,
                                   pgd_refine=2).value
            new = min(best_of(vs), lib)
            w = vs["winner"]
            bad = [k for k, v in vs.items() if v.new < low]
            violations += len(bad) + int(w.paper < low) + int(w.first_order < low)
            mism += int(abs(w.paper - lib) > 1e-6 * lib)
            print(f"{e:8.1e} {fmt(lib)} {fmt(w.paper)} {fmt(w.first_order)} {fmt(w.bound)} "
                  f"{fmt(vs['mean'].bound)} {fmt(vs['tight'].bound)} {fmt(new)} "
                  f"{fmt(vs['mean'].jc)} {fmt(low)} {lib / new:8.2f} {new / low:8.2f} "
                  f"{str(w.n_unstable):>22} {t2 - t1:5.1f}"
                  f"{'  VIOLATION ' + str(bad) if bad else ''}")
            summary[e].append((lib, new, jn, low))
    out.append(f"mnist: {violations} soundness violations (any variant below the best lower "
               f"bound), {mism} replica/library mismatches")
    print("\nsummary over", len(samples), "images: geometric means (lib/new: min and max too)")
    print(f"{'eps':>8} {'library':>10} {'new':>10} {'||J||':>10} {'lower':>10} "
          f"{'lib/new':>8} {'min':>6} {'max':>6} {'new/lower':>9}")
    for e in grid:
        rows = summary[e]

        def gm(k: int, rows=rows) -> float:
            return math.exp(sum(math.log(r[k]) for r in rows) / len(rows))
        ratios = [r[0] / r[1] for r in rows]
        print(f"{e:8.1e} {fmt(gm(0))} {fmt(gm(1))} {fmt(gm(2))} {fmt(gm(3))} "
              f"{gm(0) / gm(1):8.2f} {min(ratios):6.2f} {max(ratios):6.2f} {gm(1) / gm(3):9.2f}")
    if do_radius:
        print("\ncertified radius (eps * L(x0, eps) < margin / sqrt 2), new = min(winner, mean)")
        print(f"{'image':>14} {'library local':>14} {'new':>10} {'ratio':>7} {'evals':>6} "
              f"{'s':>6}")
        for s in samples:
            x0 = s.x.to(DT)
            t0 = time.perf_counter()
            rl = certified_radii(an, s.x, methods=("local",))[0].radius
            r1, n1 = radius_new(chain, x0, ("winner", "mean"), start=rl)
            print(f"{s.name:>14} {rl:14.5g} {r1:10.5g} {r1 / rl:7.2f} {n1:6d} "
                  f"{time.perf_counter() - t0:6.1f}")
    return out


def random_net(seed: int, kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    g = torch.Generator().manual_seed(seed)
    if kind == "fc":
        widths = [int(torch.randint(2, 6, (1,), generator=g)) for _ in range(4)]
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [nn.Linear(widths[i], widths[i + 1])]
            if i < 2:
                layers.append(nn.ReLU())
        net, shape = nn.Sequential(*layers), (widths[0],)
    elif kind == "fc3":   # 2-3 hidden neurons
        n_in, h, n_out = 2, int(torch.randint(2, 4, (1,), generator=g)), 2
        net, shape = nn.Sequential(nn.Linear(n_in, h), nn.ReLU(), nn.Linear(h, n_out)), (n_in,)
    else:  # conv + maxpool
        net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                            nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        shape = (1, 6, 6)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net.to(DT).eval(), shape


def brute_lower(net: nn.Module, x0: Tensor, eps: float, seed: int) -> float:
    """Dense sampling in the ball (radii from 1e-3 eps up) plus projected gradient ascent on
    the ratio; every ratio is evaluated conservatively, ``(||f(x) - f(x0)|| - ROUND) /
    ||x - x0||`` with ``ROUND = 1e-12 (1 + ||f(x0)||)`` (float64 rounding of the difference:
    without it, ratios at ||x - x0|| ~ 1e-8 exceeded the exact constant of an affine piece by
    2e-9 relative)."""
    g = torch.Generator().manual_seed(seed)
    n = x0.numel()
    f0 = net(x0).detach()
    rnd = 1e-12 * (1 + float(f0.norm()))

    def ratio(dx: Tensor) -> Tensor:
        df = net(x0 + dx.reshape(-1, *x0.shape[1:])) - f0
        return (df.norm(dim=1) - rnd).clamp_min(0) / dx.norm(dim=1)

    dirs = torch.randn(20000, n, generator=g, dtype=DT)
    dirs /= dirs.norm(dim=1, keepdim=True)
    radii = eps * torch.rand(20000, 1, generator=g, dtype=DT) ** (1.0 / n)
    radii = torch.cat([radii[:10000], eps * 10 ** (-3 * torch.rand(10000, 1, generator=g,
                                                                     dtype=DT))])
    dx = dirs * radii.clamp_min(1e-3 * eps)
    with torch.no_grad():
        r = ratio(dx)
    best = float(r.max())
    starts = dx[r.topk(16).indices].clone()
    for i in range(16):
        v = starts[i].clone().requires_grad_(True)
        for _ in range(200):
            val = ratio(v[None])[0]
            (gv,) = torch.autograd.grad(val, v)
            best = max(best, float(val.detach()))
            with torch.no_grad():
                v += 0.05 * eps * gv / (gv.norm() + 1e-30)
                if v.norm() > eps:
                    v *= eps / v.norm()
                if v.norm() < 1e-3 * eps:
                    break
    return best


def ray_sup_2d(net: nn.Sequential, x0: Tensor, eps: float, n_angles: int = 20000) -> float:
    """L(x0, eps) of a one-hidden-layer net with 2 inputs, exact along each of ``n_angles``
    rays: on a ray x0 + t u, f(x) - f(x0) = p + q t on each piece between the hidden units'
    switching points, and ||p + q t|| / t = ||p s + q|| (s = 1/t) is convex in s, so the
    ratio's supremum over the piece is at its ends: the switching points in (0, eps], eps,
    and t -> 0+ (the one-sided directional derivative). Values are attained (or limits of
    attained values), so this is a lower bound on L that misses only between the rays."""
    w1, b1, w2 = net[0].weight, net[0].bias, net[2].weight
    th = torch.arange(n_angles, dtype=DT) * (2 * math.pi / n_angles)
    u = torch.stack([th.cos(), th.sin()], 1)                        # (A, 2)
    y0 = w1 @ x0.reshape(-1) + b1                                    # (H,)
    du = u @ w1.T                                                    # (A, H)
    with torch.no_grad():
        act0 = (y0 > 0) | ((y0 == 0) & (du > 0))                     # 0+ pattern
        best = float(((act0 * du) @ w2.T).norm(dim=1).max())
        f0 = net(x0)
        rnd = 1e-12 * (1 + float(f0.norm()))
        ts = (-y0[None, :] / du)                                     # switching points
        ts = torch.where((ts > 0) & (ts <= eps), ts, torch.full_like(ts, eps))
        ts = torch.cat([ts, torch.full((n_angles, 1), eps, dtype=DT)], 1)
        pts = x0.reshape(1, 1, -1) + ts[..., None] * u[:, None, :]
        df = net(pts.reshape(-1, 2)) - f0
        r = (df.norm(dim=1) - rnd).clamp_min(0) / ts.reshape(-1)
        best = max(best, float(r.max()))
    return best


def part_random(n_nets: int) -> list[str]:
    print("\nrandom float64 nets: bound vs brute force (sampling + ascent) and library")
    print(f"{'net':>10} {'eps':>8} {'library':>10} {'replica':>10} {'winner':>10} {'mean':>10} "
          f"{'tight':>10} {'new':>10} {'brute':>10} {'lower':>10} {'ray-exact':>10}")
    viol = 0
    mism = 0
    for seed in range(n_nets):
        for kind in ("fc3", "fc", "conv", "convtie"):
            net, shape = random_net(seed, "conv" if kind == "convtie" else kind)
            g = torch.Generator().manual_seed(1000 + seed)
            x0 = torch.randn(1, *shape, generator=g, dtype=DT)
            if kind == "convtie":   # a constant image: every pooling window tied at x0
                x0 = torch.full_like(x0, float(x0.reshape(-1)[0]))
            chain = dense_chain(net, shape)
            an = lipbound.Analyzer(net, shape, spectral="exact")
            for e in (0.03, 0.3, 3.0):
                lib = an.local_bound(x0, e).value
                vs = variants(chain, x0, e)
                a = vs["winner"]
                bl = brute_lower(net, x0, e, seed)
                lw = best_lower_bound(net, x0, e, n_random=256, pgd_restarts=8).value
                ex = ray_sup_2d(net, x0, e) if kind == "fc3" else float("nan")
                low = max(bl, lw, ex) if kind == "fc3" else max(bl, lw)
                new = best_of(vs)
                bad = min([v.bound for v in vs.values()] + [a.paper, a.first_order]) < low
                viol += int(bad)
                mism += int(abs(a.paper - lib) > 1e-6 * max(lib, 1e-300))
                print(f"{kind}/{seed:<5d} {e:8.2g} {fmt(lib)} {fmt(a.paper)} {fmt(a.bound)} "
                      f"{fmt(vs['mean'].bound)} {fmt(vs['tight'].bound)} {fmt(new)} {fmt(bl)} "
                      f"{fmt(lw)} {fmt(ex)}{'  VIOLATION' if bad else ''}")
    line = f"random nets: {viol} soundness violations, {mism} replica/library mismatches"
    print(line)
    return [line]


def part_zoo(grid: list[float]) -> list[str]:
    print("\nzoo tiny / compnet")
    print(f"{'model':>8} {'eps':>8} {'library':>10} {'winner':>10} {'new':>10} {'||J||':>10} "
          f"{'lower':>10}")
    viol = 0
    for name, shape in (("tiny", (3,)), ("compnet", (7,))):
        lm = load_model(name)
        model = lm.model.eval()
        xs = load_sample(lm.entry.default_sample, entry=lm.entry).x
        x0 = xs.to(DT)
        chain = dense_chain(model, shape)
        an = lipbound.Analyzer(model, shape, spectral="exact")
        jn = jacobian_norm(model, x0)
        for e in grid:
            lib = an.local_bound(xs, e).value
            vs = variants(chain, x0, e)
            low = max(best_lower_bound(model, xs, e, n_random=256, pgd_restarts=8).value,
                      brute_lower(_double(model), x0, e, 0))
            new = best_of(vs)
            bad = min(v.bound for v in vs.values()) < low
            viol += int(bad)
            print(f"{name:>8} {e:8.1e} {fmt(lib)} {fmt(vs['winner'].bound)} {fmt(new)} {fmt(jn)} "
                  f"{fmt(low)}{'  VIOLATION' if bad else ''}")
    line = f"zoo nets: {viol} soundness violations"
    print(line)
    return [line]


def main() -> int:
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("all", "mnist", "zoo", "random"), default="all")
    p.add_argument("--images", type=int, default=4, help="mnist:8 plus this many - 1 test images")
    p.add_argument("--no-radius", action="store_true")
    p.add_argument("--nets", type=int, default=4, help="random nets per kind")
    args = p.parse_args()
    grid = [10.0 ** (k / 2) for k in range(-8, 1)]
    lines: list[str] = []
    if args.part in ("all", "zoo"):
        lines += part_zoo(grid)
    if args.part in ("all", "random"):
        lines += part_random(args.nets)
    if args.part in ("all", "mnist"):
        lines += part_mnist(args.images, grid, not args.no_radius)
    print()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
