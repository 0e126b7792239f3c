"""`verify` vouches only for what it can check: tensors of the plan's dtype and shape, finite
where the merge is finite, and rounding bounds small beside the values they bound."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bonemerge import merge, verify
from bonemerge.verification.compare import CHECKABLE, ChecksumReport, Difference
from tests import toy
from tests.cliutil import run
from tests.lora_oracle import write_lora

Q = "model.layers.0.self_attn.q_proj.weight"
TOUCHED = sorted(n for n in toy.SHAPES if n.endswith(("q_proj.weight", "up_proj.weight")))


def rewritten(source: Path, folder: Path, change, keep_history: bool = True) -> Path:
    """A copy of `source` with every tensor passed through `change(name, tensor)`."""
    shutil.copytree(source, folder)
    tensors = {name: change(name, t) for name, t in load_file(folder / "model.safetensors").items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    if not keep_history:
        (folder / "bonemerge.json").unlink()
    return folder


@pytest.fixture(scope="module")
def bf16_merge(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("bf16")
    base = toy.write_base(root / "base", toy.base_tensors(torch.bfloat16))
    adapter = toy.write_adapter(root / "adapter")
    merge(base, [adapter], root / "merged")
    return base, adapter, root


CASTS = {
    "int8 zeros": lambda t: torch.zeros(t.shape, dtype=torch.int8),
    "bool": lambda t: t != 0,
    "uint8": lambda t: t.to(torch.uint8),
    "F8": lambda t: t.to(torch.float8_e4m3fn),
    "int64": lambda t: t.to(torch.int64),
    "one tensor fp16": lambda t: t.to(torch.float16),
}


@pytest.mark.parametrize("keep_history", [True, False], ids=["history", "no-history"])
@pytest.mark.parametrize("cast", list(CASTS))
def test_a_tensor_of_another_dtype_fails_before_any_value(bf16_merge, tmp_path, cast, keep_history):
    base, adapter, root = bf16_merge
    folder = rewritten(
        root / "merged",
        tmp_path / "cast",
        lambda name, t: CASTS[cast](t) if name.endswith("q_proj.weight") else t,
        keep_history,
    )
    report = verify(folder, base, [adapter])
    assert not report.ok
    stored = load_file(folder / "model.safetensors")[Q].dtype
    assert [line.split(" ")[0] for line in report.mismatched] == [n for n in TOUCHED if "q_proj" in n]
    assert f"{Q} is " in report.mismatched[0] and "but the merge gives BF16 [64, 64]" in report.mismatched[0]
    assert not report.differing, (stored, report.differing)
    if keep_history and cast == "int8 zeros":
        result = run("verify", folder, adapter, "--base", base)
        assert result.exit_code == 1
        lines = [line for line in result.stdout.splitlines() if line.startswith("mismatch: ")]
        assert lines == [f"mismatch: {line}" for line in report.mismatched], result.stdout
        assert "2 of another shape or dtype" in result.stdout


def test_a_whole_model_cast_is_compared_in_its_dtype_and_an_overflow_fails(tmp_path):
    """A model cast to fp16 after bonemerge merged it in fp32 (its bonemerge.json kept): the
    history no longer describes its dtype, so the check is by tolerance, and the value that
    became Inf is a difference although the fp16 recomputation overflows too."""
    tensors = toy.base_tensors()
    tensors[Q][3, 5] = 70000.0
    base = toy.write_base(tmp_path / "base", tensors)
    adapter = toy.write_adapter(tmp_path / "adapter")
    merge(base, [adapter], tmp_path / "merged")
    assert verify(tmp_path / "merged", base, [adapter]).mode == "exact"
    folder = rewritten(tmp_path / "merged", tmp_path / "fp16", lambda name, t: t.half())
    assert load_file(folder / "model.safetensors")[Q].isinf().sum() == 1
    report = verify(folder, base, [adapter])
    assert report.mode == "tolerance" and "into its dtype" in report.reason
    assert not report.ok and not report.mismatched
    assert [(d.name, d.elements) for d in report.differing] == [(Q, 1)]
    assert report.differing[0].describe(False) == (
        f"{Q}: 1 element beyond its rounding bound, stored as Inf or NaN where the merge is finite"
    )


def test_merge_dtype_is_still_checked_bit_for_bit(tmp_path, base, adapter):
    merge(base, [adapter], tmp_path / "bf16", dtype="bf16")
    report = verify(tmp_path / "bf16", base, [adapter])
    assert report.ok and report.mode == "exact" and not report.mismatched, report


def cancelling_lora(folder: Path, seed: int = 0) -> Path:
    """An r=2 LoRA on one q_proj whose two rank components are ~1e8 and cancel: ΔW stays of the
    weight's size while |B|·|A|, and with it the rounding bound, is several units wide."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(1, 64, generator=generator).sign() * 1e8
    a_matrix = torch.cat([a, a + torch.randn(1, 64, generator=generator)])
    b = torch.randn(64, 1, generator=generator).sign() * 0.05
    tensors = {
        "model.layers.0.self_attn.q_proj.lora_A.weight": a_matrix,
        "model.layers.0.self_attn.q_proj.lora_B.weight": torch.cat([b, -b], dim=1),
    }
    return write_lora(folder, tensors, {"r": 2, "lora_alpha": 2})


