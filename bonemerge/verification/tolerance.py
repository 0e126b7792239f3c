"""How far a correct merge computed by another implementation may lie from the exact value,
element by element: the allowance `verify` grants models it cannot reproduce bit for bit.
Each method states its own bound (`Method.error_bound`); this module holds the pieces they
share and the steps between merges.

Each bound is built from the magnitudes that went into that element, never from the scale
of its row, so a small element altered by a few units in its last place is still caught.
With `u` the unit roundoff of the arithmetic another implementation uses (fp32 for 16-bit
and fp32 weights, fp64 for fp64 ones) and `q` the output dtype, for an element of a merged
weight:

- its input may already be off by `carried` (the bound of the operations before it);
- the op's own maths adds the bound its method states (see each module in
  `bonemerge.methods`), typically γₙ·(the merge applied to magnitudes), with the classic
  γₙ = n·u/(1 − n·u) over the n terms of its inner products;
- with several adapters, PEFT rounds the weight to `q` between them and loads every adapter
  after the first in `q`: half an ulp of each intermediate weight, and the effect of each
  later block rounded to `q`;
- the final rounding to `q` adds half an ulp of the value rounded (`final_allowance`).

γ is doubled to cover the error of verify's own float64 recomputation as well. The bound is
rigorous for the maths above; any change larger than it is not rounding.
"""

from __future__ import annotations

import torch

_MANTISSA = {"F16": 10, "BF16": 7, "F32": 23, "F64": 52}
_MIN_EXPONENT = {"F16": -14, "BF16": -126, "F32": -126, "F64": -1022}


def ulp(magnitude: torch.Tensor, dtype: str) -> torch.Tensor:
    """The spacing of `dtype` numbers at each |magnitude| (the subnormal spacing near zero)."""
    value = magnitude.abs()
    _, exponent = torch.frexp(value)
    exponent = torch.where(value == 0, _MIN_EXPONENT[dtype] + 1, exponent)
    exponent = exponent.clamp(min=_MIN_EXPONENT[dtype] + 1)
    return torch.ldexp(torch.ones_like(value), exponent - 1 - _MANTISSA[dtype])


def _unit_roundoff(dtype: str) -> float:
    return 2.0**-53 if dtype == "F64" else 2.0**-24


def gamma(terms: int, dtype: str) -> float:
    """γₙ for the arithmetic another implementation uses on a `dtype` weight, doubled."""
    u = _unit_roundoff(dtype)
    return 2 * terms * u / (1 - terms * u)


def between_merges(rows: torch.Tensor, carried: torch.Tensor, dtype: str) -> torch.Tensor:
    """A second adapter merged by another tool starts from a weight rounded to `dtype` (PEFT
    merges adapter after adapter in place): half an ulp more. PEFT also loads every adapter
    after the first in the model's dtype, so those blocks arrive rounded to it
    (each op's bound is then asked for with `rounded`)."""
    return carried + 0.5 * ulp(rows.abs() + carried, dtype)


def final_allowance(values: torch.Tensor, carried: torch.Tensor, dtype: str) -> torch.Tensor:
    """How far a stored element may lie from the exact `values`: the carried error, plus half
    an ulp of the largest value the other implementation may have rounded."""
    return carried + 0.5 * ulp(values.abs() + carried, dtype)
