"""`bonemerge unmerge`: the exact inverse of the merged file it is given, and honest round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import BoneConfig, MissConfig

from bonemerge import merge, unmerge
from bonemerge.errors import AdapterError
from tests import oracle, toy
from tests.conftest import llama_factory, minilm_factory, tree_digest

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj", "up_proj"]
VARIANTS = [
    ("bone", lambda: BoneConfig(r=64, target_modules=LLAMA_TARGETS)),
    ("bat", lambda: BoneConfig(r=32, init_weights="bat", target_modules=LLAMA_TARGETS)),
    ("miss-mini", lambda: MissConfig(r=64, mini_r=16, init_weights="mini", target_modules=LLAMA_TARGETS)),
]


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bf16 values lie between a and b, elementwise (sign-magnitude bits made ordered)."""
    raw = torch.stack([a, b]).view(torch.int16).to(torch.int64)
    ordered = torch.where(raw < 0, -(raw & 0x7FFF), raw)
    return (ordered[0] - ordered[1]).abs()


def float64_inverse(merged: torch.Tensor, block: torch.Tensor, variant: str) -> torch.Tensor:
    """Undo one merge in float64, from the definitions, tile by tile for Bat."""
    w = merged.double()
    b = block.double()
    out_features, in_features = w.shape
    if variant == "bat":
        r = b.shape[-1]
        result = torch.empty_like(w)
        for a in range(out_features // r):
            rows = slice(a * r, (a + 1) * r)
            solve = torch.linalg.inv(torch.eye(r, dtype=torch.float64) + b[a])
            for c in range(in_features // r):
                cols = slice(c * r, (c + 1) * r)
                result[rows, cols] = (w[rows, cols] - b[a]) @ solve
        return result
    if variant == "mini":
        b = b.repeat(1, out_features // b.shape[1])
    return w - b[torch.arange(in_features) % b.shape[0], :].t()


def adapters_for(tmp_path: Path, factory, config, seeds=(11,)) -> list[Path]:
    return [oracle.train_adapter(factory, config(), tmp_path / f"a{seed}", seed=seed) for seed in seeds]


@pytest.mark.parametrize(("case", "config"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_unmerge_is_the_float64_inverse_of_its_input_rounded_once(tmp_path, llama, case, config):
    adapters = adapters_for(tmp_path, llama_factory(llama), config)
    merge(llama, adapters, tmp_path / "merged")
    before = tree_digest(tmp_path / "merged")
    report = unmerge(tmp_path / "merged", adapters, tmp_path / "unmerged")
    assert tree_digest(tmp_path / "merged") == before
    assert report.tensors_merged == 2 * len(LLAMA_TARGETS)
    merged = oracle.read_folder(tmp_path / "merged")
    unmerged = oracle.read_folder(tmp_path / "unmerged")
    variant = oracle.adapter_variant(adapters[0])
    blocks = oracle.adapter_blocks(adapters[0])
    for module, block in blocks.items():
        name = module + ".weight"
        expected = float64_inverse(merged[name], block, variant)
        assert unmerged[name].dtype == torch.bfloat16
        assert int(ulp_distance(unmerged[name], expected.to(torch.bfloat16)).max()) <= 1, name
    untouched = [n for n in merged if n.removesuffix(".weight") not in blocks]
    assert all(torch.equal(unmerged[n], merged[n]) for n in untouched)


@pytest.mark.parametrize(("case", "config"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_bf16_round_trip_error_is_what_the_merged_rounding_implies(tmp_path, llama, case, config):
    """The merged bf16 file lost up to half an ulp per element; unmerging can only carry that
    loss through (amplified by (I + B)^-1 for Bat), plus its own half ulp."""
    adapters = adapters_for(tmp_path, llama_factory(llama), config)
    merge(llama, adapters, tmp_path / "merged")
    unmerge(tmp_path / "merged", adapters, tmp_path / "unmerged")
    base, merged = oracle.read_folder(llama), oracle.read_folder(tmp_path / "merged")
    unmerged = oracle.read_folder(tmp_path / "unmerged")
    variant = oracle.adapter_variant(adapters[0])
    eps = 2.0**-8  # bf16 unit roundoff
    for module, block in oracle.adapter_blocks(adapters[0]).items():
        name = module + ".weight"
        gain = 1.0
        if variant == "bat":
            eye = torch.eye(block.shape[-1], dtype=torch.float64)
            gain = float(torch.linalg.matrix_norm(torch.linalg.inv(eye + block.double()), ord=1).max())
        bound = eps * (gain * merged[name].double().abs().max() + unmerged[name].double().abs().max())
        error = (unmerged[name].double() - base[name].double()).abs().max()
        assert error <= bound, (name, float(error), float(bound))
        assert error > 0 or variant == "default"


def test_fp32_round_trip_is_exact_to_float32_rounding(tmp_path, minilm):
    factory = minilm_factory(minilm)
    for name, config in [
        ("bone", lambda: BoneConfig(r=100, target_modules=["query", "value", "dense"])),
        ("bat", lambda: BoneConfig(r=32, init_weights="bat", target_modules=["query", "value", "dense"])),
        ("mini", lambda: MissConfig(r=48, mini_r=8, init_weights="mini", target_modules=["query", "dense"])),
    ]:
        adapters = adapters_for(tmp_path / name, factory, config, seeds=(1, 2))
        merge(minilm, adapters, tmp_path / name / "merged")
        unmerge(tmp_path / name / "merged", adapters, tmp_path / name / "unmerged")
        base, unmerged = oracle.read_folder(minilm), oracle.read_folder(tmp_path / name / "unmerged")
        for tensor, value in base.items():
            if value.is_floating_point():
                error = (unmerged[tensor].double() - value.double()).abs().max()
                assert error <= 1e-5 * value.double().abs().max(), (name, tensor, float(error))
            else:
                assert torch.equal(unmerged[tensor], value)


def mismatch_fraction(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(int((a[n] != b[n]).sum()) for n in a) / sum(t.numel() for t in a.values())


def test_merge_to_float32_keeps_a_bf16_merge_reversible(tmp_path, llama):
    """Through a float32 merge, unmerging loses only float32 rounding: the bf16 base comes back
    except in elements far smaller than the block values (off by one ulp at most); through a
    bf16 merge, every element went through a bf16 rounding and many come back different."""
    for case, config in VARIANTS:
        adapters = adapters_for(tmp_path / case, llama_factory(llama), config)
        merge(llama, adapters, tmp_path / case / "merged32", dtype="float32")
        unmerge(tmp_path / case / "merged32", adapters, tmp_path / case / "back32")
        unmerge(tmp_path / case / "merged32", adapters, tmp_path / case / "back", dtype="bfloat16")
        merge(llama, adapters, tmp_path / case / "merged16")
        unmerge(tmp_path / case / "merged16", adapters, tmp_path / case / "back16")
        base = oracle.read_folder(llama)
        merged32, back32 = (
            oracle.read_folder(tmp_path / case / "merged32"),
            oracle.read_folder(tmp_path / case / "back32"),
        )
        gain = 4.0 if case == "bat" else 1.0
        for name, value in base.items():
            error = (back32[name].double() - value.double()).abs()
            assert (error <= gain * 2.0**-23 * merged32[name].double().abs().max()).all(), (case, name)
        back = oracle.read_folder(tmp_path / case / "back")
        for name, value in base.items():
            differs = back[name] != value
            assert (value[differs].double().abs() <= 2.0**-12 * merged32[name].double().abs().max()).all()
        assert mismatch_fraction(back, base) < 1e-4, case
        assert mismatch_fraction(
            oracle.read_folder(tmp_path / case / "back16"), base
        ) > 10 * mismatch_fraction(back, base)


def test_two_adapters_come_off_last_first(tmp_path, llama):
    """Bat merges do not commute: only the reverse of the merge order gives the base back."""
    factory = llama_factory(llama)
    adapters = adapters_for(tmp_path, factory, VARIANTS[1][1], seeds=(1, 2))
    merge(llama, adapters, tmp_path / "merged", dtype="float32")
    unmerge(tmp_path / "merged", adapters, tmp_path / "back", dtype="bfloat16")
    with pytest.raises(AdapterError, match=f"in the order {adapters[0]}, {adapters[1]}; list them"):
        unmerge(tmp_path / "merged", adapters[::-1], tmp_path / "wrong-order", dtype="bfloat16")
    assert not (tmp_path / "wrong-order").exists()
    # Without the history (as if another tool had merged it) the order cannot be checked.
    (tmp_path / "merged" / "bonemerge.json").unlink()
    report = unmerge(tmp_path / "merged", adapters[::-1], tmp_path / "wrong-order", dtype="bfloat16")
    assert any("could not be checked" in note for note in report.notes)
    base = oracle.read_folder(llama)
    assert mismatch_fraction(oracle.read_folder(tmp_path / "back"), base) < 1e-4
    assert mismatch_fraction(oracle.read_folder(tmp_path / "wrong-order"), base) > 0.05


def test_modules_to_save_need_allow_lossy(tmp_path, minilm):
    factory = minilm_factory(minilm, head=True)
    config = MissConfig(r=64, target_modules=["query"], modules_to_save=["classifier"])
    adapter = oracle.train_adapter(factory, config, tmp_path / "a", seed=3)
    merge(minilm, [adapter], tmp_path / "merged")
    with pytest.raises(AdapterError, match=r"classifier\.(weight|bias).*--allow-lossy"):
        unmerge(tmp_path / "merged", [adapter], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    report = unmerge(tmp_path / "merged", [adapter], tmp_path / "out", allow_lossy=True)
    assert any("kept the trained copies" in note for note in report.notes)
    merged, out = oracle.read_folder(tmp_path / "merged"), oracle.read_folder(tmp_path / "out")
    assert torch.equal(out["classifier.weight"], merged["classifier.weight"])
    base = oracle.read_folder(minilm)
    layer = "encoder.layer.4.attention.self.query.weight"
    assert (out[layer] - base[layer]).abs().max() <= 1e-5 * base[layer].abs().max()


def test_saved_frozen_lm_head_is_restored_exactly(tmp_path):
    """PEFT saves `lm_head.base_layer.weight` when lm_head is targeted: the exact pre-merge weight."""
    tensors = toy.base_tensors(torch.bfloat16)
    base = toy.write_base(tmp_path / "base", tensors)
    frozen = tensors["lm_head.weight"].clone()
    adapter = toy.write_adapter(
        tmp_path / "adapter",
        blocks={
            "lm_head": torch.randn(8, 100) * 0.01,
            "model.layers.0.self_attn.q_proj": torch.randn(8, 64) * 0.01,
        },
        extra={"base_model.model.lm_head.base_layer.weight": frozen},
    )
    merge(base, [adapter], tmp_path / "merged")
    unmerge(tmp_path / "merged", [adapter], tmp_path / "back")
    back = oracle.read_folder(tmp_path / "back")
    assert torch.equal(back["lm_head.weight"], frozen)
    assert json.loads((tmp_path / "back" / "bonemerge.json").read_text())["operation"] == "unmerge"


def test_singular_bat_block_is_refused_before_output(tmp_path):
    tensors = toy.base_tensors()
    base = toy.write_base(tmp_path / "base", tensors)
    block = torch.zeros(4, 16, 16)
    block[2] = -torch.eye(16)
    adapter = toy.write_adapter(
        tmp_path / "a", blocks={"model.layers.0.self_attn.q_proj": block}, variant="bat", r=16
    )
    from bonemerge.errors import MergeError

    with pytest.raises(MergeError, match="singular or ill-conditioned for Bat block 2"):
        unmerge(base, [adapter], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*bonemerge*"))
