"""Paper-style figures: bound-versus-radius sweeps and per-layer factors.

The figures reproduce the two kinds of plot of Avant & Morgansen, *Analytical Bounds on the
Local Lipschitz Constants of ReLU Networks* (IEEE TNNLS 2023): Lipschitz bounds against the
radius eps (upper bounds solid, lower bounds dashed, both axes logarithmic) and the local
versus global factor of each layer together with the radius each layer sees; and, over many
inputs, certified radii next to the radii of verified adversarial examples.

Matplotlib is imported lazily and only through its object-oriented API (``Figure`` with the
Agg canvas), with style settings applied in a local ``rc_context``: importing or calling this
module never switches the global backend or leaves rcParams changed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import InputError
from .results import format_prob_up
from .validation import check_eps

__all__ = ["ATTACK_STYLES", "CERTIFICATE_STYLES", "METHOD_STYLES", "format_prob_up",
           "paper_style", "plot_layer_factors", "plot_radii", "plot_sweep", "save_figure"]

#: label, colour, line style and marker of each method's curve
METHOD_STYLES: dict[str, dict[str, Any]] = {
    "local": {"label": "local upper bound", "color": "#1f4e9c", "linestyle": "-",
              "marker": "o"},
    "tight": {"label": "tight local upper bound", "color": "#0f8b8d", "linestyle": "-",
              "marker": "s"},
    "global": {"label": "global upper bound", "color": "#222222", "linestyle": "-",
               "marker": None},
    "random": {"label": "random sampling (lower)", "color": "#2a9d5c", "linestyle": "--",
               "marker": "v"},
    "gradient": {"label": "gradient ascent (lower)", "color": "#e08a1e", "linestyle": "--",
                 "marker": "^"},
    "pgd": {"label": "PGD (lower)", "color": "#c0392b", "linestyle": "--", "marker": "s"},
    "best": {"label": "best lower bound", "color": "#7d3c98", "linestyle": "--",
             "marker": "D"},
}

_RC: dict[str, Any] = {
    "font.family": "serif",
    "font.serif": ["DejaVu Serif"],
    "mathtext.fontset": "dejavuserif",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.linewidth": 0.8,
    "lines.linewidth": 1.6,
    "lines.markersize": 3.5,
    "xtick.direction": "in",
    "ytick.direction": "in",
    "xtick.top": True,
    "ytick.right": True,
    "savefig.bbox": "tight",
    "pdf.fonttype": 42,
}


@contextmanager
def paper_style() -> Iterator[None]:
    """Apply the paper style inside a ``with`` block (restores rcParams afterwards)."""
    import matplotlib

    with matplotlib.rc_context(_RC):
        yield


def new_figure(width: float, height: float, nrows: int = 1, *, sharex: bool = False):
    """A matplotlib ``Figure`` on an Agg canvas (no pyplot, no global backend change).

    Returns:
        ``(figure, axes)``; ``axes`` is a single ``Axes`` when ``nrows == 1``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, 1, sharex=sharex)
    return fig, axes


def save_figure(fig, path_png: str | Path | None, path_pdf: str | Path | None = None,
                *, dpi: int = 200) -> list[Path]:
    """Write ``fig`` as PNG and/or PDF (parent folders are created); returns the paths."""
    written = []
    for path in (path_png, path_pdf):
        if path is None:
            continue
        p = Path(path)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(p, dpi=dpi)
        except OSError as exc:
            raise InputError(f"cannot write the figure {p} ({exc.strerror or exc}); give a "
                             "path in a writable folder") from exc
        written.append(p)
    return written


def _series(name: str, values: object, n: int | None) -> list[float | None]:
    """``values`` as a list of numbers (or ``None``), of length ``n`` when given.

    Raises:
        InputError: not a sequence of real numbers, or of another length (a series shorter
            than its x values failed with an IndexError, a longer one was cut silently).
    """
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise InputError(f"{name} must be a sequence of numbers, got {type(values).__name__}")
    out: list[float | None] = []
    for v in values:  # type: ignore[attr-defined]
        if v is None:
            out.append(None)
            continue
        if isinstance(v, (bool, str, bytes)):
            raise InputError(f"{name} must hold numbers (or None), got {v!r}")
        try:
            out.append(float(v))
        except (TypeError, ValueError) as exc:
            raise InputError(f"{name} must hold numbers (or None), got {v!r}") from exc
    if n is not None and len(out) != n:
        raise InputError(f"{name} has {len(out)} values but there are {n} points; give one "
                         "value per point")
    return out


