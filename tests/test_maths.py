"""The per-variant maths on row chunks, and the engine's chunking, against plain definitions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bonemerge import merge
from bonemerge.checkpoint import TensorRef, dtypes
from bonemerge.errors import MergeError
from bonemerge.methods import Block, BlockOp, Target
from bonemerge.methods import bone as maths
from bonemerge.plan.build import Step
from bonemerge.run import compute as compute_engine
from tests import toy

CASES = [
    ("default", (48, 40), (8, 48)),  # 40 % 8 == 0
    ("default", (48, 45), (8, 48)),  # trailing 5 columns
    ("default", (10, 7), (12, 10)),  # r larger than in_features
    ("mini", (48, 45), (8, 6)),
    ("bat", (48, 40), (6, 8, 8)),
]


def chunked(
    variant: str, weight: torch.Tensor, block: torch.Tensor, sizes: list[int], inverse=False
) -> torch.Tensor:
    prepared = maths.prepare_block(variant, block, tuple(weight.shape), weight.dtype)
    work = weight.clone()
    start = 0
    for size in sizes:
        part = work[start : start + size]
        (prepared.unmerge if inverse else prepared.merge)(part, start)
        start += size
    assert start == weight.shape[0]
    return work


@pytest.mark.parametrize(("variant", "shape", "block_shape"), CASES)
def test_chunked_merge_equals_definition(variant, shape, block_shape):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator, dtype=torch.float64)
    block = torch.randn(block_shape, generator=generator, dtype=torch.float64) * 0.1
    sizes = [8, 16, 24] if variant == "bat" else [1, 10, 5, shape[0] - 16]
    expected = maths.reference_merge(weight, block, variant)
    got = chunked(variant, weight, block, sizes)
    if variant == "bat":
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    else:
        assert torch.equal(got, expected)
    restored = chunked(variant, got, block, sizes, inverse=True)
    torch.testing.assert_close(restored, weight, rtol=1e-12, atol=1e-12)


def test_default_definition_by_hand():
    weight = torch.zeros(2, 5)
    block = torch.tensor([[1.0, 10.0], [2.0, 20.0]])  # r=2, out=2
    assert torch.equal(
        maths.reference_merge(weight, block, "default"),
        torch.tensor([[1.0, 2.0, 1.0, 2.0, 1.0], [10.0, 20.0, 10.0, 20.0, 10.0]]),
    )


def test_bat_definition_by_hand():
    weight = torch.eye(4)
    block = torch.stack([torch.full((2, 2), 0.5), torch.zeros(2, 2)])  # out=4, r=2
    merged = maths.reference_merge(weight, block, "bat")
    tile = torch.eye(2) @ (torch.eye(2) + block[0]) + block[0]
    assert torch.equal(merged[:2, :2], tile)
    assert torch.equal(merged[:2, 2:], block[0])  # a zero tile becomes B_a
    assert torch.equal(merged[2:], weight[2:])


def test_bat_unmerge_refuses_singular_blocks():
    block = torch.zeros(3, 4, 4)
    block[1] = -torch.eye(4)
    prepared = maths.prepare_block("bat", block, (12, 8), torch.float32)
    with pytest.raises(MergeError, match="singular or ill-conditioned for Bat block 1"):
        prepared.unmerge(torch.zeros(12, 8), 0)


@pytest.mark.parametrize(
    ("chunk", "compute", "threads"),
    [(100, 100, 1), (100, 100, 2), (4096, 640, 2), (1 << 22, 1 << 18, 2)],
    ids=["tiny-serial", "tiny-parallel", "medium-parallel", "default-sub-chunks"],
)
def test_engine_output_does_not_depend_on_chunking_or_threads(tmp_path, monkeypatch, chunk, compute, threads):
    """However chunks, sub-chunks and compute threads divide the work (Bat rounded to whole
    tiles, two threads computing chunks side by side), the bytes written are exactly those of
    one whole-tensor pass on one thread."""
    base = toy.write_base(tmp_path / "base", toy.base_tensors(torch.bfloat16), shards=2)
    adapters = [
        toy.write_adapter(tmp_path / "bone", seed=1),
        toy.write_adapter(tmp_path / "bat", variant="bat", r=16, seed=2),
        toy.write_adapter(tmp_path / "mini", method="MISS", variant="mini", r=8, mini_r=4, seed=3),
    ]
    monkeypatch.setattr(compute_engine, "CHUNK_ELEMENTS", 1 << 22)
    monkeypatch.setattr(compute_engine, "COMPUTE_ELEMENTS", 1 << 22)
    monkeypatch.setattr(compute_engine, "COMPUTE_THREADS", 1)
    merge(base, adapters, tmp_path / "whole")
    monkeypatch.setattr(compute_engine, "CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(compute_engine, "COMPUTE_ELEMENTS", compute)
    monkeypatch.setattr(compute_engine, "COMPUTE_THREADS", threads)
    merge(base, adapters, tmp_path / "split")
    shards = sorted((tmp_path / "whole").glob("*.safetensors"))
    assert len(shards) == 2
    for shard in shards:
        assert shard.read_bytes() == (tmp_path / "split" / shard.name).read_bytes()


def test_chunk_rows_keep_bat_tiles_whole(monkeypatch):
    monkeypatch.setattr(compute_engine, "CHUNK_ELEMENTS", 100)
    weight = TensorRef("w", Path("w"), 0, "BF16", (96, 64), 96 * 64 * 2)
    tensor = TensorRef("b", Path("b"), 0, "F32", (6, 16, 16), 6 * 16 * 16 * 4)
    block = Block("w", maths.BONE, {"block": tensor}, {"block": "b"}, maths.BoneSettings("bat", 16, None))
    op = BlockOp(block, Target("weight"), "a")
    assert compute_engine.chunk_rows(Step("w", "BF16", (96, 64), weight)) == 1
    assert compute_engine.chunk_rows(Step("w", "BF16", (96, 64), weight, (op,))) == 16


def test_all_finite_is_exact_despite_the_fast_path():
    huge = torch.full((1000,), 3.0e38, dtype=torch.bfloat16)
    assert compute_engine.all_finite(huge), "a sum that overflows is not a NaN"
    for bad in (float("nan"), float("inf"), float("-inf")):
        values = torch.zeros(1000, dtype=torch.float16)
        values[517] = bad
        assert not compute_engine.all_finite(values)
    both = torch.zeros(10, dtype=torch.float64)
    both[1], both[2] = float("inf"), float("-inf")
    assert not compute_engine.all_finite(both)


@pytest.mark.parametrize(
    "dtype",
    ["F64", "F32", "C64", "F16", "BF16", "F8_E5M2", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0"],
)
def test_finite_bits_agree_with_torch(dtype):
    """The torch-free NaN/Inf check of adapter blocks (read from the bits) says what
    `torch.isfinite` says, on every bit pattern of the small types and on random ones of the
    wide types, with NaN and Inf planted at both ends."""
    torch_dtype = dtypes.to_torch(dtype)
    width = torch.empty(0, dtype=torch_dtype).element_size()
    if width == 1:
        raw = bytes(range(256))
        values = torch.frombuffer(bytearray(raw), dtype=torch_dtype)
        for index in range(256):
            one = raw[index : index + 1]
            # torch's isfinite lacks some 8-bit types and calls E8M0's NaN finite: ask the value
            assert dtypes.all_finite_bytes(memoryview(one), dtype) == bool(
                torch.isfinite(values[index].float())
            )
        return
    generator = torch.Generator().manual_seed(width)
    plain = torch.randn(4096, generator=generator).to(torch_dtype)
    assert dtypes.all_finite_bytes(memoryview(plain.view(torch.uint8).numpy()), dtype)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for where in (0, 4095):
            broken = plain.clone()
            broken[where] = complex(0, bad) if dtype == "C64" else bad
            assert not torch.isfinite(broken).all()
            assert not dtypes.all_finite_bytes(memoryview(broken.view(torch.uint8).numpy()), dtype)
    noise = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8, generator=generator)
    for piece in noise.split(width * 16):
        expected = bool(torch.isfinite(piece.view(torch_dtype)).all())
        assert dtypes.all_finite_bytes(memoryview(piece.numpy()), dtype) == expected
