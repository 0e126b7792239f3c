"""`verify` is exact for bonemerge's own merges and bounds each element's own rounding otherwise.

Every mantissa bit and the sign of one element of a merged bf16 tensor are flipped in a
default, a mini and a Bat merge; verify must catch each change both in exact mode (the merged
model's history says bonemerge made it) and in tolerance mode (the history removed), while
PEFT's own `merge_and_unload()` of the same adapters passes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import BoneConfig, MissConfig

from bonemerge import merge, verify
from bonemerge.checkpoint import open_checkpoint
from bonemerge.cli import main
from bonemerge.methods.bone import reference_merge
from bonemerge.verification.tolerance import ulp
from tests import oracle, toy
from tests.conftest import llama_factory

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {
    "default": lambda: BoneConfig(r=32, target_modules=TARGETS),
    "mini": lambda: MissConfig(r=32, mini_r=16, init_weights="mini", target_modules=TARGETS),
    "bat": lambda: BoneConfig(r=32, init_weights="bat", target_modules=TARGETS),
}
TENSOR = "model.layers.1.mlp.down_proj.weight"
MODULE = "model.layers.1.mlp.down_proj"
BITS = [*range(7), 15]  # the 7 explicit mantissa bits of bf16, and its sign


@pytest.fixture(scope="module", params=list(VARIANTS))
def merges(request, tmp_path_factory, llama):
    """The variant's adapter, bonemerge's merge (with its history) and a copy without it, and
    PEFT's own merge of the same adapter."""
    root = tmp_path_factory.mktemp(request.param)
    factory = llama_factory(llama)
    adapter = oracle.train_adapter(factory, VARIANTS[request.param](), root / "adapter", seed=3)
    merge(llama, [adapter], root / "exact")
    shutil.copytree(root / "exact", root / "loose")
    (root / "loose" / "bonemerge.json").unlink()
    oracle.peft_model(factory, [adapter]).merge_and_unload().save_pretrained(root / "peft")
    return request.param, llama, adapter, root


def element_offset(folder: Path, name: str, row: int, col: int) -> tuple[Path, int]:
    """File and byte offset of one bf16 element."""
    ref = open_checkpoint(folder).tensors[name]
    return ref.path, ref.offset + (row * ref.shape[1] + col) * 2


def flip(path: Path, offset: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset + bit // 8)
        byte = f.read(1)[0]
        f.seek(offset + bit // 8)
        f.write(bytes([byte ^ (1 << (bit % 8))]))


def chosen_element(base: Path, adapter: Path, variant: str) -> tuple[int, int]:
    """An element whose exact merged value lies within 1/16 ulp of a bf16 number, among the
    larger half. A one-ulp change elsewhere can be exactly what a legitimate second rounding
    does (PEFT rounds a Bat delta before adding it), so no bound can both accept PEFT and catch
    it; next to a bf16 number, any change of an ulp or more is outside every legitimate rounding."""
    weight = oracle.read_folder(base)[TENSOR].double()
    exact = reference_merge(weight, oracle.adapter_blocks(adapter)[MODULE].double(), variant)
    residual = (exact.to(torch.bfloat16).double() - exact).abs() / ulp(exact, "BF16")
    residual[exact.abs() < exact.abs().median()] = 1.0
    row, col = divmod(int(residual.argmin()), exact.shape[1])
    assert residual[row, col] < 1 / 16
    return row, col


def test_own_merge_is_checked_exactly_and_peft_merge_within_rounding(merges):
    variant, base, adapter, root = merges
    own = verify(root / "exact", base, [adapter])
    assert own.mode == "exact" and own.ok and own.within_rounding == 0, own
    loose = verify(root / "loose", base, [adapter])
    assert loose.mode == "tolerance" and loose.ok, loose
    peft = verify(root / "peft", base, [adapter])
    assert peft.mode == "tolerance" and peft.ok, peft.differing
    if variant == "bat":
        assert peft.within_rounding > 0, "PEFT rounds Bat deltas twice; the test would prove nothing"


@pytest.mark.parametrize("folder", ["exact", "loose"])
def test_every_flipped_bit_of_one_element_is_caught(merges, folder):
    variant, base, adapter, root = merges
    row, col = chosen_element(base, adapter, variant)
    path, offset = element_offset(root / folder, TENSOR, row, col)
    for bit in BITS:
        flip(path, offset, bit)
        try:
            report = verify(root / folder, base, [adapter])
        finally:
            flip(path, offset, bit)
        assert [(d.name, d.elements) for d in report.differing] == [(TENSOR, 1)], (variant, folder, bit)
        assert report.mode == ("exact" if folder == "exact" else "tolerance")
    assert verify(root / folder, base, [adapter]).ok, "flipping back restores the model"


def test_text_lists_ten_differing_tensors_and_json_all(tmp_path):
    layers = 12
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(16, 16) for i in range(layers)}
    base = toy.write_base(tmp_path / "base", tensors)

    def adapter(name: str, seed: int) -> Path:
        generator = torch.Generator().manual_seed(seed)
        blocks = {
            f"model.layers.{i}.mlp.up_proj": torch.randn(8, 16, generator=generator) for i in range(layers)
        }
        return toy.write_adapter(tmp_path / name, blocks)

    merge(base, [adapter("a", 1)], tmp_path / "merged")
    other = adapter("b", 2)
    text = CliRunner().invoke(main, ["verify", str(tmp_path / "merged"), str(other), "--base", str(base)])
    assert text.exit_code == 1
    listed = [line for line in text.stdout.splitlines() if line.startswith("differs: ")]
    assert len(listed) == 10 and "… and 2 more differing tensors" in text.stdout
    as_json = CliRunner().invoke(
        main, ["verify", str(tmp_path / "merged"), str(other), "--base", str(base), "--json"]
    )
    assert as_json.exit_code == 1 and len(json.loads(as_json.stdout)["tensors"]["differing"]) == layers


@pytest.mark.parametrize("variant", ["default", "bat"])
def test_peft_merge_of_two_adapters_passes(tmp_path, llama, variant):
    """PEFT rounds the weight between adapters and loads the second adapter in the model's
    dtype; both are rounding, which tolerance mode allows and which exact mode never needs."""
    factory = llama_factory(llama)
    config = VARIANTS[variant]
    adapters = [oracle.train_adapter(factory, config(), tmp_path / f"a{i}", seed=i) for i in (1, 2)]
    merged = oracle.peft_model(factory, adapters).merge_and_unload(adapter_names=["a0", "a1"])
    merged.save_pretrained(tmp_path / "peft")
    report = verify(tmp_path / "peft", llama, adapters)
    assert report.mode == "tolerance" and report.ok and report.within_rounding > 0, report.differing
    merge(llama, adapters, tmp_path / "own")
    assert verify(tmp_path / "own", llama, adapters).mode == "exact"
    if variant == "bat":
        assert not verify(tmp_path / "peft", llama, adapters[::-1]).ok, "Bat merges do not commute"
