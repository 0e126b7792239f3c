"""Merge features beyond the maths: tied and resized embeddings, biases, dtypes, sharding,
pickled adapters, and the files that travel with the weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import BoneConfig, MissConfig
from safetensors.torch import load_file, save_file

from bonemerge import merge
from tests import oracle
from tests.conftest import llama_factory, minilm_factory, save_llama
from tests.test_merge_peft import BERT_TARGETS, compare_with_peft


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory) -> Path:
    return save_llama(tmp_path_factory.mktemp("tied") / "base", tied=True)


@pytest.mark.parametrize("save_embeddings", [True, False], ids=["with-saved-lm-head", "blocks-only"])
def test_tied_lm_head_is_untied_and_matches_peft_forward(tmp_path, tied_llama, save_embeddings):
    """PEFT's merge would write the lm_head delta into the shared embedding too; bonemerge
    writes lm_head on its own and unties it, which is what the unmerged PeftModel computes."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    factory = llama_factory(tied_llama)
    model = get_peft_model(factory(), BoneConfig(r=32, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "_block" in name:
                parameter.normal_(0, 0.01)
    model.save_pretrained(tmp_path / "adapter", save_embedding_layers=save_embeddings)

    report = merge(tied_llama, [tmp_path / "adapter"], tmp_path / "merged")
    merged = oracle.read_folder(tmp_path / "merged")
    base = oracle.read_folder(tied_llama)
    assert "lm_head.weight" not in base and "lm_head.weight" in merged
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert report.tensors_merged == 3

    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16)(ids).logits
        peft = oracle.peft_model(factory, [tmp_path / "adapter"])(ids).logits
    assert (ours.float() - peft.float()).abs().max() <= 0.02 * peft.float().abs().max()


def test_resized_vocabulary_replaces_embeddings_and_config(tmp_path, llama):
    """PEFT saves both embeddings when the vocabulary was resized; they replace the base's."""

    def resized():
        model = llama_factory(llama)()
        torch.manual_seed(3)
        model.resize_token_embeddings(288)
        return model

    adapter = oracle.train_adapter(
        resized, MissConfig(r=32, target_modules=["q_proj", "v_proj"]), tmp_path / "a", seed=2
    )
    report = merge(llama, [adapter], tmp_path / "merged")
    ours = oracle.read_folder(tmp_path / "merged")
    assert ours["model.embed_tokens.weight"].shape == (288, 128)
    assert ours["lm_head.weight"].shape == (288, 128)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["vocab_size"] == 288
    assert compare_with_peft(ours, oracle.peft_merged(resized, [adapter])) == []
    assert any("changes shape" in note for note in report.notes)


def test_saved_bias_replaces_base_bias(tmp_path, minilm):
    """PEFT >= 0.21 saves trained biases as `<target>.base_layer.bias`; they replace the base's."""
    adapter = oracle.train_adapter(
        minilm_factory(minilm), BoneConfig(r=64, target_modules=["query"]), tmp_path / "a", seed=1
    )
    tensors = load_file(adapter / "adapter_model.safetensors")
    bias = torch.linspace(-1, 1, 384)
    tensors["base_model.model.encoder.layer.2.attention.self.query.base_layer.bias"] = bias
    save_file(tensors, adapter / "adapter_model.safetensors")
    merge(minilm, [adapter], tmp_path / "merged")
    merged = oracle.read_folder(tmp_path / "merged")
    assert torch.equal(merged["encoder.layer.2.attention.self.query.bias"], bias)
    base = oracle.read_folder(minilm)
    assert torch.equal(
        merged["encoder.layer.3.attention.self.query.bias"], base["encoder.layer.3.attention.self.query.bias"]
    )


def test_pickled_adapter_merges_like_safetensors(tmp_path, minilm):
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(minilm_factory(minilm)(), MissConfig(r=64, target_modules=BERT_TARGETS))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "_block" in name:
                parameter.normal_(0, 0.01)
    model.save_pretrained(tmp_path / "st")
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    merge(minilm, [tmp_path / "st"], tmp_path / "from-st")
    merge(minilm, [tmp_path / "bin"], tmp_path / "from-bin")
    for file in ("model.safetensors",):
        assert (tmp_path / "from-st" / file).read_bytes() == (tmp_path / "from-bin" / file).read_bytes()


@pytest.mark.parametrize(("dtype", "expected"), [("bfloat16", torch.bfloat16), ("float32", torch.float32)])
def test_dtype_option_converts_every_float_tensor(tmp_path, minilm, dtype, expected):
    adapter = oracle.train_adapter(
        minilm_factory(minilm), MissConfig(r=64, target_modules=["query"]), tmp_path / "a", seed=4
    )
    merge(minilm, [adapter], tmp_path / "merged", dtype=dtype)
    merged = oracle.read_folder(tmp_path / "merged")
    base = oracle.read_folder(minilm)
    assert merged["embeddings.position_ids"].dtype == torch.int64  # integers pass through
    floats = [n for n, t in base.items() if t.is_floating_point()]
    assert all(merged[n].dtype == expected for n in floats)
    untouched = "encoder.layer.0.output.dense.weight"
    assert torch.equal(merged[untouched], base[untouched].to(expected))
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["torch_dtype"] == dtype


def test_bf16_base_to_float32_keeps_exact_merge(tmp_path, llama):
    """Widening output: the merge is computed in fp64 and rounded once to fp32."""
    adapter = oracle.train_adapter(
        llama_factory(llama), BoneConfig(r=64, target_modules=["down_proj"]), tmp_path / "a", seed=6
    )
    merge(llama, [adapter], tmp_path / "merged", dtype="float32")
    merged = oracle.read_folder(tmp_path / "merged")
    base = oracle.read_folder(llama)
    block = oracle.adapter_blocks(adapter)["model.layers.1.mlp.down_proj"]
    from bonemerge.methods.bone import reference_merge

    expected = reference_merge(
        base["model.layers.1.mlp.down_proj.weight"].double(), block.double(), "default"
    ).float()
    assert torch.equal(merged["model.layers.1.mlp.down_proj.weight"], expected)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "float32"


def test_max_shard_size_reshards_with_index(tmp_path, minilm):
    adapter = oracle.train_adapter(
        minilm_factory(minilm), BoneConfig(r=64, target_modules=["value"]), tmp_path / "a", seed=5
    )
    report = merge(minilm, [adapter], tmp_path / "merged", max_shard_size="30MB")
    files = sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    for file in files:
        held = [n for n, f in index["weight_map"].items() if f == file]
        data = sum(t.numel() * t.element_size() for t in load_file(tmp_path / "merged" / file).values())
        assert data <= 30e6 or len(held) == 1, "only a tensor larger than the limit may exceed it"
    merged = oracle.read_folder(tmp_path / "merged")
    assert set(index["weight_map"]) == set(merged)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    assert report.bytes_written == index["metadata"]["total_size"]
    single = merge(minilm, [adapter], tmp_path / "single")
    assert (tmp_path / "single" / "model.safetensors").is_file()
    assert single.tensors_merged == report.tensors_merged == 6


def test_companions_and_model_card(tmp_path, minilm):
    adapter = oracle.train_adapter(
        minilm_factory(minilm), BoneConfig(r=64, target_modules=["query"]), tmp_path / "a", seed=5
    )
    (adapter / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128, "marker": "adapter"}))
    (adapter / "tokenizer.json").write_bytes((minilm / "tokenizer.json").read_bytes())
    (adapter / "chat_template.jinja").write_text("{{ messages }}")
    report = merge(minilm, [adapter], tmp_path / "merged", command="bonemerge merge base a -o merged")
    out = tmp_path / "merged"
    assert json.loads((out / "tokenizer_config.json").read_text())["marker"] == "adapter"
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    assert not (out / "vocab.txt").exists(), "the base's tokenizer files are replaced as a set"
    assert (out / "modules.json").is_file() and (out / "1_Pooling" / "config.json").is_file()
    assert not (out / ".gitattributes").exists()
    card = (out / "README.md").read_text()
    assert card != (minilm / "README.md").read_text()
    from huggingface_hub import ModelCard

    parsed = ModelCard(card)
    assert parsed.data.library_name == "transformers"
    assert {"bonemerge", "bone", "merge"} <= set(parsed.data.tags)
    assert "bonemerge merge base a -o merged" in card and "Bone (r=64)" in card
    assert json.loads((out / "config.json").read_text()) == json.loads((minilm / "config.json").read_text())
    assert "README.md" in report.files and "config.json" in report.files


def test_base_given_as_single_file(tmp_path, minilm):
    adapter = oracle.train_adapter(
        minilm_factory(minilm), BoneConfig(r=64, target_modules=["query"]), tmp_path / "a", seed=5
    )
    report = merge(minilm / "model.safetensors", [adapter], tmp_path / "merged")
    assert sorted(report.files) == ["README.md", "bonemerge.json", "model.safetensors"]
    folder = oracle.read_folder(tmp_path / "merged")
    assert len(folder) == len(oracle.read_folder(minilm))
