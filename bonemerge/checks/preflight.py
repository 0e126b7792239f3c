"""Checks that run before the long I/O: engine options, the device, adapter values (NaN/Inf,
invertibility), tensors larger than the shard size. Each fails with one sentence.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from bonemerge.adapters import Adapter
from bonemerge.checkpoint import RangeReader, Source, TensorRef, dtypes, layout
from bonemerge.errors import AdapterError, BonemergeError, shown
from bonemerge.output.push import Push
from bonemerge.resolve.inputs import PathLike

PRECISIONS = ("auto", "fp32", "fp64")


def engine_options(
    device: str, precision: str, safe_merge: bool, progress: bool, rounding: str = "nearest", seed: int = 0
):
    from bonemerge.codecs import ROUNDINGS
    from bonemerge.run.work import EngineOptions

    if precision not in PRECISIONS:
        raise BonemergeError(f"unknown precision {shown(precision)}; choose one of {', '.join(PRECISIONS)}.")
    if rounding not in ROUNDINGS:
        raise BonemergeError(f"unknown rounding {shown(rounding)}; choose one of {', '.join(ROUNDINGS)}.")
    check_device(device)
    return EngineOptions(
        device=device,
        precision=precision,
        safe_merge=safe_merge,
        progress=progress,
        rounding=rounding,
        seed=seed,
    )


def check_device(device: str) -> None:
    """Only the CPU and CUDA devices run bonemerge's maths; anything else torch accepts (`meta`,
    `xpu`, `mps`...) would fail deep in a run, so it is refused before any work. Only a CUDA
    device waits for torch to load; the CPU needs no asking."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise BonemergeError(f"unknown or unsupported device {shown(device)}; use cpu, cuda or cuda:N.")
    if device == "cpu":
        return
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BonemergeError(f"--device {device} was asked for, but torch sees no CUDA device here.")
    if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise BonemergeError(
            f"--device {device} was asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)."
        )


def shard_size_bytes(max_shard_size: str | int | None) -> int | None:
    return layout.parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size


def check_blocks_finite(adapters: Sequence[Adapter]) -> None:
    """Refuse NaN/Inf in any block before the output is even created, reading each block in
    bounded pieces: blocks of large adapters (or of a lying header) can be gigabytes."""
    with RangeReader() as reader:
        for adapter in adapters:
            checked: set[int] = set()  # an adapter-wide tensor is read once, not once per block
            for block in adapter.blocks:
                for part, source in block.parts.items():
                    if id(source) in checked:
                        continue
                    checked.add(id(source))
                    if not finite(reader, source):
                        raise AdapterError(
                            f"block {block.keys.get(part, block.key)} of {adapter.root} holds NaN or Inf "
                            "values; the adapter is broken (its training diverged), nothing was written."
                        )


def finite(reader: RangeReader, source: Source) -> bool:
    """No NaN or Inf in `source`: from its bits when it is in a file (no torch needed yet)."""
    if isinstance(source, TensorRef):
        pieces = reader.pieces(source.path, source.offset, source.nbytes)
        return all(dtypes.all_finite_bytes(piece, source.dtype) for piece in pieces)
    from bonemerge.checkpoint.tensors import pieces as values
    from bonemerge.run.compute import all_finite

    return all(all_finite(piece) for piece in values(reader, source))


def check_invertible(adapters: Sequence[Adapter], progress: bool = False) -> None:
    """Refuse, before any output exists, a block whose merge cannot be undone reliably (Bat's
    inverses take a while on a large model: `progress` shows a bar)."""
    import torch

    from bonemerge.checkpoint.tensors import load_whole
    from bonemerge.errors import MergeError
    from bonemerge.run.progress import counted

    blocks = [(adapter, block) for adapter in adapters for block in adapter.blocks]
    threads = torch.get_num_threads()
    # The checks are batches of r x r decompositions: more threads only spin on them (20x the
    # CPU time with two threads on a busy two-core machine), and nothing else runs yet.
    torch.set_num_threads(1)
    try:
        for adapter, block in counted(blocks, "checking inverses", progress):
            try:
                block.method.check_inverse(block, lambda part, b=block: load_whole(b.parts[part]))
            except MergeError as exc:
                raise MergeError(
                    f"block {block.key} of {adapter.root}: {exc}; nothing was written."
                ) from None
    finally:
        torch.set_num_threads(threads)


def check_stream_options(output: PathLike | None, push: Push | None, stream: bool, overwrite: bool) -> None:
    from bonemerge.output.hub_stream import check_stream

    check_stream(output, push, stream, overwrite)


def oversized_notes(plan, max_shard_bytes: int | None) -> list[str]:
    """Notes for tensors larger than --max-shard-size, which get a file of their own."""
    from bonemerge.units import format_size

    if max_shard_bytes is None:
        return []
    return [
        f"{step.name} ({format_size(step.nbytes)}) is larger than --max-shard-size "
        f"({format_size(max_shard_bytes)}); it was written to a file of its own, which exceeds that size"
        for step in plan.steps.values()
        if step.nbytes > max_shard_bytes
    ]
