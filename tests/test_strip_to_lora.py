"""`bonemerge strip --to lora`: Bone and MiSS adapters as standard PEFT LoRA adapters.

Default and mini convert exactly (ΔW = Bᵀ·S is a rank-r product of one-hot selections), so a
PeftModel with the converted LoRA must reproduce one with the original adapter, and merging
either must write the same bytes. Bat's update depends on the base and is approximated by a
truncated SVD, whose error must be what the report says and must fall as the rank grows.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import BoneConfig, MissConfig, PeftModel

from bonemerge import merge, strip
from tests import oracle
from tests.cliutil import fails, run
from tests.conftest import llama_factory, minilm_factory

BERT_TARGETS = ["query", "value", "dense"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# r=100 does not divide BERT's 384/1536 inputs, r=48 not Llama's 128/352; mini both ways round.
EXACT = [
    ("bone-r100", lambda t: BoneConfig(r=100, target_modules=t)),
    ("miss-r48", lambda t: MissConfig(r=48, target_modules=t)),
    ("mini-small", lambda t: MissConfig(r=48, mini_r=8, init_weights="mini", target_modules=t)),
    ("mini-large", lambda t: MissConfig(r=8, mini_r=32, init_weights="mini", target_modules=t)),
]


def load(factory, adapter: Path):
    """A PeftModel with `adapter`, and the warnings PEFT raised while loading it (missing or
    unexpected keys among them)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(factory(), adapter).eval()
    return model, [str(w.message) for w in caught if "key" in str(w.message).lower()]


