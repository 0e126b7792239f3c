"""Where a module's fused expert parameter lies in a checkpoint.

transformers v5 gives MoE layers one 3-D parameter per projection (`mlp.experts.gate_up_proj`
[E, 2I, H], `mlp.experts.down_proj` [E, H, I]), but most checkpoints on disk, and the ones
`save_pretrained` writes, keep one 2-D tensor per expert and projection, which transformers
fuses at load time (`conversion_mapping.py`: `MergeModulelist(dim=0)` stacks the experts,
`Concatenate(dim=1)` puts gate rows before up rows). A fused parameter therefore lies either
as itself (gpt-oss) or as slices: expert e's rows [a, b) of dimension 1 are one per-expert
tensor. `RULES` and `RENAMES` state transformers' rules (a test checks them against every
expert conversion of the installed transformers); `locate` applies them to a checkpoint's
tensor names. Reading them from transformers at run time would import it (seconds) for a
table of a few lines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bonemerge.errors import AdapterError

__all__ = ["RENAMES", "RULES", "ExpertRule", "Piece", "locate", "present"]

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ExpertRule:
    """`<module>.<fused>` [E, d1, d2] is, per expert e, `<module>.{e}.<part>.weight` for each
    of `parts`, stacked along d1 in that order (transformers' `MergeModulelist(dim=0)`, then
    `Concatenate(dim=1)` when there are two parts)."""

    fused: str
    parts: tuple[str, ...]


# transformers' `conversion_mapping.py` (5.x): gate/up/down for Qwen2/3-MoE, DeepSeek-V2/V3,
# OLMoE, GLM-4-MoE, Ernie, Jamba...; w1/w3/w2 for Mixtral, PhiMoE, MiniMax, LFM2-MoE,
# DeepSeek-V4, Kimi; fc1/fc3/fc2 for dots.ocr's vision experts; up/down for Nemotron-H.
RULES: tuple[ExpertRule, ...] = (
    ExpertRule("gate_up_proj", ("gate_proj", "up_proj")),
    ExpertRule("down_proj", ("down_proj",)),
    ExpertRule("up_proj", ("up_proj",)),
    ExpertRule("gate_up_proj", ("w1", "w3")),
    ExpertRule("down_proj", ("w2",)),
    ExpertRule("gate_up_proj", ("fc1", "fc3")),
    ExpertRule("down_proj", ("fc2",)),
)
# transformers' renamings of MoE module paths, as (on disk, in the model): Mixtral's and
# MiniMax's block_sparse_moe, and the feed_forward/ffn of the families that rename them.
RENAMES: tuple[tuple[str, str], ...] = (
    (".block_sparse_moe.", ".mlp."),
    (".feed_forward.", ".mlp."),
    (".ffn.", ".mlp."),
)


def _disk_modules(module: str) -> list[str]:
    """The paths the model's `module` may have on disk: itself, and each renaming undone."""
    found = [module]
    dotted = "." + module + "."
    for disk, model in RENAMES:
        if model in dotted:
            found.append(dotted.replace(model, disk, 1)[1:-1])
    return found


@dataclass(frozen=True)
class Piece:
    """One on-disk tensor holding part of a fused parameter: `expert` None means the whole
    fused tensor; otherwise rows [start, stop) of dimension 1 of that expert."""

    name: str
    expert: int | None
    start: int
    stop: int


def present(param: str, shape_of: Callable[[str], Shape | None]) -> bool:
    """Whether the checkpoint holds the model's parameter `param`, fused or as expert 0's tensors."""
    module, _, leaf = param.rpartition(".")
    return shape_of(param) is not None or any(
        shape_of(f"{disk}.0.{rule.parts[0]}.weight") is not None
        for rule in RULES
        if rule.fused == leaf
        for disk in _disk_modules(module)
    )


def locate(
    param: str, experts: int, shape_of: Callable[[str], Shape | None], where: str
) -> list[Piece] | None:
    """The tensors that hold the model's parameter `param` (`model.layers.0.mlp.experts.gate_up_proj`),
    which has `experts` experts: the fused tensor itself if the checkpoint has it, else the
    per-expert tensors a rule finds; None if neither is there. Every expert must be present and
    all of an expert's tensors must have the same columns."""
    module, _, leaf = param.rpartition(".")
    fused = shape_of(param)
    found: list[list[Piece]] = []
    for rule in RULES:
        for disk in _disk_modules(module) if rule.fused == leaf else ():
            if shape_of(f"{disk}.0.{rule.parts[0]}.weight") is not None:
                found.append(_pieces(rule, disk, experts, shape_of, where))
    if fused is not None:
        found.insert(0, [Piece(param, None, 0, fused[1] if len(fused) == 3 else fused[0])])
    if len(found) > 1:
        raise AdapterError(
            f"{where} holds {param} twice, as {found[0][0].name} and as {found[1][0].name}; "
            "pass a checkpoint with one copy of the experts."
        )
    return found[0] if found else None


def _pieces(
    rule: ExpertRule, disk: str, experts: int, shape_of: Callable[[str], Shape | None], where: str
) -> list[Piece]:
    pieces = []
    for expert in range(experts):
        start = 0
        columns = None
        for part in rule.parts:
            name = f"{disk}.{expert}.{part}.weight"
            shape = shape_of(name)
            if shape is None or len(shape) != 2 or columns not in (None, shape[1]):
                what = "lacks" if shape is None else f"has {list(shape)} for"
                raise AdapterError(
                    f"{where} {what} {name}, one of the {experts} experts' {'/'.join(rule.parts)} "
                    "weights the adapter needs; is this adapter for this model?"
                )
            columns = shape[1]
            pieces.append(Piece(name, expert, start, start + shape[0]))
            start += shape[0]
    extra = f"{disk}.{experts}.{rule.parts[0]}.weight"
    if shape_of(extra) is not None:
        raise AdapterError(
            f"{where} holds {extra}, more experts than the {experts} the adapter was trained with; "
            "is this adapter for this model?"
        )
    return pieces
