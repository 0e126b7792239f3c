"""Bone, Bat and MiSS (PEFT `BONE` and `MISS`): block-affine adapters.

A weight W is `out x in`; its rows are independent for the default and mini variants and
independent in groups of `r` rows for Bat, which is what lets the engine stream a tensor in
row chunks. Each `RowMaths` works in place on a chunk already converted to the compute dtype
(fp32 or fp64), so the caller rounds exactly once, to the output dtype, at the end.

    default: W'[o, i] = W[o, i] + B[i mod r, o]                 (B is r x out)
    mini:    as default with B[k, o] := B[k, o mod mini_r]      (B is r x mini_r)
    bat:     W'_ac = W_ac (I + B_a) + B_a  on r x r tiles       (B is out/r x r x r)

MiSS is Bone renamed (`.miss_block`, `peft_type: MISS`) plus the mini variant, so one method
serves both; `strip --to` converts between them where the maths allows, and to LoRA through
the LoRA method (`low_rank_tensors`, `low_rank_config`).
`reference_merge` states the same maths on a whole tensor in the plainest form, as the
independent check used by the demo and the tests.

Error bounds (`bonemerge.verification.tolerance`): default / mini, `W + B`, one addition, error
≤ γ₁·(|W| + |B|); Bat, `W + W·B_a + B_a`, an inner product over r terms plus two additions,
error ≤ γ_(r+2)·(|W| + Σₖ|W_ik||B_kj| + |B_ij|), plus half an ulp in the output dtype of the
delta's magnitude, because PEFT rounds the delta to the weight's dtype before adding it; an
input error is carried through (I + B_a): ε·|I + B_a|.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from bonemerge.errors import AdapterError, MergeError, shown
from bonemerge.methods.base import (
    PREFIX,
    About,
    AdapterConfig,
    Block,
    BlockOp,
    BlockSettings,
    Converted,
    KeyClaim,
    Method,
    RankRequest,
    RowMaths,
    Target,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

    from bonemerge.checkpoint import Source
    from bonemerge.output.sketch import Sketch

# Largest condition number of I + B accepted when inverting a Bat block: beyond this, fp32
# inputs carry too few digits for the unmerged weight to mean anything.
MAX_CONDITION = 1e5

SUFFIX = {"BONE": "bone_block", "MISS": "miss_block"}
_TRAINING = re.compile(r"^(?P<module>.+)\.(?P<method>bone|miss)_block\.(?P<name>[^.]+)$")
_MISS_ONLY = ("mini_r", "miss_dropout")


@dataclass(frozen=True)
class BoneSettings(BlockSettings):
    """What a Bone/MiSS config says about the maths: the variant and the block sizes."""

    variant: str
    r: int
    mini_r: int | None

    def digest(self) -> str:
        # The variant alone decides the maths (r and mini_r follow from the block's shape); kept
        # this way so that resume fingerprints do not depend on how settings are spelled.
        return self.variant


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


class AdditiveBlock(RowMaths):
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


class BatBlock(RowMaths):
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
        import torch

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
        import torch

        if self._inverse is None:
            self._inverse = torch.linalg.inv(invertible(self.block)).to(self.block.dtype)
        return self._inverse

    def unmerge(self, work: torch.Tensor, row0: int) -> None:
        a0, k = row0 // self.r, work.shape[0] // self.r
        b = self.block[a0 : a0 + k]
        work.view(k, self.r, self.columns, self.r).sub_(b.unsqueeze(2))
        tiles = self._tiles(work)
        tiles.copy_(self._product(tiles, self.inverse()[a0 : a0 + k]))


def invertible(block: torch.Tensor) -> torch.Tensor:
    """I + B_a for every a, in fp64, refused when one is singular or ill-conditioned."""
    import torch

    plus = block.double() + torch.eye(block.shape[-1], dtype=torch.float64, device=block.device)
    condition = torch.linalg.cond(plus)
    worst = int(torch.argmax(torch.nan_to_num(condition, nan=math.inf)).item())
    if not torch.isfinite(condition[worst]) or condition[worst] > MAX_CONDITION:
        raise MergeError(
            f"I + B is singular or ill-conditioned for Bat block {worst} "
            f"(condition number {condition[worst].item():.3g}), so the merge cannot be "
            "undone reliably"
        )
    return plus


def expand_mini(block: torch.Tensor, out_features: int) -> torch.Tensor:
    """A mini block (r x mini_r) repeated along the outputs to the default shape (r x out)."""
    return block.repeat(1, out_features // block.shape[1])


def prepare_block(
    variant: str,
    block: torch.Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    inverse: bool = False,
) -> RowMaths:
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
    import torch

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


def _implied_variant(settings: BoneSettings, key: str, shape: tuple[int, ...], where: Path) -> None:
    """The variant a block's shape implies must be the one its config declares."""
    r, mini_r = settings.r, settings.mini_r
    if len(shape) == 3:
        implied = "bat"
        fits = shape[1] == shape[2] == r
    elif len(shape) == 2:
        implied = settings.variant if settings.variant in ("default", "mini") else "default"
        fits = shape[0] == r and (implied != "mini" or shape[1] == mini_r)
    else:
        raise AdapterError(
            f"block {key} in {where} has shape {list(shape)}; Bone/MiSS blocks are 2-D or 3-D."
        )
    if implied != settings.variant:
        raise AdapterError(
            f"block {key} in {where} has the {implied} shape {list(shape)} but adapter_config.json "
            f"declares the {settings.variant} variant; the config and weights disagree."
        )
    if not fits:
        expected = {
            "bat": f"[out/{r}, {r}, {r}]",
            "default": f"[{r}, out]",
            "mini": f"[{r}, {mini_r}]",
        }[implied]
        raise AdapterError(
            f"block {key} in {where} has shape {list(shape)}, but r={r}"
            + (f" and mini_r={mini_r}" if implied == "mini" else "")
            + f" in adapter_config.json call for {expected}; the config and weights disagree."
        )


