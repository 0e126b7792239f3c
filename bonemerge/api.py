"""The public Python API: each function runs one command end to end and returns a report.

The order inside each command is the safety contract: open and validate every input, plan,
check adapter blocks and free space, and only then start the long I/O into a staging folder
that becomes the output in one rename when everything has been written and fsynced.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bonemerge.adapters import Adapter, load_adapter
from bonemerge.checkpoint import Checkpoint, MemoryTensor, RangeReader, dtypes, layout, open_checkpoint
from bonemerge.errors import AdapterError, BonemergeError
from bonemerge.output import Staging, check_free_space, check_output

PRECISIONS = ("auto", "fp32", "fp64")
DTYPES = ("auto", "bfloat16", "float16", "float32")

PathLike = str | os.PathLike[str]


@dataclass
class MergeReport:
    """What a merge did; `bonemerge merge --json` prints exactly this."""

    output: str
    base: str
    adapters: list[str]
    tensors_merged: int
    tensors_copied: int
    tensors_converted: int
    bytes_written: int
    seconds: float
    files: list[str]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_dtype(dtype: str) -> str | None:
    """`auto` -> None (keep each tensor's dtype); `bfloat16` -> `BF16`."""
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise BonemergeError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    return dtypes.BY_TORCH_NAME[dtype]


def check_blocks_finite(adapters: Sequence[Adapter]) -> None:
    """Refuse NaN/Inf in any block before the output is even created."""
    import torch

    with RangeReader() as reader:
        for adapter in adapters:
            for block in adapter.blocks:
                source = block.tensor
                if isinstance(source, MemoryTensor):
                    values = source.tensor
                else:
                    raw = reader.read(source.path, source.offset, source.nbytes)
                    values = (
                        torch.frombuffer(raw, dtype=dtypes.to_torch(source.dtype)) if raw else torch.empty(0)
                    )
                if not torch.isfinite(values).all():
                    raise AdapterError(
                        f"block {block.key} of {adapter.root} holds NaN or Inf values; the adapter "
                        "is broken (its training diverged), nothing was written."
                    )


def _inputs(checkpoint: Checkpoint, adapters: Sequence[Adapter]) -> list[Path]:
    base = checkpoint.root if checkpoint.is_folder else checkpoint.shards[0].path
    return [base, *(a.root for a in adapters)]


def merge(
    base: PathLike,
    adapters: Sequence[PathLike],
    output: PathLike,
    *,
    dtype: str = "auto",
    max_shard_size: str | int | None = None,
    safe_merge: bool = True,
    device: str = "cpu",
    precision: str = "auto",
    overwrite: bool = False,
    progress: bool = False,
    command: str | None = None,
) -> MergeReport:
    """Merge `adapters`, in order, into the model at `base`, writing a new model at `output`."""
    from bonemerge import companions, modelcard
    from bonemerge.engine import EngineOptions, run_plan
    from bonemerge.plan import build_merge_plan

    began = time.perf_counter()
    if not adapters:
        raise BonemergeError("no adapter was given; pass at least one adapter folder after the base.")
    if precision not in PRECISIONS:
        raise BonemergeError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    out_dtype = parse_dtype(dtype)
    shard_bytes = layout.parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size

    checkpoint = open_checkpoint(base)
    loaded = [load_adapter(a) for a in adapters]
    target = check_output(output, _inputs(checkpoint, loaded), overwrite)
    plan = build_merge_plan(checkpoint, loaded, dtype=out_dtype, max_shard_bytes=shard_bytes)
    check_blocks_finite(loaded)
    check_free_space(target.parent if target.parent.exists() else Path.cwd(), plan.total_bytes)
    options = EngineOptions(device=device, precision=precision, safe_merge=safe_merge, progress=progress)

    with Staging(target) as staging:
        stats, _ = run_plan(plan, staging.path, options)
        files = [s.filename for s in plan.shards]
        if plan.write_index:
            index = json.dumps(layout.index_json(plan.shards), indent=2)
            (staging.path / plan.index_name).write_text(index + "\n", encoding="utf-8")
            files.append(plan.index_name)
        files += companions.write_companions(
            checkpoint, [a.root for a in loaded], plan.config_updates, staging.path
        )
        applied = [
            modelcard.AppliedAdapter(
                a.label,
                a.config.describe(),
                "bat" if a.config.variant == "bat" and a.config.method == "BONE" else a.config.method.lower(),
            )
            for a in loaded
        ]
        main_dtype = dtypes.TORCH_NAME.get(out_dtype or plan.main_dtype, "mixed")
        card = modelcard.merged_card(
            base=checkpoint.root.name if checkpoint.is_folder else checkpoint.shards[0].name,
            base_hub_id=modelcard.hub_id(loaded[0].config.base_model),
            adapters=applied,
            dtype=main_dtype,
            command=command,
            notes=plan.notes,
        )
        (staging.path / "README.md").write_text(card, encoding="utf-8")
        files.append("README.md")
        staging.publish(overwrite)

    return MergeReport(
        output=str(target),
        base=str(Path(base)),
        adapters=[str(a.root) for a in loaded],
        tensors_merged=stats.merged,
        tensors_copied=stats.copied,
        tensors_converted=stats.converted,
        bytes_written=stats.bytes_written,
        seconds=round(time.perf_counter() - began, 3),
        files=sorted(files),
        notes=list(plan.notes),
    )
