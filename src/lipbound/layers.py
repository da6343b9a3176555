"""Extra layers lipbound understands natively.

:class:`Normalize` is the per-channel input normalisation ``(x - mean) / std`` that image
classifiers apply before their first layer. lipbound's analysis treats it as an affine layer
``A x + b`` with ``A = diag(1 / std)`` (broadcast over the spatial positions) and
``b = -mean / std``; its Lipschitz constant is ``1 / min(std)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lipbound.errors import InputError

__all__ = ["Normalize"]


def _as_vector(name: str, values: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Convert ``values`` to a 1-D float tensor, checking it is finite and non-empty."""
    try:
        t = torch.as_tensor(values, dtype=torch.float64).detach().cpu().reshape(-1)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(
            f"Normalize: {name} must be a sequence of numbers, got {values!r}"
        ) from exc
    if t.numel() == 0:
        raise InputError(f"Normalize: {name} is empty; give one value per channel")
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"Normalize: {name} contains NaN or inf values: {t.tolist()}")
    return t


class Normalize(nn.Module):
    """Per-channel input normalisation ``y = (x - mean) / std``.

    The same preprocessing as ``torchvision.transforms.Normalize``, but as a module, so that
    it can be put in front of a network and analysed as the affine map
    ``x -> diag(1/std) x - mean/std``.

    Args:
        mean: one value per channel (images) or per coordinate (vectors).
        std: as ``mean``; every value must be > 0.
        spatial_dims: number of trailing dimensions after the channel dimension
            (2 for ``(C, H, W)`` images, the default; 0 for vector inputs ``(n,)``).
            The buffers get shape ``(C, 1, ..., 1)`` with ``spatial_dims`` ones.

    Shape:
        - Input: ``(N, C, *spatial)`` with ``len(spatial) == spatial_dims``.
        - Output: same shape as the input.

    Attributes:
        mean: buffer of shape ``(C,) + (1,) * spatial_dims``, float32.
        std: buffer of the same shape, float32, all entries > 0.

    Raises:
        InputError: if ``mean`` and ``std`` have different lengths, contain NaN/inf, or some
            ``std`` is not positive.

    Example:
        >>> norm = Normalize((0.1307,), (0.3081,))
        >>> norm(torch.zeros(1, 1, 28, 28)).shape
        torch.Size([1, 1, 28, 28])
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        mean: Sequence[float] | torch.Tensor,
        std: Sequence[float] | torch.Tensor,
        *,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        if not isinstance(spatial_dims, int) or spatial_dims < 0:
            raise InputError(
                f"Normalize: spatial_dims must be an integer >= 0, got {spatial_dims!r}"
            )
        m = _as_vector("mean", mean)
        s = _as_vector("std", std)
        if m.numel() != s.numel():
            raise InputError(
                f"Normalize: mean has {m.numel()} values but std has {s.numel()}; "
                "give one mean and one std per channel"
            )
        if not bool((s > 0).all()):
            raise InputError(f"Normalize: every std must be > 0, got {s.tolist()}")
        shape = (m.numel(),) + (1,) * spatial_dims
        self.spatial_dims = spatial_dims
        self.register_buffer("mean", m.to(torch.float32).reshape(shape))
        self.register_buffer("std", s.to(torch.float32).reshape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    @property
    def lipschitz(self) -> float:
        """The L2 Lipschitz constant ``1 / min(std)`` of the map, in float64 from the buffer."""
        return 1.0 / float(self.std.double().min())

    def extra_repr(self) -> str:
        m = [round(v, 6) for v in self.mean.reshape(-1).tolist()]
        s = [round(v, 6) for v in self.std.reshape(-1).tolist()]
        return f"mean={m}, std={s}, spatial_dims={self.spatial_dims}"