class BoneMethod(Method):
    name = "Bone/MiSS"
    kind_names: ClassVar[dict[str, str]] = {"BONE": "Bone", "MISS": "MiSS"}
    variants = ("Bone", "Bat", "MiSS")
    conversion_help = (
        "Bone to MiSS or back (not MiSS mini), or Bone/MiSS to LoRA "
        "(exact for default and mini; Bat needs --rank)"
    )

    def about(self, config: AdapterConfig) -> About:
        settings: BoneSettings = config.settings
        name = self.kind_names[config.peft_type]
        if config.peft_type == "BONE" and settings.variant == "bat":
            name = "Bat"
        elif settings.variant != "default":
            name += f" {settings.variant}"
        sizes = f"r={settings.r}" + (f", mini_r={settings.mini_r}" if settings.variant == "mini" else "")
        tag = "miss" if config.peft_type == "MISS" else "bat" if settings.variant == "bat" else "bone"
        return About(
            f"{name} ({sizes})",
            tag,
            {"variant": settings.variant, "r": settings.r, "mini_r": settings.mini_r},
        )

    def read_config(self, peft_type: str, raw: dict, path: Path) -> BoneSettings:
        r = raw.get("r", 64)
        if not _positive_int(r):
            raise AdapterError(f"{path} has r={shown(r)}; r must be a positive integer.")
        init = raw.get("init_weights", True)
        if init is True or init is False:
            variant = "default"
        elif init in ("bat", "mini"):
            variant = init
        else:
            raise AdapterError(
                f"{path} has init_weights={shown(init)}, which is not a {peft_type} variant "
                '(expected true, false, "bat" or "mini").'
            )
        if variant == "mini" and peft_type == "BONE":
            raise AdapterError(
                f'{path} is a Bone adapter with init_weights "mini", which only MiSS has; '
                "fix peft_type or init_weights."
            )
        mini_r = None
        if variant == "mini":
            mini_r = raw.get("mini_r", 1)
            if not _positive_int(mini_r):
                raise AdapterError(f"{path} has mini_r={shown(mini_r)}; mini_r must be a positive integer.")
        return BoneSettings(variant, r, mini_r)

    def claim(self, name: str, config: AdapterConfig) -> KeyClaim | None:
        for peft_type, suffix in SUFFIX.items():
            if name.endswith("." + suffix):
                if peft_type != config.peft_type:
                    raise AdapterError(
                        f"holds {PREFIX}{name}, a {suffix} of the other method, but its config says "
                        f"{config.peft_type}; the config and weights belong to different adapters."
                    )
                return KeyClaim(name[: -len(suffix) - 1], "block")
        return None

    def claim_training(self, name: str) -> KeyClaim | None:
        found = _TRAINING.match(name)
        if not found:
            return None
        return KeyClaim(found["module"], "block", found["name"], found["method"].upper())

    def make_block(
        self, module: str, parts: dict[str, Source], keys: dict[str, str], config: AdapterConfig, where: Path
    ) -> Block:
        _implied_variant(config.settings, keys["block"], tuple(parts["block"].shape), where)
        return Block(module, self, parts, keys, config.settings)

    def infer_config(
        self,
        peft_type: str,
        blocks: list[tuple[str, dict[str, Source]]],
        base_shapes: dict,
        saved: list[str],
        where: Path,
    ) -> AdapterConfig:
        found = set()
        for module, parts in blocks:
            shape = tuple(parts["block"].shape)
            weight = base_shapes.get(module + ".weight")
            out_features = weight[0] if weight else None
            if len(shape) == 3:
                found.add(("bat", shape[-1], None))
            elif len(shape) == 2 and shape[1] == out_features:
                found.add(("default", shape[0], None))
            elif len(shape) == 2:
                found.add(("mini", shape[0], shape[1]))
            else:
                raise AdapterError(
                    f"block {PREFIX}{module}.{SUFFIX[peft_type]} in {where} has shape {list(shape)}; "
                    "Bone/MiSS blocks are 2-D or 3-D."
                )
        if len(found) != 1:
            raise AdapterError(
                f"the blocks in {where} do not share one variant and r ({sorted(map(str, found))}); "
                "put the adapter's adapter_config.json next to the checkpoint."
            )
        variant, r, mini_r = found.pop()
        raw = {
            "peft_type": peft_type,
            "r": r,
            "init_weights": {"default": True, "bat": "bat", "mini": "mini"}[variant],
            "target_modules": sorted({m.rsplit(".", 1)[-1] for m, _ in blocks}),
            "modules_to_save": sorted({m.rsplit(".", 1)[0] for m in saved}) or None,
            "bias": "none",
            "inference_mode": True,
            "base_model_name_or_path": None,
            "task_type": None,
        }
        if peft_type == "MISS":
            raw |= {"mini_r": mini_r or 1, "miss_dropout": 0.0}
        return AdapterConfig(self, peft_type, BoneSettings(variant, r, mini_r), raw)

    def check_target(
        self, block: Block, target: Target, name: str, shape: tuple[int, ...], where: str, inverse: bool
    ) -> None:
        settings: BoneSettings = block.params
        if len(shape) != 2:
            raise AdapterError(
                f"{where} targets {name} of shape {list(shape)}, which is not a Linear weight."
            )
        out_features, in_features = shape
        b = tuple(block.parts["block"].shape)
        if settings.variant == "bat":
            r = settings.r
            if in_features % r or out_features % r:
                raise AdapterError(
                    f"{where} is a Bat block with r={r}, but {name} is {out_features} x "
                    f"{in_features}, which does not split into {r} x {r} tiles."
                )
            expected: tuple[int, ...] = (out_features // r, r, r)
        elif settings.variant == "mini":
            if out_features % b[1]:
                raise AdapterError(
                    f"{where} has mini_r={b[1]}, which does not divide the {out_features} outputs of {name}."
                )
            expected = b
        else:
            expected = (settings.r, out_features)
        if b != expected:
            raise AdapterError(
                f"{where} has shape {list(b)} but {name} of shape {list(shape)} needs {list(expected)}; "
                "is this adapter for this base model?"
            )

    def row_multiple(self, op: BlockOp) -> int:
        return op.block.params.r if op.block.params.variant == "bat" else 1

    def prepare(
        self,
        op: BlockOp,
        load: Callable[[str], torch.Tensor],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device | str,
        precision: str,
    ) -> RowMaths:
        return prepare_block(op.block.params.variant, load("block"), shape, dtype, device, op.inverse)

    def check_inverse(self, block: Block, load: Callable[[str], torch.Tensor]) -> None:
        # The condition numbers only: the engine computes the inverses it uses when it gets there.
        if block.params.variant == "bat":
            invertible(load("block"))

    def product_terms(self, op: BlockOp) -> int:
        return op.block.params.r if op.block.params.variant == "bat" else 0

    def rounds_delta(self, op: BlockOp) -> bool:
        return op.block.params.variant == "bat"

    def sketch(
        self, op: BlockOp, load: Callable[[str], np.ndarray], shape: tuple[int, ...]
    ) -> tuple[Sketch, ...] | None:
        """Default and mini: ΔW[o, i] = B[i mod r, o], so ΔW·X = Bᵀ·(X folded onto its r
        columns), the same numbers as the LoRA `strip --to lora` writes. Bat's ΔW = W·B + B
        depends on the base; sketching it would read every targeted weight before the merge
        starts, so a Bat update is identified by its block B alone, in a space of its own (a
        Bat adapter in another dtype or as MiSS matches; its approximate LoRA does not)."""
        import numpy as np

        from bonemerge.output.sketch import of_matrix, parts

        settings: BoneSettings = op.block.params
        block = load("block")
        if settings.variant == "bat":
            flat = block.reshape(-1, block.shape[-1])
            return parts(of_matrix("bat", lambda x: flat @ x, flat.shape))
        if settings.variant == "mini":
            block = np.tile(block, (1, shape[0] // block.shape[1]))
        r = block.shape[0]

        def apply(x: np.ndarray) -> np.ndarray:
            groups = -(-x.shape[0] // r)
            padded = np.concatenate([x, np.zeros((groups * r - x.shape[0], x.shape[1]), x.dtype)])
            return block.T @ padded.reshape(groups, r, x.shape[1]).sum(axis=0)

        return parts(of_matrix("delta", apply, shape))

    def file_keys(self, block: Block, peft_type: str) -> dict[str, str]:
        return {"block": f"{PREFIX}{block.module}.{SUFFIX[peft_type]}"}

    def record_name(self, module: str, part: str) -> str:
        # a block is one tensor: fingerprints name it by its module alone
        return module

    def conversions(self, config: AdapterConfig) -> dict[str, str]:
        found = {"miss": "MISS", "lora": "LORA"}
        if config.settings.variant != "mini":
            found["bone"] = "BONE"
        return found

    def needs_base(self, config: AdapterConfig, peft_type: str, filtered: bool) -> bool:
        # A block does not know the width of its weight, which LoRA's A must span.
        return peft_type == "LORA"

    def convert(
        self,
        block: Block,
        peft_type: str,
        *,
        base: Source | None,
        load: Callable[[Source], torch.Tensor],
        rank: RankRequest,
    ) -> Converted:
        if peft_type != "LORA":
            return super().convert(block, peft_type, base=base, load=load, rank=rank)
        assert base is not None
        settings: BoneSettings = block.params
        if settings.variant == "bat":
            return _bat_to_lora(block, base, load, rank)
        if rank.given:
            raise AdapterError(
                f"{block.key} is a {settings.variant} block, which converts to LoRA exactly at its own "
                "rank; --rank and --max-error apply to Bat adapters only."
            )
        return _exact_lora(block, tuple(base.shape), load)

    def converted_config(self, raw: dict, peft_type: str, converted: Mapping[str, Converted]) -> dict:
        if peft_type == "LORA":
            return _lora().low_rank_config(raw, {module: c.rank or 0 for module, c in converted.items()})
        raw = dict(raw, peft_type=peft_type)
        if peft_type == "BONE":
            for key in _MISS_ONLY:
                raw.pop(key, None)
        return raw

    def conversion_names(self) -> tuple[str, ...]:
        return ("miss", "bone", "lora")

    def refuse_conversion(self, config: AdapterConfig, name: str, where: Path) -> str:
        if name == "bone" and config.settings.variant == "mini":
            return f"{where} is a MiSS mini adapter, which Bone cannot express; it stays MiSS."
        return super().refuse_conversion(config, name, where)


def _lora() -> Method:
    """The method Bone/MiSS converts to with `--to lora`, from the registry."""
    from bonemerge.methods import method_for

    found = method_for("LORA")
    assert found is not None
    return found


def _selection(r: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """S (r x width): S[k, i] = 1 where i mod r == k, so (X @ S)[:, i] = X[:, i mod r]."""
    import torch

    return (torch.arange(width) % r == torch.arange(r).unsqueeze(1)).to(dtype)


def _exact_lora(block: Block, shape: tuple[int, ...], load: Callable[[Source], torch.Tensor]) -> Converted:
    """Default and mini as LoRA at scale 1, exactly: ΔW[o, i] = B[i mod r, o mod mini_r] is a
    product of one-hot selections and B, so every element of B @ A is a single term."""
    import torch

    from bonemerge.checkpoint import dtypes

    settings: BoneSettings = block.params
    source = block.parts["block"]
    out_features, in_features = shape
    r, dtype = settings.r, source.dtype
    mini_r = settings.mini_r if settings.variant == "mini" else None

    def values() -> torch.Tensor:
        return load(source)

    if mini_r is not None and mini_r < r:
        # rank mini_r: B = P (outputs -> their mini_r column), A[j, i] = B[i mod r, j]
        rank = mini_r

        def a() -> torch.Tensor:
            return values()[torch.arange(in_features) % r, :].t().contiguous()

        def b() -> torch.Tensor:
            return _selection(mini_r, out_features, dtypes.to_torch(dtype)).t().contiguous()

    else:
        rank = r

        def a() -> torch.Tensor:
            return _selection(r, in_features, dtypes.to_torch(dtype))

        def b() -> torch.Tensor:
            block_values = values()
            if mini_r is not None:
                block_values = block_values[:, torch.arange(out_features) % mini_r]
            return block_values.t().contiguous()

    return Converted(_lora().low_rank_tensors(block, dtype, rank, shape, a, b), rank=rank)


def _bat_to_lora(
    block: Block, base: Source, load: Callable[[Source], torch.Tensor], rank: RankRequest
) -> Converted:
    """Bat's ΔW depends on the base, and has full rank in general: keep its best rank-K
    approximation (`lowrank`). The eigenvalues are computed now, to choose K and know the
    error; the factors (one eigendecomposition) when the engine writes them."""
    from bonemerge.methods.lowrank import BatUpdate, Spectrum, check_budget, compact_rank

    if not rank.given:
        raise AdapterError(
            f"{block.key} is a Bat block, whose update depends on the base and is approximated as "
            "LoRA; pass --rank K, or --rank auto with --max-error E."
        )
    shape = tuple(base.shape)
    spectrum = Spectrum.of(BatUpdate(load(base), load(block.parts["block"])), block.key, base.name)
    k = spectrum.rank(rank)
    check_budget(block.key, shape, base.nbytes, k)
    cache: dict[str, torch.Tensor] = {}

    def factor(which: str) -> Callable[[], torch.Tensor]:
        def compute() -> torch.Tensor:
            if not cache:
                update = BatUpdate(load(base), load(block.parts["block"]))
                cache["A"], cache["B"] = update.factors(k)
            return cache.pop(which)

        return compute

    return Converted(
        _lora().low_rank_tensors(block, "F32", k, shape, factor("A"), factor("B")),
        rank=k,
        discarded=spectrum.discarded(k),
        total=spectrum.total,
        full_rank=min(shape),
        compact_error=spectrum.error(compact_rank(shape)),
    )


BONE = BoneMethod()
