"""Dense storage: the weight is its values in a float dtype (what bonemerge always handled).

Decoding is a copy into the compute dtype and encoding a copy (one rounding) into the output
dtype: exactly the operations the engine did before codecs existed, so dense outputs keep
their bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from bonemerge.codecs.base import Bands, Codec, Rounding, Stored

if TYPE_CHECKING:
    import torch

    from bonemerge.checkpoint import TensorRef


class DenseBands(Bands):
    def decode(self, stored: torch.Tensor, out: torch.Tensor, row0: int, encoded: bool = False) -> None:
        out.copy_(stored)

    def encode(self, values: torch.Tensor, out: torch.Tensor, row0: int) -> None:
        out.copy_(values)


class Dense(Codec):
    name = "dense"

    def prepare(
        self,
        stored: Stored | None,
        load: Callable[[TensorRef], torch.Tensor],
        rounding: Rounding,
        device: torch.device | str,
    ) -> Bands:
        return DenseBands()


DENSE = Dense()
