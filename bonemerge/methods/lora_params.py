"""LoRA on raw parameters (PEFT `target_parameters`, its `lora.ParamWrapper`): fused MoE experts.

PEFT reads a parameter of shape [E, d1, d2] as E experts with `in_features` d1 and
`out_features` d2; `lora_A` [E·r, d1] is (E, r, d1) and `lora_B` [d2, r·E] is (d2, r, E) (the
expert index varies fastest), and `ΔW = einsum("o r e, e r i -> e i o", B, A) · s`, laid on the
parameter as it is. So row i of expert e is `s · A_eᵀ[i] @ B_eᵀ`: a LoRA per expert, whose
rows are the rows of dimension 1. With one expert (a 2-D parameter) PEFT uses Linear's maths,
`s · B @ A` laid as is. PEFT then casts ΔW to the parameter's dtype before adding it (two
roundings for 16-bit weights); bonemerge adds the fp32 ΔW and rounds once, as for embeddings.

Keys: the adapter file names the module, not the parameter. PEFT wraps one parameter per
`ParamWrapper` and nests them (`experts.lora_A`, `experts.base_layer.lora_A`, ...) in the
module's own parameter order, which a checkpoint does not record; so each block is placed on
the one parameter among the config's `target_parameters` whose shape fits it, and a block
that fits two is refused rather than guessed.

Where the parameter lies on disk is `checkpoint.experts`' business: as itself, or as one
tensor per expert and projection. Either way each on-disk tensor gets the rows of ΔW it
holds, one expert at a time; the fused ΔW never exists.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bonemerge.checkpoint.experts import Piece, locate, present
from bonemerge.errors import AdapterError
from bonemerge.methods.base import Block, BlockSettings, RowMaths, Target

if TYPE_CHECKING:
    import numpy as np
    import torch

    from bonemerge.methods.lora import DeltaRows, LoraSettings

_WRAPPER = re.compile(r"(?:\.base_layer)+$")
# MXFP4 experts: the parameter's codes (`bonemerge.codecs.mxfp4`)
PACKED = "_blocks"


@dataclass(frozen=True)
class ParamBlock(BlockSettings):
    """A `target_parameters` block: the parameter names it may be (`candidates`), the module
    path without PEFT's wrappers, and the config it takes its rank and scale from."""

    module: str
    candidates: tuple[str, ...]
    settings: LoraSettings
    linear: Any = None  # LoraParams of the block read as a Linear LoRA, where it can be one


@dataclass(frozen=True)
class ParamTarget(Target):
    """The rows of a parameter one on-disk tensor holds: `expert` None for the whole
    parameter (every expert), else rows [start, stop) of that expert's dimension 1; `rows` is
    dimension 1 of the parameter, `r` and `scale` PEFT's for it."""

    parameter: str = ""
    experts: int = 1
    expert: int | None = None
    start: int = 0
    stop: int = 0
    rows: int = 0
    r: int = 0
    scale: float = 1.0


def parameter_module(module: str, settings: LoraSettings) -> ParamBlock | None:
    """The `target_parameters` block `module` is, if the config targets a parameter of it
    (PEFT's rule: `<module>.<name>` equals a target or ends with `.` + target)."""
    if not settings.target_parameters:
        return None
    plain = _WRAPPER.sub("", module)
    candidates = []
    for target in settings.target_parameters:
        owner, _, leaf = target.rpartition(".")
        if not owner or plain == owner or plain.endswith("." + owner):
            candidates.append(leaf)
    if not candidates:
        return None
    return ParamBlock(plain, tuple(dict.fromkeys(candidates)), settings)


def rank_and_scale(settings: LoraSettings, parameter: str) -> tuple[int, float]:
    """PEFT's r and scaling for a parameter: its patterns match `<module>.<parameter name>`."""
    from bonemerge.methods.lora import _pattern_key

    r_key = _pattern_key(settings.rank_pattern, parameter)
    alpha_key = _pattern_key(settings.alpha_pattern, parameter)
    r = dict(settings.rank_pattern)[r_key] if r_key is not None else settings.r
    alpha = dict(settings.alpha_pattern)[alpha_key] if alpha_key is not None else settings.alpha
    return r, (alpha / math.sqrt(r) if settings.rslora else alpha / r)