def test_an_inflated_bound_is_not_checkable(tmp_path, base):
    lora = cancelling_lora(tmp_path / "lora")
    merge(base, [lora], tmp_path / "merged")
    assert verify(tmp_path / "merged", base, [lora]).ok, "bonemerge's own merge is checked bit for bit"
    generator = torch.Generator().manual_seed(5)
    noise = rewritten(
        tmp_path / "merged",
        tmp_path / "noise",
        lambda name, t: torch.randn(t.shape, generator=generator) * 0.05 if name == Q else t,
        keep_history=False,
    )
    report = verify(noise, base, [lora])
    assert report.mode == "tolerance" and not report.ok and not report.differing
    assert [(u.name, u.elements) for u in report.unchecked] == [(Q, 64 * 64)]
    assert report.unchecked[0].max_ratio > 10
    result = run("verify", noise, lora, "--base", base)
    assert result.exit_code == 1
    assert "1 not checkable" in result.stdout
    line = next(line for line in result.stdout.splitlines() if line.startswith("not checkable: "))
    assert f"{Q}: 4,096 elements differ from the exact merge" in line and "more than 1/16" in line
    # The merge itself, without its history, cannot be vouched for either: the bound is as wide.
    loose = rewritten(tmp_path / "merged", tmp_path / "loose", lambda name, t: t, keep_history=False)
    assert [u.name for u in verify(loose, base, [lora]).unchecked] == [Q]


def test_an_ordinary_bound_is_far_below_the_threshold(tmp_path, base):
    """A plain LoRA's elements that differ from the correctly rounded value (fp32 arithmetic)
    stay checkable: their bound is a tiny fraction of their value."""
    lora = write_lora(
        tmp_path / "lora",
        {
            "model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 64) * 0.05,
            "model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(64, 4) * 0.05,
        },
    )
    merge(base, [lora], tmp_path / "merged")
    (tmp_path / "merged" / "bonemerge.json").unlink()
    report = verify(tmp_path / "merged", base, [lora])
    assert report.ok and report.within_rounding == 1 and not report.unchecked, report
    assert CHECKABLE == 1 / 16


@pytest.mark.parametrize(
    ("elements", "max_abs", "max_ulp", "exact", "expected"),
    [
        (1, 0.25, 2.0, False, "T: 1 element beyond its rounding bound, largest 0.25 (2 ulp of the element)"),
        (
            4096,
            0.239,
            3.1e7,
            False,
            "T: 4,096 elements beyond their rounding bound, largest 0.239 (more than 10⁶ ulp",
        ),
        (
            2,
            1e-3,
            1234.4,
            True,
            "T: 2 elements no difference allowed, largest 0.001 (1,234 ulp of the element)",
        ),
        (3, 1e-3, 37.5, True, "T: 3 elements no difference allowed, largest 0.001 (37.5 ulp of the element)"),
    ],
)
def test_differences_are_written_for_people(elements, max_abs, max_ulp, exact, expected):
    assert Difference("T", elements, max_abs, max_ulp).describe(exact).startswith(expected)


def test_a_large_error_is_not_printed_as_a_huge_ulp_count(tmp_path, base, adapter):
    merge(base, [adapter], tmp_path / "merged")
    folder = rewritten(
        tmp_path / "merged",
        tmp_path / "edited",
        lambda name, t: (
            t.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(3e38)) if name == Q else t
        ),
    )
    result = run("verify", folder, adapter, "--base", base)
    assert result.exit_code == 1
    assert f"differs: {Q}: 1 element no difference allowed, largest 3e+38 (more than 10⁶ ulp" in result.stdout
    assert "elements no" not in result.stdout and "e+38 ulp" not in result.stdout


def test_counts_have_their_plural():
    assert ChecksumReport("m", matching=["a"]).counts() == "checksums: 1 file intact, 0 differing, 0 missing"
    assert ChecksumReport("m", matching=["a", "b"]).counts().startswith("checksums: 2 files intact")


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_merges_stay_checkable(tmp_path, llama, dora):
    """PEFT's own merges of LoRA and DoRA, embeddings included, pass in tolerance mode with
    every element checkable: the threshold does not catch legitimate rounding."""
    from peft import LoraConfig

    from tests import lora_oracle, oracle
    from tests.conftest import llama_factory

    factory = llama_factory(llama)
    config = LoraConfig(
        r=8, lora_alpha=16, use_dora=dora, target_modules=["q_proj", "down_proj", "embed_tokens"]
    )
    adapter = lora_oracle.train_lora(factory, config, tmp_path / "adapter", seed=2)
    oracle.peft_model(factory, [adapter]).merge_and_unload(progressbar=False).save_pretrained(
        tmp_path / "peft"
    )
    report = verify(tmp_path / "peft", llama, [adapter])
    assert report.mode == "tolerance" and report.ok and not report.unchecked, report
    assert report.within_rounding > 0
