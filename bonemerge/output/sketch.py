"""A few numbers that identify an *update*, whatever file wrote it: the history's second key.

An adapter's byte fingerprint changes with anything in its files: `lora_alpha` 8 vs 8.0
(scale 1 either way), LoRA factors rescaled (A·2, B/2), a Bone block converted to LoRA by
`strip --to lora`. The update they make, ΔW, does not. So each merge also records, for every
tensor an adapter changes, a sketch of its ΔW (in the stored weight's orientation, rows x
columns):

    xⱼ, yⱼ (j = 1..K)   fixed pseudo-random ±1 probes of the weight's column and row counts
    scale               ‖ΔW·X‖_F / √K, an estimate of ‖ΔW‖_F
    values              yⱼᵀ·ΔW·xⱼ, each with expected square ‖ΔW‖_F²

Methods compute ΔW·X from their own tensors (LoRA as `B(A·X)`, a Bone block by folding X
onto its r columns) in float32 numpy (the guards run while torch is still loading), in
O(K · (rows + columns) · r) work and never building ΔW; its
rounding (about 10⁻⁶ of the magnitudes) is far inside the tolerance unless the tensors are
10⁴ times larger than the update they make, and such adapters then fall back to fingerprints.
Any representation of the same update reproduces the numbers up to rounding; two sketches
match when the scales and the values agree within `TOLERANCE` of the larger scale. Each
value of a different update differs by a random ±1 form of ΔW₁ − ΔW₂, of typical size
‖ΔW₁ − ΔW₂‖_F, so two unrelated updates of equal norm match only if all K differences fall
within 1 % at once: a chance below 10⁻⁸ per tensor, and an adapter matches only when every
tensor does.

The probes come from SplitMix64 on the element index, with a stream per probe and side: the
same numbers on every machine and version, since they are part of the recorded format
(`PROBES`). A method whose update also depends on the base (DoRA's norm, Bat's W·B) sketches
the tensors that define it instead, in a space of its own (see the methods); sketches of
different spaces never match. Sketches are rounded to 4 significant digits in bonemerge.json:
about 80 bytes per tensor (18 kB for a LoRA on the seven projections of a 7B Llama).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from bonemerge.errors import shown

if TYPE_CHECKING:
    import numpy as np

# Probes per tensor.
K = 4
# The format of the probes and of `Sketch.to_json`; sketches of another format are not compared.
PROBES = "splitmix64-pm1-k4"
# Two sketches match when they agree within this fraction of the update's norm: above the
# rounding of any representation of one update (a 16-bit cast of both LoRA factors moves ΔW
# by at most 2·2⁻⁹ ≈ 0.4 % of each element, less in a sketch), below any change that makes
# another update (a scale of 1.01, another training step, another adapter).
TOLERANCE = 0.01
_DIGITS = 4
_GOLDEN = 0x9E3779B97F4A7C15
_COLUMNS, _ROWS = 0, 1


@lru_cache(maxsize=8)
def _probes(length: int, side: int) -> np.ndarray:
    """`length` x K float32 ±1 probes: the top bit of SplitMix64 of (stream, index)."""
    import numpy as np

    index = np.arange(length, dtype=np.uint64)[:, None]
    stream = np.arange(K, dtype=np.uint64)[None, :] + np.uint64(side * K + 1)
    z = (stream << np.uint64(32)) + index + np.uint64(1)
    z = z * np.uint64(_GOLDEN)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    signs = 1 - 2 * (z >> np.uint64(63)).astype(np.float32)
    signs.flags.writeable = False
    return signs


def columns(length: int) -> np.ndarray:
    """The K probes xⱼ that multiply a weight of `length` columns (length x K, float32)."""
    return _probes(length, _COLUMNS)


@dataclass(frozen=True)
class Sketch:
    """One part of one tensor's update: its space (`delta` for `W + ΔW`, or a method's own),
    the estimate of its norm, and the K bilinear values."""

    space: str
    scale: float
    values: tuple[float, ...]

    def to_json(self) -> list:
        return [self.space, _rounded(self.scale), *(_rounded(v) for v in self.values)]

    @classmethod
    def from_json(cls, item: object) -> Sketch | None:
        """The sketch `to_json` wrote, or None for anything else."""
        if not (isinstance(item, list) and len(item) == K + 2 and isinstance(item[0], str)):
            return None
        numbers = item[1:]
        if not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in numbers
        ):
            return None
        return cls(item[0], float(numbers[0]), tuple(float(v) for v in numbers[1:]))

    def matches(self, other: Sketch) -> bool:
        """The same update up to rounding (see the module docstring)."""
        if self.space != other.space:
            return False
        largest = max(self.scale, other.scale)
        if largest == 0:
            return True
        spread = math.dist(self.values, other.values)
        return (
            abs(self.scale - other.scale) <= TOLERANCE * largest
            and spread <= TOLERANCE * math.sqrt(K) * largest
        )


def _rounded(value: float) -> float:
    return float(f"{value:.{_DIGITS}g}")


def _make(space: str, scale: float, values: np.ndarray) -> Sketch | None:
    """A sketch, or None when it is not finite (such an adapter is refused before any merge)."""
    import numpy as np

    if not (math.isfinite(scale) and bool(np.isfinite(values).all())):
        return None
    return Sketch(space, scale, tuple(float(v) for v in values))


def of_matrix(space: str, apply: Callable[[np.ndarray], np.ndarray], shape: Sequence[int]) -> Sketch | None:
    """The sketch of an update ΔW of `shape` (rows, columns), given `apply(X) = ΔW·X` for a
    columns x K float32 X."""
    import numpy as np

    rows, cols = shape
    with np.errstate(all="ignore"):
        product = np.asarray(apply(columns(cols)), dtype=np.float64)
        values = (_probes(rows, _ROWS) * product).sum(axis=0)
        return _make(space, float(np.linalg.norm(product)) / math.sqrt(K), values)


def of_vector(space: str, vector: np.ndarray) -> Sketch | None:
    """The sketch of an update that is a vector (a bias delta, a DoRA magnitude): zⱼᵀ·v."""
    import numpy as np

    vector = np.asarray(vector, dtype=np.float64).reshape(-1)
    with np.errstate(all="ignore"):
        return _make(space, float(np.linalg.norm(vector)), _probes(vector.size, _ROWS).T @ vector)


def parts(*sketches: Sketch | None) -> tuple[Sketch, ...] | None:
    """The sketches of the tensors that define one update, or None when one could not be taken."""
    return None if any(s is None for s in sketches) else tuple(s for s in sketches if s is not None)


# An adapter's sketch: for each tensor it changes (by base tensor name), one sketch per part.
AdapterSketch = Mapping[str, tuple[Sketch, ...]]


def to_json(sketch: AdapterSketch) -> dict:
    """The form bonemerge.json records."""
    return {
        "probes": PROBES,
        "tensors": {name: [s.to_json() for s in parts] for name, parts in sketch.items()},
    }


def from_json(item: object) -> AdapterSketch | None:
    """The sketch `to_json` wrote, None when there is none of the current format; raises
    ValueError for a malformed one."""
    if item is None:
        return None
    if not isinstance(item, dict) or not isinstance(item.get("tensors"), dict):
        raise ValueError("its sketch is not an object with tensors")
    if item.get("probes") != PROBES:
        return None
    found: dict[str, tuple[Sketch, ...]] = {}
    for name, parts in item["tensors"].items():
        read = [Sketch.from_json(p) for p in parts] if isinstance(parts, list) and parts else [None]
        if any(s is None for s in read):
            raise ValueError(f"its sketch of {shown(name, quote=False)} is malformed")
        found[name] = tuple(s for s in read if s is not None)
    return found


def _alike(a: tuple[Sketch, ...], b: tuple[Sketch, ...]) -> bool:
    return len(a) == len(b) and all(x.matches(y) for x, y in zip(a, b, strict=True))


def _changes(sketch: AdapterSketch) -> bool:
    return any(s.scale > 0 for parts in sketch.values() for s in parts)


def same_update(a: AdapterSketch, b: AdapterSketch) -> bool:
    """Both change the same tensors the same way; updates that change nothing are not
    recognised (two untrained adapters are not the same adapter)."""
    return a.keys() == b.keys() and _changes(a) and all(_alike(a[n], b[n]) for n in a)


def shared(a: AdapterSketch, b: AdapterSketch) -> list[str]:
    """The tensors both change, and change the same way (an adapter and a filtered copy of it)."""
    return sorted(n for n in a.keys() & b.keys() if _changes({n: a[n]}) and _alike(a[n], b[n]))
