"""Reading a tensor from a `Source` as torch values: whole, by rows, or in bounded pieces.

A `Source` is bytes in a file (`TensorRef`) or a tensor already in memory (`MemoryTensor`,
from a torch pickle). Callers that only need to look at every value (the NaN/Inf check of
an adapter block) must not read a tensor whole: a LoRA or Bone adapter of a 70B model at
high rank holds blocks of gigabytes, and a hostile header can promise far more.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import torch

from bonemerge.checkpoint import dtypes
from bonemerge.checkpoint import reader as reader_module
from bonemerge.checkpoint.folder import ComputedTensor, Source, TensorRef
from bonemerge.checkpoint.reader import RangeReader


def _values(raw: bytearray | memoryview, dtype: str) -> torch.Tensor:
    """Raw bytes as a flat tensor of `dtype`; bytes (uint8) for dtypes torch cannot hold."""
    if not len(raw):
        return torch.empty(0, dtype=dtypes.to_torch(dtype) if dtype in dtypes.TORCH_NAME else torch.uint8)
    if dtype not in dtypes.TORCH_NAME:
        return torch.frombuffer(raw, dtype=torch.uint8)
    return torch.frombuffer(raw, dtype=dtypes.to_torch(dtype))


def read_whole(reader: RangeReader, source: Source) -> torch.Tensor:
    """The whole tensor in its own dtype and shape: for tensors known to be small."""
    if not isinstance(source, TensorRef):
        return source.tensor
    return _values(reader.read(source.path, source.offset, source.nbytes), source.dtype).view(source.shape)


def read_rows(reader: RangeReader, source: Source, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of the tensor seen as (rows, columns). For dtypes torch cannot hold
    (F4, F6_*) the bytes spanning those rows come back as one row of uint8, which is enough
    to compare two such tensors read alike."""
    if isinstance(source, ComputedTensor):
        return source.read_rows(reader, start, stop)
    rows, cols = dtypes.rows_cols(source.shape)
    if not isinstance(source, TensorRef):
        return source.tensor.reshape(rows, cols)[start:stop]
    bits = dtypes.BITS[source.dtype]
    begin, end = start * cols * bits // 8, -(-stop * cols * bits // 8)
    raw = reader.read(source.path, source.offset + begin, end - begin)
    values = _values(raw, source.dtype)
    if source.dtype not in dtypes.TORCH_NAME:
        return values.view(1, -1)
    return values.view(stop - start, cols)


def read_grid_rows(
    reader: RangeReader, source: Source, grid: tuple[int, int], start: int, stop: int
) -> torch.Tensor:
    """Rows [start, stop) of `source` seen as `grid` (rows, elements per row): how the engine
    streams a codec's weight whose stored shape is not its rows (MXFP4's blocks, bitsandbytes'
    packed column of bytes)."""
    if isinstance(source, TensorRef) and dtypes.rows_cols(source.shape) != grid:
        source = replace(source, shape=grid)
    return read_rows(reader, source, start, stop)


def pieces(reader: RangeReader, source: Source, limit: int | None = None) -> Iterator[torch.Tensor]:
    """Every value of the tensor, flat, in consecutive pieces of at most `limit` bytes (default
    `reader.PIECE_BYTES`) read into one reused buffer: a piece is valid only until the next is
    asked for."""
    if not isinstance(source, TensorRef):
        flat = source.tensor.reshape(-1)
        step = max(1, (limit or reader_module.PIECE_BYTES) // max(flat.element_size(), 1))
        for begin in range(0, flat.numel(), step):
            yield flat[begin : begin + step]
        return
    itemsize = max(1, dtypes.BITS[source.dtype] // 8)
    for view in reader.pieces(source.path, source.offset, source.nbytes, limit, align=itemsize):
        yield _values(view, source.dtype)


def load_whole(source: Source) -> torch.Tensor:
    """`read_whole` with a reader of its own, for one-off reads of small tensors."""
    with RangeReader() as reader:
        return read_whole(reader, source)
