"""`bonemerge merge` against PEFT's own `merge_and_unload()`, on real and synthetic models.

Default and mini merges must equal PEFT bit for bit. Bat merges round once where PEFT rounds
twice, so they must be at least as close as PEFT's to a float64 computation of the same maths.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import BoneConfig, MissConfig

from bonemerge import merge
from bonemerge.methods.bone import reference_merge
from tests import oracle
from tests.conftest import llama_factory, minilm_factory, tree_digest

BERT_TARGETS = ["query", "value", "dense"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# (id, config) pairs; r=100 does not divide BERT's 384/1536 inputs, r=64 not Llama's 352.
BERT_CASES = [
    ("bone-r100", lambda: BoneConfig(r=100, target_modules=BERT_TARGETS)),
    ("bat-r32", lambda: BoneConfig(r=32, init_weights="bat", target_modules=BERT_TARGETS)),
    ("miss-r64", lambda: MissConfig(r=64, target_modules=BERT_TARGETS)),
    ("miss-bat-r32", lambda: MissConfig(r=32, init_weights="bat", target_modules=BERT_TARGETS)),
    ("miss-mini-r48", lambda: MissConfig(r=48, mini_r=8, init_weights="mini", target_modules=BERT_TARGETS)),
]
LLAMA_CASES = [
    ("bone-r64", lambda: BoneConfig(r=64, target_modules=LLAMA_TARGETS)),
    ("bat-r32", lambda: BoneConfig(r=32, init_weights="bat", target_modules=LLAMA_TARGETS)),
    ("miss-r48", lambda: MissConfig(r=48, target_modules=LLAMA_TARGETS)),
    ("miss-bat-r16", lambda: MissConfig(r=16, init_weights="bat", target_modules=LLAMA_TARGETS)),
    ("miss-mini-r64", lambda: MissConfig(r=64, mini_r=16, init_weights="mini", target_modules=LLAMA_TARGETS)),
]


def float64_reference(
    base: dict[str, torch.Tensor], adapters: list[Path], prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Every merged weight computed in float64 from the stored base and blocks, in order."""
    result: dict[str, torch.Tensor] = {}
    for adapter in adapters:
        variant = oracle.adapter_variant(adapter)
        for module, block in oracle.adapter_blocks(adapter).items():
            name = module.removeprefix(prefix) + ".weight"
            current = result.get(name, base[name].double())
            result[name] = reference_merge(current, block.double(), variant)
    return result


def squared_error(
    tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], prefix: str = ""
) -> float:
    return sum(float(((tensors[prefix + n].double() - ref) ** 2).sum()) for n, ref in reference.items())


def compare_with_peft(ours: dict, peft: dict, prefix: str = "") -> list[str]:
    """Names PEFT has whose tensor differs from ours in dtype, shape or any bit."""
    differing = []
    for name, theirs in peft.items():
        mine = ours[name.removeprefix(prefix)]
        if mine.dtype != theirs.dtype or not torch.equal(mine, theirs):
            differing.append(name)
    return differing


def run_case(tmp_path: Path, base: Path, factory, config, adapters_seeds=(7,), prefix: str = "", **options):
    adapters = [
        oracle.train_adapter(factory, config(), tmp_path / f"adapter{i}", seed=seed)
        for i, seed in enumerate(adapters_seeds)
    ]
    before = tree_digest(base)
    report = merge(base, adapters, tmp_path / "merged", **options)
    assert tree_digest(base) == before, "the base was modified"
    ours = oracle.read_folder(tmp_path / "merged")
    peft = oracle.peft_merged(factory, adapters)
    return adapters, report, ours, peft


@pytest.mark.parametrize(("case", "config"), BERT_CASES, ids=[c[0] for c in BERT_CASES])
def test_minilm_matches_peft(tmp_path, minilm, case, config):
    factory = minilm_factory(minilm)
    adapters, report, ours, peft = run_case(tmp_path, minilm, factory, config)
    base = oracle.read_folder(minilm)
    assert set(ours) == set(base)
    assert report.tensors_merged == 6 * 5 + 1  # query, value, 3 dense per layer + pooler.dense
    if "bat" not in case:
        assert compare_with_peft(ours, peft) == []
    else:
        reference = float64_reference(base, adapters)
        assert squared_error(ours, reference) <= squared_error(peft, reference)
        assert not compare_with_peft(
            {k: v for k, v in ours.items() if k not in reference},
            {k: v for k, v in peft.items() if k not in reference},
        )