def _fits(block: Block, leaf: str, module: str, shape_of, where: str) -> list[tuple[str, Target]] | None:
    """The (tensor, target) pairs of `block` as parameter `leaf`, or None if it does not fit."""
    params: ParamBlock = block.params
    parameter = f"{module}.{leaf}"
    r, scale = rank_and_scale(params.settings, f"{params.module}.{leaf}")
    (a_rows, a_cols), (b_rows, b_cols) = block.parts["A"].shape, block.parts["B"].shape
    if a_rows % r or b_cols != a_rows:
        return None
    experts = a_rows // r
    packed = shape_of(parameter + PACKED) if shape_of(parameter) is None and experts > 1 else None
    if packed is not None:
        # MXFP4 (gpt-oss): each expert stored transposed, [E, out, in/32, 16] for [E, in, out]
        if tuple(packed) != (experts, b_rows, a_cols // 32, 16) or a_cols % 32:
            return None
        label = f"{leaf} (MXFP4, each expert transposed)"
        target = ParamTarget(label, "weight", parameter, experts, None, 0, b_rows, b_rows, r, scale)
        return [(parameter + PACKED, target)]
    pieces = locate(parameter, experts, shape_of, where)
    if pieces is None:
        return None
    # PEFT: one expert is Linear's B @ A (rows = out), more are A_eᵀ B_eᵀ (rows = in).
    rows, cols = (b_rows, a_cols) if experts == 1 else (a_cols, b_rows)
    if pieces[0].expert is None:
        shape = tuple(shape_of(parameter))
        wanted = [(experts, a_cols, b_rows)]
        if experts == 1:
            wanted = [(rows, cols)] + ([(1, rows, cols)] if rows == cols else [])
        if shape not in wanted:
            return None
    elif any(p.stop > rows or shape_of(p.name)[1] != cols for p in pieces) or pieces[-1].stop != rows:
        return None

    def target(piece: Piece) -> ParamTarget:
        label = (
            leaf
            if piece.expert is None
            else f"{leaf} (expert {piece.expert}, rows {piece.start}-{piece.stop - 1})"
        )
        return ParamTarget(
            label, "weight", parameter, experts, piece.expert, piece.start, piece.stop, rows, r, scale
        )

    return [(piece.name, target(piece)) for piece in pieces]


def targets_a_parameter(block: Block, module: str, shape_of: Callable[[str], tuple[int, ...] | None]) -> bool:
    """Whether the base holds one of the parameters the block may be (fused, per expert or
    MXFP4): PEFT wraps a module's parameter only if the module has it."""
    params: ParamBlock = block.params
    plain = _WRAPPER.sub("", module)
    return any(
        present(f"{plain}.{leaf}", shape_of) or shape_of(f"{plain}.{leaf}{PACKED}") is not None
        for leaf in params.candidates
    )


def place(block: Block, module: str, shape_of: Callable[[str], tuple[int, ...] | None], where: str):
    """Every on-disk tensor `block` changes, with the rows of its parameter each holds."""
    params: ParamBlock = block.params
    plain = _WRAPPER.sub("", module)
    fits = {}
    for leaf in params.candidates:
        found = _fits(block, leaf, plain, shape_of, where)
        if found is not None:
            fits[leaf] = found
    shapes = f"lora_A {list(block.parts['A'].shape)} and lora_B {list(block.parts['B'].shape)}"
    if len(fits) > 1:
        raise AdapterError(
            f"{where} fits the parameters {', '.join(fits)} of {plain} alike ({shapes}); PEFT names "
            "the block by its module only, so which one it trained cannot be told from the files."
        )
    if not fits:
        listed = ", ".join(f"{plain}.{leaf}" for leaf in params.candidates)
        raise AdapterError(
            f"{where} has {shapes}, which fit none of the parameters target_parameters gives it "
            f"({listed}) as fused tensors or per-expert weights in the base; is this adapter for this model?"
        )
    return next(iter(fits.values()))


def check_piece(target: ParamTarget, name: str, shape: tuple[int, ...], where: str) -> None:
    """The tensor must still have the rows and columns it was placed with (a later adapter may
    have replaced it with a tensor of another shape)."""
    rows = target.stop - target.start if target.expert is not None else None
    if rows is not None and (len(shape) != 2 or shape[0] != rows):
        raise AdapterError(
            f"{where} needs {name} to have {rows} rows of expert {target.expert}, but it has shape "
            f"{list(shape)}; is this adapter for this model?"
        )


class ExpertRows(RowMaths):
    """Rows of one on-disk tensor of a parameter: each expert's rows get that expert's LoRA.

    A fused [E, d1, d2] tensor streams as E·d1 rows of d2 (row g is expert g // d1's row
    g % d1); a per-expert tensor holds rows [start, stop) of one expert."""

    def __init__(self, experts: dict[int, DeltaRows], rows: int, expert: int | None, start: int) -> None:
        self.experts = experts
        self.rows = rows
        self.expert = expert
        self.start = start

    def _apply(self, work: torch.Tensor, row0: int, inverse: bool) -> None:
        if self.expert is not None:
            delta = self.experts[self.expert]
            (delta.unmerge if inverse else delta.merge)(work, self.start + row0)
            return
        done = 0
        while done < work.shape[0]:
            expert, row = divmod(row0 + done, self.rows)
            take = min(work.shape[0] - done, self.rows - row)
            delta = self.experts[expert]
            (delta.unmerge if inverse else delta.merge)(work[done : done + take], row)
            done += take

    def merge(self, work: torch.Tensor, row0: int) -> None:
        self._apply(work, row0, False)

    def unmerge(self, work: torch.Tensor, row0: int) -> None:
        self._apply(work, row0, True)


def expert_rows(
    target: ParamTarget,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    dtype: torch.dtype,
    device: torch.device | str,
    shape: tuple[int, ...] | None = None,
) -> ExpertRows:
    """The row maths of `target` from the whole lora_A and lora_B, keeping only the experts
    its tensor holds (sliced before they are converted to `dtype` on `device`: a per-expert
    tensor costs its expert's share of the adapter, not all of it). The tensor's `shape` says
    its layout: MXFP4 blocks [E, out, in/32, 16] hold each expert transposed, so their rows
    get `s · B_e A_e` (rows = out); the module's [E, in, out] (fused, or dequantized from
    MXFP4) gets `s · A_eᵀ B_eᵀ`."""
    from bonemerge.methods.lora import DeltaRows

    def ready(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype)

    if target.experts == 1:
        return ExpertRows(
            {0: DeltaRows(ready(b), ready(a), scale, dtype)}, target.rows, target.expert, target.start
        )
    r, e = target.r, target.experts
    wanted = range(e) if target.expert is None else (target.expert,)
    packed = shape is not None and len(shape) == 4
    scratch = threading.local()  # one product buffer per thread for all experts, not one each
    deltas = {}
    for expert in wanted:
        left = a[expert * r : (expert + 1) * r].t()  # (d1, r): A_eᵀ
        right = b[:, expert::e].t()  # (r, d2): B_eᵀ, whose rank index runs over columns r·E + e
        if packed:
            left, right = right.t(), left.t()
        deltas[expert] = DeltaRows(ready(left), ready(right), scale, dtype, scratch=scratch)
    rows = shape[1] if target.expert is None and shape is not None else target.rows
    return ExpertRows(deltas, rows, target.expert, target.start)


def piece_product(
    target: ParamTarget, a: np.ndarray, b: np.ndarray, packed: bool = False
) -> Callable[[np.ndarray], np.ndarray]:
    """`X ↦ ΔW·X` for the rows of the parameter that `target`'s tensor holds, in the order it
    streams them (the experts and rows `expert_rows` merges), from numpy lora_A and lora_B:
    what a history sketch needs, without building ΔW. `packed`: MXFP4 blocks, whose rows are
    each expert's ΔW transposed (`B_e A_e`)."""
    import numpy as np

    r, e = target.r, target.experts
    wanted = range(e) if target.expert is None else (target.expert,)
    rows = slice(None) if target.expert is None else slice(target.start, target.stop)

    def factors(expert: int) -> tuple[np.ndarray, np.ndarray]:
        if e == 1:
            return b, a  # Linear's B @ A
        left, right = a[expert * r : (expert + 1) * r].T, b[:, expert::e].T  # A_eᵀ, B_eᵀ
        return (right.T, left.T) if packed else (left, right)

    def apply(x: np.ndarray) -> np.ndarray:
        found = []
        for expert in wanted:
            left, right = factors(expert)
            found.append(left[rows] @ (right @ x))
        return np.concatenate(found) * target.scale

    return apply
