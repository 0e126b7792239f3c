"""The best rank-K approximation of a Bat update, in bounded memory and one decomposition.

Bat's ΔW (out × in) has full rank in general, so `strip --to lora` keeps its best rank-K
approximation. A full SVD of ΔW in float64 costs O(out·in·min²) with a large constant and
several out × in matrices of workspace. The same subspace comes from the eigendecomposition
of the small Gram matrix G = ΔWᵀΔW (or ΔWΔWᵀ when out < in), min × min: G is accumulated from
bands of ΔW computed from the weight as needed, so no out × in float64 matrix is ever held.

With V the top-K eigenvectors of G, the factors are B = ΔW·V and A = Vᵀ (balanced by the
square roots of the column norms), so B·A = ΔW·V·Vᵀ is an orthogonal projection of ΔW: its
error is exactly ‖ΔW‖² − ‖ΔW·V‖², which the eigenvalues give. Squaring loses precision only
in directions whose singular value is below ~1e-8 of the largest, which contribute less than
the float32 rounding of the written factors.

Planning computes the eigenvalues only (to choose K and state the error); writing computes
the eigenvectors, once. One module's working memory is the weight in its own dtype, about
four min² float64 matrices and the factors; over `MEMORY_BUDGET` the conversion is refused
with the size it needs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bonemerge.errors import AdapterError
from bonemerge.units import format_size

if TYPE_CHECKING:
    import torch

    from bonemerge.methods.base import RankRequest

MEMORY_BUDGET = 4 * 10**9  # bytes one module's conversion may hold (4 GB)
_BAND_BYTES = 16 * 2**20  # float64 bytes of ΔW computed at a time


def bat_delta(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """ΔW of a Bat block on `weight` in float64: W_ac · B_a + B_a on every r x r tile. Any
    tile-aligned piece of the weight with the blocks of its row tiles gives that piece of ΔW."""
    out_features, in_features = weight.shape
    r = block.shape[-1]
    b = block.double().unsqueeze(1)
    tiles = weight.double().reshape(out_features // r, r, in_features // r, r).permute(0, 2, 1, 3)
    delta = tiles @ b
    delta += b
    return delta.permute(0, 2, 1, 3).reshape(out_features, in_features)


@dataclass(frozen=True)
class BatUpdate:
    """One module's Bat update, as the weight and the block that define it."""

    weight: torch.Tensor
    block: torch.Tensor

    @property
    def tall(self) -> bool:
        """Whether G is ΔWᵀΔW (in × in), i.e. the weight has at least as many rows as columns."""
        out_features, in_features = self.weight.shape
        return out_features >= in_features

    @property
    def side(self) -> int:
        return min(self.weight.shape)

    def bands(self) -> Iterator[tuple[slice, torch.Tensor]]:
        """ΔW in float64 pieces: row bands when tall, column bands otherwise, whole tiles each."""
        out_features, in_features = self.weight.shape
        r = self.block.shape[-1]
        if self.tall:
            step = max(r, _BAND_BYTES // (8 * in_features) // r * r)
            for row0 in range(0, out_features, step):
                rows = slice(row0, min(row0 + step, out_features))
                yield rows, bat_delta(self.weight[rows], self.block[row0 // r : rows.stop // r])
        else:
            step = max(r, _BAND_BYTES // (8 * out_features) // r * r)
            for col0 in range(0, in_features, step):
                cols = slice(col0, min(col0 + step, in_features))
                yield cols, bat_delta(self.weight[:, cols], self.block)

    def gram(self) -> torch.Tensor:
        """G = ΔWᵀΔW when tall, ΔWΔWᵀ otherwise, in float64."""
        import torch

        gram = torch.zeros(self.side, self.side, dtype=torch.float64)
        for _, band in self.bands():
            if self.tall:
                gram.addmm_(band.t(), band)
            else:
                gram.addmm_(band, band.t())
        return gram

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in float32, k x in and out x k, with B·A the projection of ΔW onto its top-k
        singular subspace."""
        import torch

        _, vectors = torch.linalg.eigh(self.gram())
        top = vectors[:, -k:].flip(1).contiguous()
        del vectors
        out_features, in_features = self.weight.shape
        if self.tall:
            projected = torch.empty(out_features, k, dtype=torch.float64)  # B = ΔW·V
            for rows, band in self.bands():
                torch.mm(band, top, out=projected[rows])
            norms = projected.norm(dim=0)
        else:
            projected = torch.empty(k, in_features, dtype=torch.float64)  # A = Uᵀ·ΔW
            for cols, band in self.bands():
                torch.mm(top.t(), band, out=projected[:, cols])
            norms = projected.norm(dim=1)
        root = torch.where(norms > 0, norms, torch.ones_like(norms)).sqrt()
        if self.tall:
            return (root.unsqueeze(1) * top.t()).float(), (projected / root).float()
        return (projected / root.unsqueeze(1)).float(), (top * root).float()


@dataclass(frozen=True)
class Spectrum:
    """The squared singular values of ΔW, largest first, and their sum (‖ΔW‖²)."""

    squares: torch.Tensor
    total: float

    @classmethod
    def of(cls, update: BatUpdate, key: str, base_name: str) -> Spectrum:
        """The spectrum of `update`, refusing one that is not finite (a base weight with NaN
        or Inf, or an overflow) in one sentence: no decomposition is defined for it."""
        import torch

        if not bool(torch.isfinite(update.weight).all()):
            raise AdapterError(
                f"the base weight {base_name} holds NaN or Inf values, so the update of Bat block {key} "
                "on it is undefined and cannot be approximated as LoRA; use an intact base model."
            )
        gram = update.gram()
        total = float(gram.diagonal().sum())
        if not math.isfinite(total):
            raise AdapterError(
                f"the update of Bat block {key} on {base_name} overflows float64, so it cannot be "
                "approximated as LoRA; check the base model and the adapter."
            )
        return cls(torch.linalg.eigvalsh(gram).flip(0).clamp_(min=0), total)

    def rank(self, request: RankRequest) -> int:
        """K for `--rank K` (at most full rank), or the smallest K whose relative Frobenius
        error is at most `--max-error`."""
        if request.rank is not None:
            return min(request.rank, self.squares.numel())
        assert request.max_error is not None
        allowed = request.max_error**2 * self.total
        kept = self.squares.cumsum(0)
        met = (self.total - kept <= allowed).nonzero()
        return int(met[0]) + 1 if met.numel() else self.squares.numel()

    def error(self, k: int) -> float:
        """The relative Frobenius error of keeping k singular values."""
        return (self.discarded(k) / self.total) ** 0.5 if self.total else 0.0

    def discarded(self, k: int) -> float:
        """‖ΔW‖² that keeping k singular values leaves out."""
        return max(0.0, self.total - float(self.squares[:k].sum())) if k < self.squares.numel() else 0.0


def compact_rank(shape: tuple[int, int]) -> int:
    """The largest rank whose factors, k·(out + in) values, hold at most half the out·in
    values of the weight: above it a LoRA is no longer a small adapter."""
    out_features, in_features = shape
    return max(1, out_features * in_features // (2 * (out_features + in_features)))


def memory_needed(shape: tuple[int, int], weight_bytes: int, k: int) -> int:
    """Bytes one module's conversion holds at its peak: the weight, G with eigh's workspace
    and eigenvectors (~4 min² float64), three ΔW bands and the factors (float64 and float32)."""
    out_features, in_features = shape
    side = min(shape)
    band = min(_BAND_BYTES, 8 * out_features * in_features)
    return weight_bytes + 4 * 8 * side * side + 3 * band + 12 * k * (out_features + in_features)


def check_budget(key: str, shape: tuple[int, int], weight_bytes: int, k: int) -> None:
    """Refuse a module whose conversion would hold more than `MEMORY_BUDGET`."""
    needed = memory_needed(shape, weight_bytes, k)
    if needed > MEMORY_BUDGET:
        raise AdapterError(
            f"converting {key} ({shape[0]} x {shape[1]}) to LoRA at rank {k} needs about "
            f"{format_size(needed)} of memory, over the {format_size(MEMORY_BUDGET)} one module may use; "
            "pass a smaller --rank (or a larger --max-error), or leave the module out with --exclude."
        )
