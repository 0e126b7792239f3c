"""`bonemerge strip`: reduced and converted adapters that PEFT loads as they are."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import BoneConfig, MissConfig, PeftModel

from bonemerge import strip
from bonemerge.errors import AdapterError
from tests import oracle
from tests.conftest import minilm_factory

TARGETS = ["query", "value", "dense"]


@pytest.fixture(scope="module")
def sentences(minilm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm)
    return tokenizer(["strip what you do not need", "keep the rest"], return_tensors="pt", padding=True)


def load_quietly(factory, adapter: Path):
    """PeftModel.from_pretrained, returning the warnings it raised about the adapter (PEFT's own
    Bone deprecation notice and transformers' API deprecations aside)."""
    base = factory()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, adapter).eval()
    return model, [
        str(w.message)
        for w in caught
        if issubclass(w.category, UserWarning) and "Bone will be removed" not in str(w.message)
    ]


def outputs(model, batch) -> torch.Tensor:
    with torch.no_grad():
        result = model(**batch)
    return (
        getattr(result, "last_hidden_state", None) if hasattr(result, "last_hidden_state") else result.logits
    )


def restricted(factory, adapter: Path, keep) -> torch.nn.Module:
    """The original adapter with every block outside `keep` zeroed (which is a no-op block)."""
    model = PeftModel.from_pretrained(factory(), adapter).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "_block" in name and not keep(name):
                parameter.zero_()
    return model


@pytest.mark.parametrize(
    ("options", "keep"),
    [
        ({"layers": "0-2,5"}, lambda n: any(f"layer.{i}." in n for i in (0, 1, 2, 5))),
        ({"include": r"attention", "exclude": r"output\.dense"}, lambda n: "attention.self" in n),
        ({"include": r"layer\.3\.intermediate"}, lambda n: "layer.3.intermediate" in n),
    ],
    ids=["layers", "include-exclude", "one-module"],
)
@pytest.mark.parametrize("method", ["bone", "bat"])
def test_reduced_adapter_loads_and_matches_restricted_original(
    tmp_path, minilm, sentences, options, keep, method
):
    factory = minilm_factory(minilm)
    config = BoneConfig(r=32, init_weights="bat" if method == "bat" else True, target_modules=TARGETS)
    adapter = oracle.train_adapter(factory, config, tmp_path / "adapter", seed=1)
    report = strip(adapter, tmp_path / "stripped", **options)
    model, caught = load_quietly(factory, tmp_path / "stripped")
    assert caught == []
    assert torch.equal(outputs(model, sentences), outputs(restricted(factory, adapter, keep), sentences))
    kept = [k for k in oracle.read_folder(tmp_path / "stripped") if k.endswith("_block")]
    assert len(kept) == sum(keep(k) for k in oracle.read_folder(adapter)) and report.notes[0].startswith(
        f"kept {len(kept)}"
    )
    written = json.loads((tmp_path / "stripped" / "adapter_config.json").read_text())
    assert written["target_modules"] == sorted(
        k.removeprefix("base_model.model.").removesuffix(".bone_block") for k in kept
    )
    if "layers" in options:
        assert written["layers_to_transform"] == [0, 1, 2, 5] and written["layers_pattern"] == "layer"


@pytest.mark.parametrize("variant", [True, "bat"])
def test_bone_to_miss_gives_identical_outputs(tmp_path, minilm, sentences, variant):
    factory = minilm_factory(minilm)
    adapter = oracle.train_adapter(
        factory, BoneConfig(r=32, init_weights=variant, target_modules=TARGETS), tmp_path / "bone", seed=2
    )
    strip(adapter, tmp_path / "miss", to="miss")
    config = json.loads((tmp_path / "miss" / "adapter_config.json").read_text())
    assert config["peft_type"] == "MISS"
    assert all(k.endswith(".miss_block") for k in oracle.read_folder(tmp_path / "miss"))
    miss, caught = load_quietly(factory, tmp_path / "miss")
    assert caught == []
    assert type(miss.base_model).__name__ == "MissModel"
    bone, _ = load_quietly(factory, adapter)
    assert torch.equal(outputs(miss, sentences), outputs(bone, sentences))
    strip(tmp_path / "miss", tmp_path / "bone-again", to="bone")
    again = oracle.read_folder(tmp_path / "bone-again")
    assert all(torch.equal(again[k], v) for k, v in oracle.read_folder(adapter).items())
    assert "mini_r" not in json.loads((tmp_path / "bone-again" / "adapter_config.json").read_text())


def test_mini_cannot_become_bone(tmp_path, minilm):
    factory = minilm_factory(minilm)
    config = MissConfig(r=16, mini_r=4, init_weights="mini", target_modules=["query"])
    adapter = oracle.train_adapter(factory, config, tmp_path / "mini", seed=3)
    with pytest.raises(AdapterError, match="mini adapter, which Bone cannot express"):
        strip(adapter, tmp_path / "out", to="bone")
    assert not (tmp_path / "out").exists()


def test_dtype_and_modules_to_save(tmp_path, minilm, sentences):
    factory = minilm_factory(minilm, head=True)
    config = MissConfig(r=64, target_modules=["query"], modules_to_save=["classifier"])
    adapter = oracle.train_adapter(factory, config, tmp_path / "adapter", seed=4)
    strip(adapter, tmp_path / "half", dtype="bfloat16")
    half = oracle.read_folder(tmp_path / "half")
    assert (
        all(t.dtype == torch.bfloat16 for t in half.values()) and "base_model.model.classifier.weight" in half
    )
    strip(adapter, tmp_path / "blocks-only", drop_modules_to_save=True)
    written = oracle.read_folder(tmp_path / "blocks-only")
    assert not any("classifier" in k for k in written)
    assert (
        json.loads((tmp_path / "blocks-only" / "adapter_config.json").read_text())["modules_to_save"] is None
    )
    _, caught = load_quietly(factory, tmp_path / "blocks-only")
    assert caught == []
    assert "library_name: peft" in (tmp_path / "blocks-only" / "README.md").read_text()


def test_filters_that_keep_nothing(tmp_path, minilm):
    adapter = oracle.train_adapter(
        minilm_factory(minilm), MissConfig(r=64, target_modules=["query"]), tmp_path / "a", seed=5
    )
    with pytest.raises(AdapterError, match="keep none of the 6 blocks"):
        strip(adapter, tmp_path / "out", layers="40-50")


def test_a_config_that_overstates_the_modules_does_warn(tmp_path, minilm):
    """Control for the tests above: PEFT does warn when a config names modules that are missing."""
    factory = minilm_factory(minilm)
    adapter = oracle.train_adapter(factory, MissConfig(r=64, target_modules=TARGETS), tmp_path / "a", seed=6)
    strip(adapter, tmp_path / "stripped", layers="0")
    config = json.loads((tmp_path / "stripped" / "adapter_config.json").read_text())
    original = json.loads((adapter / "adapter_config.json").read_text())
    (tmp_path / "stripped" / "adapter_config.json").write_text(
        json.dumps(config | {"target_modules": original["target_modules"], "layers_to_transform": None})
    )
    _, caught = load_quietly(factory, tmp_path / "stripped")
    assert any("missing adapter keys" in message for message in caught)