def bert_out(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


@pytest.fixture(scope="module")
def batch(minilm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm)
    return tokenizer(["serve it on a LoRA engine", "exactly"], return_tensors="pt", padding=True)


@pytest.mark.parametrize(("case", "make"), EXACT, ids=[c for c, _ in EXACT])
def test_exact_conversion_on_minilm(tmp_path, minilm, batch, case, make):
    factory = minilm_factory(minilm)
    original = oracle.train_adapter(factory, make(BERT_TARGETS), tmp_path / "original", seed=3)
    report = strip(original, tmp_path / "lora", to="lora", base=minilm)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    r = config["r"]
    assert (config["peft_type"], config["lora_alpha"], config["use_rslora"]) == ("LORA", r, False)
    expected_rank = {"mini-small": 8, "mini-large": 8}.get(case, 48 if case.startswith("miss") else 100)
    assert r == expected_rank, "mini converts at min(r, mini_r)"
    assert report.conversion["to"] == "LORA" and report.conversion["errors"] == {}
    assert any("exactly" in note for note in report.notes)

    lora_model, complaints = load(factory, tmp_path / "lora")
    assert complaints == []
    original_model, _ = load(factory, original)
    ours, theirs = bert_out(lora_model, batch), bert_out(original_model, batch)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))

    # Merging the LoRA gives the bytes merging the original gives (scale 1, one term per element).
    merge(minilm, [original], tmp_path / "from-original")
    merge(minilm, [tmp_path / "lora"], tmp_path / "from-lora")
    assert (tmp_path / "from-original" / "model.safetensors").read_bytes() == (
        tmp_path / "from-lora" / "model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize(("case", "make"), EXACT[1:3], ids=[c for c, _ in EXACT[1:3]])
def test_exact_conversion_on_llama_with_layers(tmp_path, llama, case, make):
    factory = llama_factory(llama)
    original = oracle.train_adapter(factory, make(LLAMA_TARGETS), tmp_path / "original", seed=4)
    (original / "adapter_config.json").write_text(
        json.dumps(
            json.loads((original / "adapter_config.json").read_text())
            | {"base_model_name_or_path": str(llama)}
        )
    )
    # no --base: the config names it
    assert run("strip", original, "--to", "lora", "--layers", "1", "-o", tmp_path / "lora").exit_code == 0
    lora_model, complaints = load(factory, tmp_path / "lora")
    assert complaints == []
    assert all(".layers.1." in name for name, _ in lora_model.named_parameters() if "lora_" in name)
    ids = torch.tensor([[1, 5, 9, 200, 17, 3]])
    reference = PeftModel.from_pretrained(factory(), original).eval()
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if "_block" in name and ".layers.1." not in name:
                parameter.zero_()
        ours, theirs = lora_model(ids).logits.float(), reference(ids).logits.float()
    assert torch.allclose(ours, theirs, atol=2e-2 * float(theirs.abs().max()))
    merge(llama, [tmp_path / "lora"], tmp_path / "a")
    strip(original, tmp_path / "layer1", layers="1")
    merge(llama, [tmp_path / "layer1"], tmp_path / "b")
    for shard in sorted((tmp_path / "a").glob("*.safetensors")):
        assert shard.read_bytes() == (tmp_path / "b" / shard.name).read_bytes()


def test_bat_needs_base_and_rank(tmp_path, minilm):
    factory = minilm_factory(minilm)
    bat = oracle.train_adapter(
        factory, BoneConfig(r=32, init_weights="bat", target_modules=["query"]), tmp_path / "bat", seed=5
    )
    fails(
        tmp_path, "strip", bat, "--to", "lora", "--base", minilm, "-o", tmp_path / "out", expect=("--rank",)
    )
    config = json.loads((bat / "adapter_config.json").read_text())
    (bat / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": None}))
    fails(tmp_path, "strip", bat, "--to", "lora", "-o", tmp_path / "out", expect=("base model", "--base"))
    fails(
        tmp_path,
        "strip",
        bat,
        "--to",
        "lora",
        "--base",
        minilm,
        "--rank",
        "auto",
        "-o",
        tmp_path / "out",
        expect=("--max-error",),
    )


def test_rank_refused_for_exact_conversion(tmp_path, minilm):
    factory = minilm_factory(minilm)
    bone = oracle.train_adapter(
        factory, BoneConfig(r=32, target_modules=["query"]), tmp_path / "bone", seed=5
    )
    fails(
        tmp_path,
        "strip",
        bone,
        "--to",
        "lora",
        "--base",
        minilm,
        "--rank",
        "4",
        "-o",
        tmp_path / "out",
        expect=("exactly", "Bat adapters only"),
    )


def _delta_error(factory, bat: Path, lora: Path) -> float:
    """Relative Frobenius error of the LoRA's ΔW against the Bat adapter's, over all modules."""
    base = factory().state_dict()
    original = PeftModel.from_pretrained(factory(), bat).merge_and_unload().state_dict()
    converted = PeftModel.from_pretrained(factory(), lora).merge_and_unload().state_dict()
    wrong = total = 0.0
    for name, weight in base.items():
        d_true = original[name].double() - weight.double()
        if d_true.abs().max() == 0:
            continue
        wrong += float((converted[name].double() - original[name].double()).square().sum())
        total += float(d_true.square().sum())
    return (wrong / total) ** 0.5


def test_bat_error_is_reported_and_falls_with_rank(tmp_path, minilm):
    factory = minilm_factory(minilm)
    config = BoneConfig(r=32, init_weights="bat", target_modules=["query", "value"])
    bat = oracle.train_adapter(factory, config, tmp_path / "bat", seed=6, scale=0.05)
    errors = []
    for k in (8, 64, 384):
        report = strip(bat, tmp_path / f"lora{k}", to="lora", base=minilm, rank=k)
        measured = _delta_error(factory, bat, tmp_path / f"lora{k}")
        print(
            f"Bat r=32 -> LoRA rank {k}: reported {report.conversion['error']:.4g}, measured {measured:.4g}"
        )
        assert abs(measured - report.conversion["error"]) <= 0.02 * report.conversion["error"] + 1e-6
        _, complaints = load(factory, tmp_path / f"lora{k}")
        assert complaints == []
        errors.append(report.conversion["error"])
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-6, "full rank reproduces the update"

    auto = strip(bat, tmp_path / "auto", to="lora", base=minilm, rank="auto", max_error=0.3)
    assert max(auto.conversion["errors"].values()) <= 0.3
    config = json.loads((tmp_path / "auto" / "adapter_config.json").read_text())
    ranks = set(auto.conversion["ranks"].values())
    assert config["r"] in ranks
    for pattern, k in config["rank_pattern"].items():
        assert config["alpha_pattern"][pattern] == k, "every module keeps scale 1"
    _, complaints = load(factory, tmp_path / "auto")
    assert complaints == []
    assert _delta_error(factory, bat, tmp_path / "auto") <= 0.3


def test_training_checkpoint_converts_with_its_own_base(tmp_path, minilm, batch):
    from safetensors.torch import save_file

    factory = minilm_factory(minilm)
    from peft import get_peft_model

    model = get_peft_model(factory(), MissConfig(r=48, target_modules=BERT_TARGETS))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "_block" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    strip(folder, tmp_path / "lora", to="lora")
    lora_model, complaints = load(factory, tmp_path / "lora")
    assert complaints == []
    model.eval()
    ours, theirs = bert_out(lora_model, batch), bert_out(model, batch)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))
