"""Reading, validating and writing safetensors checkpoints; knows nothing of adapters."""

from bonemerge.checkpoint.folder import (
    Checkpoint,
    ComputedTensor,
    MemoryTensor,
    Shard,
    Source,
    TensorRef,
    open_checkpoint,
    read_json,
)
from bonemerge.checkpoint.header import Header, TensorInfo, read_header
from bonemerge.checkpoint.reader import RangeReader
from bonemerge.checkpoint.writer import Entry, ShardWriter

__all__ = [
    "Checkpoint",
    "ComputedTensor",
    "Entry",
    "Header",
    "MemoryTensor",
    "RangeReader",
    "Shard",
    "ShardWriter",
    "Source",
    "TensorInfo",
    "TensorRef",
    "open_checkpoint",
    "read_header",
    "read_json",
]
