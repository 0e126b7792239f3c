"""The Bone / Bat / MiSS maths on row ranges of a weight, with no I/O.

A weight W is `out x in`; its rows are independent for the default and mini variants and
independent in groups of `r` rows for Bat, which is what lets the engine stream a tensor in
row chunks. Each `BlockMaths` works in place on a chunk already converted to the compute
dtype (fp32 or fp64), so the caller rounds exactly once, to the output dtype, at the end.

    default: W'[o, i] = W[o, i] + B[i mod r, o]                 (B is r x out)
    mini:    as default with B[k, o] := B[k, o mod mini_r]      (B is r x mini_r)
    bat:     W'_ac = W_ac (I + B_a) + B_a  on r x r tiles       (B is out/r x r x r)

`reference_merge` states the same maths on a whole tensor in the plainest form, as the
independent check used by the demo and the tests.
"""

from __future__ import annotations

import math
import threading

import torch

from bonemerge.errors import MergeError

# Largest condition number of I + B accepted when inverting a Bat block: beyond this, fp32
# inputs carry too few digits for the unmerged weight to mean anything.
MAX_CONDITION = 1e5


class BlockMaths:
    """One adapter block prepared for one weight, applied to row chunks in place."""

    def merge(self, work: torch.Tensor, row0: int) -> None:
        raise NotImplementedError

    def unmerge(self, work: torch.Tensor, row0: int) -> None:
        raise NotImplementedError


class AdditiveBlock(BlockMaths):
    """Default and mini: add the block to every r-column group of the weight."""

    def __init__(self, block_t: torch.Tensor, in_features: int) -> None:
        # block_t is (out, r): row o holds what is added to the columns of output row o.
        self.block_t = block_t
        self.r = block_t.shape[1]
        self.groups, self.tail = divmod(in_features, self.r)

    def _apply(self, work: torch.Tensor, row0: int, sign: int) -> None:
        rows = self.block_t[row0 : row0 + work.shape[0]]
        if self.groups:
            body = work[:, : self.groups * self.r].unflatten(1, (self.groups, self.r))
            body.add_(rows.unsqueeze(1), alpha=sign)
        if self.tail:
            work[:, self.groups * self.r :].add_(rows[:, : self.tail], alpha=sign)

    def merge(self, work: torch.Tensor, row0: int) -> None:
        self._apply(work, row0, 1)

    def unmerge(self, work: torch.Tensor, row0: int) -> None:
        self._apply(work, row0, -1)


class BatBlock(BlockMaths):
    """Bat: each r x r tile of the weight is multiplied by (I + B_a) and shifted by B_a."""

    def __init__(self, block: torch.Tensor, in_features: int) -> None:
        self.block = block
        self.r = block.shape[-1]
        self.columns = in_features // self.r
        self._inverse: torch.Tensor | None = None
        self._scratch = threading.local()

    def _product(self, tiles: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """tiles @ factor into this thread's reused buffer (a fresh tensor per chunk would make
        the allocator keep ever more memory across threads)."""
        buffer = getattr(self._scratch, "buffer", None)
        if buffer is None or buffer.numel() < tiles.numel():
            buffer = self._scratch.buffer = torch.empty(tiles.numel(), dtype=tiles.dtype, device=tiles.device)
        return torch.bmm(tiles, factor, out=buffer[: tiles.numel()].view(tiles.shape))

    def _tiles(self, work: torch.Tensor) -> torch.Tensor:
        # (k, r*columns, r): for output block a, every row i of every tile c, as rows of a bmm.
        return work.view(work.shape[0] // self.r, self.r * self.columns, self.r)

    def merge(self, work: torch.Tensor, row0: int) -> None:
        a0, k = row0 // self.r, work.shape[0] // self.r
        b = self.block[a0 : a0 + k]
        delta = self._product(self._tiles(work), b)
        delta.view(k, self.r, self.columns, self.r).add_(b.unsqueeze(2))
        work.add_(delta.view_as(work))

    def inverse(self) -> torch.Tensor:
        """(I + B_a)^-1 for every a, computed in fp64; refuses blocks it cannot trust."""
        if self._inverse is None:
            wide = self.block.double()
            eye = torch.eye(self.r, dtype=torch.float64, device=wide.device)
            plus = wide + eye
            condition = torch.linalg.cond(plus)
            worst = int(torch.argmax(torch.nan_to_num(condition, nan=math.inf)).item())
            if not torch.isfinite(condition[worst]) or condition[worst] > MAX_CONDITION:
                raise MergeError(
                    f"I + B is singular or ill-conditioned for Bat block {worst} "
                    f"(condition number {condition[worst].item():.3g}), so the merge cannot be "
                    "undone reliably"
                )
            self._inverse = torch.linalg.inv(plus).to(self.block.dtype)
        return self._inverse

    def unmerge(self, work: torch.Tensor, row0: int) -> None:
        a0, k = row0 // self.r, work.shape[0] // self.r
        b = self.block[a0 : a0 + k]
        work.view(k, self.r, self.columns, self.r).sub_(b.unsqueeze(2))
        tiles = self._tiles(work)
        tiles.copy_(self._product(tiles, self.inverse()[a0 : a0 + k]))


def expand_mini(block: torch.Tensor, out_features: int) -> torch.Tensor:
    """A mini block (r x mini_r) repeated along the outputs to the default shape (r x out)."""
    return block.repeat(1, out_features // block.shape[1])


def prepare(
    variant: str,
    block: torch.Tensor,
    shape: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    inverse: bool = False,
) -> BlockMaths:
    """Ready a block for a weight of `shape` (out, in), in the compute dtype and device; with
    `inverse`, everything unmerging needs is computed now, so the result is safe to share
    between threads."""
    out_features, in_features = shape
    block = block.to(device=device, dtype=dtype)
    if variant == "bat":
        prepared = BatBlock(block.contiguous(), in_features)
        if inverse:
            prepared.inverse()
        return prepared
    if variant == "mini":
        block = expand_mini(block, out_features)
    return AdditiveBlock(block.t().contiguous(), in_features)


def reference_merge(weight: torch.Tensor, block: torch.Tensor, variant: str) -> torch.Tensor:
    """The whole merged weight from the definitions above, in the dtype of `weight`."""
    out_features, in_features = weight.shape
    block = block.to(weight.dtype)
    if variant == "bat":
        r = block.shape[-1]
        tiles = weight.reshape(out_features // r, r, in_features // r, r).permute(0, 2, 1, 3)
        merged = tiles @ (torch.eye(r, dtype=weight.dtype) + block).unsqueeze(1)
        merged = merged + block.unsqueeze(1)
        return merged.permute(0, 2, 1, 3).reshape(out_features, in_features)
    if variant == "mini":
        block = expand_mini(block, out_features)
    r = block.shape[0]
    columns = torch.arange(in_features) % r
    return weight + block[columns, :].t()