@pytest.mark.parametrize(("case", "config"), LLAMA_CASES, ids=[c[0] for c in LLAMA_CASES])
def test_sharded_bf16_llama_matches_peft(tmp_path, llama, case, config):
    factory = llama_factory(llama)
    adapters, report, ours, peft = run_case(tmp_path, llama, factory, config)
    assert sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors")) == sorted(
        p.name for p in llama.glob("*.safetensors")
    )
    assert report.tensors_merged == 2 * 7
    assert all(t.dtype == torch.bfloat16 for t in ours.values())
    if "bat" not in case:
        assert compare_with_peft(ours, peft) == []
    else:
        reference = float64_reference(oracle.read_folder(llama), adapters)
        ours_error, peft_error = squared_error(ours, reference), squared_error(peft, reference)
        assert ours_error <= peft_error, (ours_error, peft_error)


def test_two_adapters_merge_in_order(tmp_path, minilm):
    """fp32 base: with fp32 maths PEFT's sequence is reproduced exactly; auto rounds once and is closer."""
    factory = minilm_factory(minilm)
    config = BERT_CASES[0][1]
    adapters, _, exact, peft = run_case(
        tmp_path, minilm, factory, config, adapters_seeds=(7, 8), precision="fp32"
    )
    assert compare_with_peft(exact, peft) == []
    merge(minilm, adapters, tmp_path / "auto")
    auto = oracle.read_folder(tmp_path / "auto")
    reference = float64_reference(oracle.read_folder(minilm), adapters)
    assert squared_error(auto, reference) <= squared_error(exact, reference)


def test_two_bat_adapters_bf16_are_closer_than_peft(tmp_path, llama):
    """Bat merges do not commute; the order given is the order applied, like PEFT's adapter_names."""
    factory = llama_factory(llama)
    config = LLAMA_CASES[1][1]
    adapters, _, ours, peft = run_case(tmp_path, llama, factory, config, adapters_seeds=(3, 4))
    reference = float64_reference(oracle.read_folder(llama), adapters)
    assert squared_error(ours, reference) <= squared_error(peft, reference)
    swapped = float64_reference(oracle.read_folder(llama), adapters[::-1])
    assert squared_error(ours, reference) < squared_error(ours, swapped)


def test_modules_to_save_and_prefix_difference(tmp_path, minilm):
    """Adapter trained on BertForSequenceClassification (`bert.` names, a new classifier head),
    merged into the BertModel checkpoint, which has neither."""
    factory = minilm_factory(minilm, head=True)
    config = lambda: MissConfig(r=64, target_modules=BERT_TARGETS, modules_to_save=["classifier"])  # noqa: E731
    _, report, ours, peft = run_case(tmp_path, minilm, factory, config, prefix="bert.")
    assert compare_with_peft(ours, peft, prefix="bert.") == []
    assert {"classifier.weight", "classifier.bias"} <= set(ours)
    assert any("classifier.weight is added" in note for note in report.notes)
    assert any("bert." in note and "matched" in note for note in report.notes)


def test_merged_minilm_loads_and_equals_unmerged_peft(tmp_path, minilm):
    from transformers import AutoModel, AutoTokenizer

    factory = minilm_factory(minilm)
    adapter = oracle.train_adapter(factory, BERT_CASES[0][1](), tmp_path / "adapter", seed=5)
    merge(minilm, [adapter], tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    batch = tokenizer(
        ["bonemerge streams checkpoints", "a second sentence"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        merged = AutoModel.from_pretrained(tmp_path / "merged").eval()(**batch).last_hidden_state
        unmerged = oracle.peft_model(factory, [adapter])(**batch).last_hidden_state
    assert torch.allclose(merged, unmerged, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "merged" / "1_Pooling" / "config.json").is_file()


def test_merged_llama_loads_and_equals_unmerged_peft(tmp_path, llama):
    from transformers import AutoModelForCausalLM

    factory = llama_factory(llama)
    adapter = oracle.train_adapter(factory, LLAMA_CASES[0][1](), tmp_path / "adapter", seed=9)
    merge(llama, [adapter], tmp_path / "merged", max_shard_size="200KB")
    ids = torch.tensor([[1, 5, 9, 200, 17, 3]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16)(ids).logits
        unmerged = oracle.peft_model(factory, [adapter])(ids).logits
    assert merged.dtype == torch.bfloat16
    scale = unmerged.float().abs().max()
    assert (merged.float() - unmerged.float()).abs().max() <= 0.02 * scale
