"""Full PeftModel state dicts (what trainers save): merge, unload and strip against PEFT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import MissConfig, get_peft_model
from safetensors.torch import save_file

from bonemerge import merge, strip, unload
from bonemerge.cli import main
from bonemerge.errors import AdapterError, BonemergeError
from tests import oracle
from tests.conftest import minilm_factory
from tests.test_merge_peft import compare_with_peft

CONFIG = dict(r=64, target_modules=["query", "value"], modules_to_save=["classifier"])


def trained(factory, config, extra: dict[str, MissConfig] | None = None):
    model = get_peft_model(factory(), config)
    for name, more in (extra or {}).items():
        model.add_adapter(name, more)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "_block" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
            elif ".modules_to_save." in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def save_state(model, folder: Path, shards: int = 1, base: Path | None = None) -> Path:
    """The whole PeftModel state dict, as a trainer checkpoints it (optionally sharded)."""
    folder.mkdir(parents=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if shards == 1:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        names = sorted(state)
        weight_map = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: state[n] for n in names[i::shards]}, folder / file, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(names[i::shards], file)
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    if base is not None:
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
            shutil.copy(base / name, folder / name)
    (folder / "trainer_state.json").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def classifier(minilm):
    factory = minilm_factory(minilm, head=True)
    return factory, trained(factory, MissConfig(**CONFIG))


@pytest.mark.parametrize("shards", [1, 3])
def test_merge_equals_peft_merge_and_unload(tmp_path, minilm, classifier, shards):
    factory, model = classifier
    checkpoint = save_state(model, tmp_path / "ckpt", shards=shards, base=minilm)
    report = merge(checkpoint, [], tmp_path / "merged")
    ours = oracle.read_folder(tmp_path / "merged")
    expected = {
        k: v.detach().clone()
        for k, v in trained(factory, MissConfig(**CONFIG)).merge_and_unload().state_dict().items()
    }
    assert compare_with_peft(ours, expected) == []
    assert set(ours) == set(expected) | ({"bert.embeddings.position_ids"} & set(ours))
    assert report.tensors_merged == 12
    out = tmp_path / "merged"
    assert (out / "tokenizer.json").is_file() and not (out / "trainer_state.json").exists()
    assert len(list(out.glob("*.safetensors"))) == shards


def test_unload_equals_peft_unload(tmp_path, minilm, classifier):
    factory, model = classifier
    checkpoint = save_state(model, tmp_path / "ckpt", base=minilm)
    unload(checkpoint, tmp_path / "unloaded")
    ours = oracle.read_folder(tmp_path / "unloaded")
    expected = {
        k: v.detach().clone() for k, v in trained(factory, MissConfig(**CONFIG)).unload().state_dict().items()
    }
    assert compare_with_peft(ours, expected) == []
    unload(checkpoint, tmp_path / "original", original_modules=True)
    original = oracle.read_folder(tmp_path / "original")
    state = model.state_dict()
    assert torch.equal(
        original["classifier.weight"], state["base_model.model.classifier.original_module.weight"]
    )
    assert not torch.equal(original["classifier.weight"], ours["classifier.weight"])
    assert torch.equal(
        original["bert.encoder.layer.0.attention.self.query.weight"],
        ours["bert.encoder.layer.0.attention.self.query.weight"],
    )


def test_several_adapters_need_a_name(tmp_path, minilm):
    factory = minilm_factory(minilm)
    model = trained(
        factory,
        MissConfig(r=64, target_modules=["query"]),
        {"other": MissConfig(r=32, target_modules=["key"])},
    )
    checkpoint = save_state(model, tmp_path / "ckpt")
    with pytest.raises(
        AdapterError, match="holds the adapters default, other; choose one with --adapter-name"
    ):
        merge(checkpoint, [], tmp_path / "merged")
    merge(checkpoint, [], tmp_path / "merged", adapter_name="other")
    ours = oracle.read_folder(tmp_path / "merged")
    model.set_adapter("other")
    expected = {
        k: v.detach().clone() for k, v in model.merge_and_unload(adapter_names=["other"]).state_dict().items()
    }
    assert compare_with_peft(ours, expected) == []
    with pytest.raises(AdapterError, match="no adapter named 'third'"):
        merge(checkpoint, [], tmp_path / "x", adapter_name="third")


def test_config_is_inferred_or_read_from_beside_the_checkpoint(tmp_path, minilm):
    factory = minilm_factory(minilm)
    model = trained(
        factory, MissConfig(r=48, mini_r=8, init_weights="mini", target_modules=["query", "dense"])
    )
    checkpoint = save_state(model, tmp_path / "ckpt")
    info = CliRunner().invoke(main, ["inspect", str(checkpoint), "--json"])
    described = json.loads(info.stdout)["adapters"]["default"]
    assert (described["variant"], described["r"], described["mini_r"]) == ("mini", 48, 8)
    model.peft_config["default"].save_pretrained(checkpoint)
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    (checkpoint / "adapter_config.json").write_text(json.dumps(config | {"r": 16}))
    with pytest.raises(AdapterError, match="r=16"):
        merge(checkpoint, [], tmp_path / "merged")


def test_strip_extracts_the_adapter_peft_would_save(tmp_path, minilm, classifier):
    _, model = classifier
    checkpoint = save_state(model, tmp_path / "ckpt")
    model.save_pretrained(tmp_path / "saved")
    strip(checkpoint, tmp_path / "extracted")
    assert oracle.read_folder(tmp_path / "extracted").keys() == oracle.read_folder(tmp_path / "saved").keys()
    for name, tensor in oracle.read_folder(tmp_path / "saved").items():
        assert torch.equal(oracle.read_folder(tmp_path / "extracted")[name], tensor), name
    config = json.loads((tmp_path / "extracted" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["modules_to_save"]) == ("MISS", 64, ["classifier"])


def test_plain_model_is_not_a_training_checkpoint(tmp_path, minilm):
    with pytest.raises(BonemergeError, match="is a model, not a full PEFT checkpoint"):
        unload(minilm, tmp_path / "out")
    with pytest.raises(BonemergeError, match="pass at least one adapter"):
        merge(minilm, [], tmp_path / "out")


def test_mixed_names_are_refused(tmp_path, minilm, classifier):
    _, model = classifier
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    state["encoder.stray.weight"] = torch.zeros(2)
    (tmp_path / "ckpt").mkdir()
    save_file(state, tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(
        AdapterError, match=r"mixes PeftModel names with the plain name 'encoder\.stray\.weight'"
    ):
        merge(tmp_path / "ckpt", [], tmp_path / "out")