def _positive(xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
    """Keep the points a log-log plot can show (finite, > 0)."""
    px, py = [], []
    for x, y in zip(xs, ys, strict=True):
        if y is not None and math.isfinite(y) and y > 0 and x > 0:
            px.append(x)
            py.append(y)
    return px, py


def _plain_labels_if_narrow(ax) -> None:
    """On a log axis spanning less than about two decades, label ticks as plain numbers
    (``8``, ``9``) instead of ``8×10^0``."""
    from matplotlib.ticker import FuncFormatter

    lo, hi = ax.get_ylim()
    if lo > 0 and hi / lo < 100:
        fmt = FuncFormatter(lambda v, _pos: f"{v:.4g}")
        ax.yaxis.set_major_formatter(fmt)
        ax.yaxis.set_minor_formatter(fmt)


def plot_sweep(eps: Sequence[float], curves: dict[str, Sequence[float]], *,
               path_png: str | Path | None, path_pdf: str | Path | None = None,
               title: str | None = None, upper: Sequence[str] = ("local", "global"),
               label_suffix: dict[str, str] | None = None,
               violations: Sequence[str] = (),
               violation_points: Sequence[tuple[float, float]] = ()) -> list[Path]:
    """Plot Lipschitz bounds against the radius (Avant & Morgansen 2023, Figs. 4-7 style).

    Args:
        eps: the radii (x axis, log scale).
        curves: method name -> one value per radius (non-positive or non-finite values are
            left out: a log axis cannot show them; the method's legend entry says how many).
        path_png: PNG file to write (or ``None``).
        path_pdf: PDF file to write (or ``None``).
        title: figure title (network and input).
        upper: the methods whose values are upper bounds (solid lines with filled markers,
            drawn on top); all others are drawn dashed with hollow markers as lower bounds.
            Between radii the lines are steps that stay valid there: an upper curve takes
            the value of the next larger radius (a bound on a larger ball holds on a smaller
            one), a lower curve keeps the value of the last smaller radius (a witness in a
            smaller ball is one in every larger ball).
        label_suffix: optional text appended to a method's legend label (e.g. the failure
            probability of a probabilistic bound).
        violations: orderings the numbers break (a lower bound above an upper bound, see
            :meth:`lipbound.sweep.SweepResult.violations`): when any, the figure says
            "SOUNDNESS CHECK FAILED" in red with the first of them, so that the plot never
            shows such a point unflagged.
        violation_points: ``(eps, value)`` of the offending values, circled in red.

    Returns:
        The paths written.
    """
    suffix = label_suffix or {}
    eps = [check_eps(e, f"eps[{i}]") for i, e in enumerate(_series("eps", eps, None))]
    curves = {name: _series(f"curves[{name!r}]", values, len(eps))
              for name, values in curves.items()}
    # in increasing eps: radii given out of order would draw the curves back and forth
    order = sorted(range(len(eps)), key=lambda i: eps[i])
    eps = [eps[i] for i in order]
    curves = {name: [values[i] for i in order] for name, values in curves.items()}
    with paper_style():
        fig, ax = new_figure(5.6, 3.8)
        n_marked = len(eps) <= 40
        shown = 0
        for name, values in curves.items():
            style = dict(METHOD_STYLES.get(name, {"label": name, "color": None,
                                                  "linestyle": "-", "marker": None}))
            style["linestyle"] = "-" if name in upper else "--"
            # between two radii the line states a bound too: an upper bound at a radius holds
            # at every smaller one and a lower bound at every larger one (L(x0, eps) grows
            # with eps), so an upper curve steps to the next radius's value and a lower one
            # keeps its value up to the next radius. A straight segment could pass below the
            # constant (an upper bound of 1 at eps 0.5 and 134 at 10, a ratio of 34 attained
            # at 1.5) or above it (a lower bound of 1 at 0.5 and 101 at 10, a constant of 1
            # up to 9).
            style["drawstyle"] = "steps-pre" if name in upper else "steps-post"
            if not n_marked:
                style["marker"] = None
            if name in upper:
                # on top: where an upper bound is tight (meets a lower bound, e.g. the 3-D
                # example at small eps) it stays visible
                style["zorder"] = 3
            else:
                # hollow and a little larger: a lower bound under an upper bound or under
                # another lower bound of the same value (gradient ascent and PGD) still shows
                style.update(zorder=2.5, markerfacecolor="none", markersize=5,
                             markeredgewidth=1.0)
            label = style.pop("label") + suffix.get(name, "")
            px, py = _positive(eps, values)
            hidden = len(values) - len(px)
            if hidden:
                # a log axis cannot show them: the legend says so instead of dropping the
                # values (or the whole method) silently
                label += (f" [{hidden} of {len(values)} value(s) ≤ 0 or not finite, "
                          "not shown]")
            if len(px) < 2 and style.get("marker") is None:
                style["marker"] = "o"  # a lone point of a line style without markers
            ax.plot(px, py, label=label, **style)
            shown += len(px)
        vx, vy = _positive([e for e, _ in violation_points], [v for _, v in violation_points])
        if vx:
            ax.plot(vx, vy, linestyle="none", marker="o", markersize=9, markerfacecolor="none",
                    markeredgecolor="red", markeredgewidth=1.2, label="soundness check failed",
                    zorder=4)
        ax.set_xscale("log")
        ax.set_yscale("log")
        if not shown and not vx:
            # nothing a log axis can show (e.g. a network whose outputs cannot move: every
            # bound 0): fixed limits, else matplotlib refuses to draw empty log axes
            xs = [e for e in eps if math.isfinite(e) and e > 0] or [1.0]
            ax.set_xlim(min(xs) / 2, max(xs) * 2)
            ax.set_ylim(0.1, 10.0)
            ax.text(0.5, 0.5, "no value > 0 and finite to show on a log axis",
                    transform=ax.transAxes, ha="center", va="center", fontsize=8)
        _plain_labels_if_narrow(ax)
        if violations:
            more = f" (+{len(violations) - 1} more)" if len(violations) > 1 else ""
            ax.text(0.02, 0.98, f"SOUNDNESS CHECK FAILED: {violations[0]}{more}",
                    transform=ax.transAxes, ha="left", va="top", color="red", fontsize=7,
                    wrap=True)
        ax.set_xlabel("ε (L2 radius)")
        ax.set_ylabel("Lipschitz bound")
        if title:
            ax.set_title(title)
        ax.grid(True, which="major", linewidth=0.4, alpha=0.5)
        ax.grid(True, which="minor", linewidth=0.2, alpha=0.3)
        ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
        return save_figure(fig, path_png, path_pdf)


def plot_layer_factors(names: Sequence[str], local: Sequence[float],
                       global_: Sequence[float], radius_in: Sequence[float], *,
                       path_png: str | Path | None, path_pdf: str | Path | None = None,
                       title: str | None = None, local_label: str = "local factor",
                       global_label: str = "global factor",
                       local_probabilistic: Sequence[bool] | None = None,
                       global_probabilistic: Sequence[bool] | None = None,
                       probabilistic_label: str = "probabilistic factor") -> list[Path]:
    """Bar plot of each layer's local and global factor, and the radius each layer sees
    (the per-layer AlexNet figure of Avant & Morgansen 2023).

    Args:
        names: one short label per layer.
        local: local factor per layer.
        global_: global factor per layer (``nan`` where unknown).
        radius_in: L2 radius of the ball each layer sees.
        path_png, path_pdf: files to write.
        title: figure title.
        local_label, global_label: legend labels of the two kinds of bar.
        local_probabilistic, global_probabilistic: per layer, whether that factor is a
            probabilistic (not a certified) upper bound; such bars are hatched.
        probabilistic_label: legend label of the hatching (say there the failure
            probability).

    A factor or radius of exactly 0 (a layer none of whose outputs can move, and the layers
    after it) cannot stand on the log axis: a "0" is written at the foot of its slot instead;
    an infinite one (an overflowed bound) gets a "∞" at the top of its slot.
    The legend sits below the figure, never over the bars.

    Returns:
        The paths written.
    """
    from matplotlib.patches import Patch

    n = len(names)
    local = _series("local", local, n)
    global_ = _series("global_", global_, n)
    radius_in = _series("radius_in", radius_in, n)
    for what, fs in (("local_probabilistic", local_probabilistic),
                     ("global_probabilistic", global_probabilistic)):
        if fs is not None and len(fs) != n:
            raise InputError(f"{what} has {len(fs)} flags for {n} layers; give one per layer")
    idx = list(range(n))
    width = 0.38
    hatch = "////"

    def clean(vs: Sequence[float]) -> list[float]:
        return [v if (v is not None and math.isfinite(v) and v > 0) else math.nan for v in vs]

    def flags(fs: Sequence[bool] | None) -> list[bool]:
        return [False] * n if fs is None else [bool(f) for f in fs]

    loc_p, glob_p = flags(local_probabilistic), flags(global_probabilistic)
    with paper_style():
        fig, (ax1, ax2) = new_figure(max(5.6, 0.45 * n + 2.0), 5.4, nrows=2, sharex=True)
        for values, shift, color, probs in ((local, -width / 2,
                                             METHOD_STYLES["local"]["color"], loc_p),
                                            (global_, width / 2, "#9a9a9a", glob_p)):
            bars = ax1.bar([i + shift for i in idx], clean(values), width, color=color,
                           edgecolor="white", linewidth=0.0)
            for bar, prob in zip(bars, probs, strict=True):
                if prob:
                    bar.set_hatch(hatch)
                    bar.set_linewidth(0.6)
            for i, v in enumerate(values):
                if v == 0:
                    ax1.text(i + shift, 0.02, "0", transform=ax1.get_xaxis_transform(),
                             ha="center", va="bottom", fontsize=7, color=color)
                elif v == math.inf:  # (an overflowed bound) no bar: say so at the top
                    ax1.text(i + shift, 0.98, "∞", transform=ax1.get_xaxis_transform(),
                             ha="center", va="top", fontsize=7, color=color)
        ax1.set_yscale("log")
        ax1.set_ylabel("layer Lipschitz factor")
        ax1.axhline(1.0, color="#555555", linewidth=0.6, linestyle=":")
        handles = [Patch(facecolor=METHOD_STYLES["local"]["color"], label=local_label),
                   Patch(facecolor="#9a9a9a", label=global_label)]
        if any(loc_p) or any(glob_p):
            handles.append(Patch(facecolor="white", edgecolor="#555555", hatch=hatch,
                                 label=probabilistic_label))
        # below the figure, as in the sweep plot: never over the bars (constrained layout
        # makes room for it)
        fig.set_layout_engine("constrained")
        fig.legend(handles=handles, frameon=False, loc="outside lower center", ncol=1)
        ax1.grid(True, axis="y", which="major", linewidth=0.4, alpha=0.5)
        if title:
            ax1.set_title(title)
        ax2.plot(idx, clean(radius_in), color=METHOD_STYLES["local"]["color"], marker="o",
                 linestyle="-")
        for i, v in enumerate(radius_in):
            if v == 0:  # after a layer whose outputs cannot move
                ax2.text(i, 0.02, "0", transform=ax2.get_xaxis_transform(), ha="center",
                         va="bottom", fontsize=7, color=METHOD_STYLES["local"]["color"])
            elif v == math.inf:  # after an infinite factor
                ax2.text(i, 0.98, "∞", transform=ax2.get_xaxis_transform(), ha="center",
                         va="top", fontsize=7, color=METHOD_STYLES["local"]["color"])
        ax2.set_yscale("log")
        ax2.set_ylabel("L2 radius into layer")
        ax2.grid(True, which="major", linewidth=0.4, alpha=0.5)
        ax2.set_xticks(idx)
        ax2.set_xticklabels(list(names), rotation=45, ha="right")
        ax2.set_xlabel("layer")
        return save_figure(fig, path_png, path_pdf)


#: colour and marker of each certificate's points in the radius plot (filled markers)
CERTIFICATE_STYLES: dict[str, dict[str, Any]] = {
    "local": {"color": "#1f4e9c", "marker": "o"},
    "margin": {"color": "#7d3c98", "marker": "^"},
    "global": {"color": "#222222", "marker": "v"},
}
#: colour and marker of each attack's points in the radius plot (hollow markers)
ATTACK_STYLES: dict[str, dict[str, Any]] = {
    "fgsm": {"color": "#e08a1e", "marker": "x"},
    "ifgsm": {"color": "#2a9d5c", "marker": "+"},
    "gradient": {"color": "#8c564b", "marker": "D"},
    "cw": {"color": "#c0392b", "marker": "s"},
    "pgd": {"color": "#d6336c", "marker": "p"},
}


def plot_radii(certified: dict[str, Sequence[float | None]],
               attacks: dict[str, Sequence[float | None]], *,
               path_png: str | Path | None, path_pdf: str | Path | None = None,
               title: str | None = None, label_suffix: dict[str, str] | None = None,
               violations: Sequence[bool] = ()) -> list[Path]:
    """Certified radii next to attack radii, one column per input (the certified-radius
    comparison of Avant & Morgansen 2023, Sec. VI, over many inputs).

    A certified radius is a lower bound on the smallest class-changing L2 perturbation, an
    attack radius (a verified adversarial example) an upper bound on it: at every input the
    filled markers must lie at or below the line markers.

    Args:
        certified: certificate method -> radius per input, in plot order (``None`` or 0 where
            nothing was certified).
        attacks: attack -> radius per input (``None`` where it found no class change).
        path_png, path_pdf: files to write.
        title: figure title.
        label_suffix: text appended to a series' legend label (its guarantee and failure
            probability), keyed by method or attack name.
        violations: per input, whether a certified radius exceeded a verified attack radius
            (a soundness failure): such inputs are circled in red and the figure says
            "SOUNDNESS CHECK FAILED".

    Values a log axis cannot show (0, ``None``) are left out and each series' legend entry
    says how many.

    Returns:
        The paths written.
    """
    from matplotlib.ticker import MaxNLocator

    suffix = label_suffix or {}
    n = max([len(v) for v in (*certified.values(), *attacks.values())], default=0)
    certified = {k: _series(f"certified[{k!r}]", v, n) for k, v in certified.items()}
    attacks = {k: _series(f"attacks[{k!r}]", v, n) for k, v in attacks.items()}
    for k, v in (*certified.items(), *attacks.items()):
        if any(r is not None and not r >= 0 for r in v):
            raise InputError(f"radii of {k!r} must be >= 0 (or None), got {v}")

    with paper_style():
        fig, ax = new_figure(max(5.6, min(11.0, 2.5 + 0.08 * n)), 3.8)
        for name, values in certified.items():
            px, py = _positive_at(values)
            style = CERTIFICATE_STYLES.get(name, {"color": None, "marker": "o"})
            label = f"certified radius: {name}{suffix.get(name, '')}"
            # an infinite radius (a bound of 0: no class change anywhere) is no "nothing
            # certified": each kind of value a log axis cannot show is named apart
            n_inf = sum(1 for v in values if v is not None and v == math.inf)
            n_none = len(values) - len(px) - n_inf
            if n_none:
                label += f" [0 (nothing certified) at {n_none} of {len(values)}, not shown]"
            if n_inf:
                label += (f" [∞ (certified at every radius) at {n_inf} of {len(values)}, "
                          "not shown]")
            ax.plot(px, py, linestyle="none", markersize=4.5, label=label, **style)
        for name, values in attacks.items():
            px, py = _positive_at(values)
            style = ATTACK_STYLES.get(name, {"color": None, "marker": "x"})
            label = f"attack radius: {name}{suffix.get(name, '')}"
            if len(px) < len(values):
                label += f" [no class change found at {len(values) - len(px)} of {len(values)}]"
            ax.plot(px, py, linestyle="none", markersize=5.5, markeredgewidth=1.0,
                    markerfacecolor="none", label=label, **style)
        bad = [i for i, v in enumerate(violations) if v]
        if bad:
            vx, vy = [], []
            for i in bad:
                col = [v[i] for v in certified.values() if v[i] is not None and v[i] > 0]
                if col:
                    vx.append(i)
                    vy.append(max(col))
            ax.plot(vx, vy, linestyle="none", marker="o", markersize=10,
                    markerfacecolor="none", markeredgecolor="red", markeredgewidth=1.2,
                    label="soundness check failed")
            ax.text(0.02, 0.98, f"SOUNDNESS CHECK FAILED: a certified radius exceeds a verified "
                    f"attack radius at {len(bad)} input(s)", transform=ax.transAxes,
                    ha="left", va="top", color="red", fontsize=7)
        ax.set_yscale("log")
        if n <= 20:
            ax.set_xticks(range(n))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if n:
            ax.set_xlim(-0.6, n - 0.4)
        ax.set_xlabel("input (rank by largest certified radius)")
        ax.set_ylabel("L2 radius (model's input space)")
        if title:
            ax.set_title(title)
        ax.grid(True, which="major", linewidth=0.4, alpha=0.5)
        ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1)
        return save_figure(fig, path_png, path_pdf)


def _positive_at(ys: Sequence[float | None]) -> tuple[list[int], list[float]]:
    """The points a log-scale y axis can show (finite, > 0), at their index."""
    px, py = [], []
    for x, y in enumerate(ys):
        if y is not None and math.isfinite(y) and y > 0:
            px.append(x)
            py.append(y)
    return px, py
