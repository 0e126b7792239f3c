"""LoRA layer layouts against PEFT 0.18.1: which way each layer's weight runs, and exact bits.

PEFT decides a layer's layout from the module it wraps: a transformers `Conv1D` stores its
weight in x out (`fan_in_fan_out` forced on), an nn.Linear out x in (forced off), so the flag
saved in adapter_config.json is whatever the last wrapped layer said. bonemerge must follow the
layer (config.json's `model_type`, else the shapes), never the flag alone. Models come from
transformers (GPT-2) and from PEFT's own test suite (`tests/test_custom_models.py` of 0.18.1:
`ModelEmbConv1D`, `ModelConv1D`, `ModelConv1DBigger`, `ModelMha`), saved as checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from bonemerge import merge
from tests import lora_oracle as lo
from tests import oracle
from tests.cliutil import fails


def save_base(model: nn.Module, folder: Path, config: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def factory_of(cls, folder: Path):
    def make():
        model = cls()
        model.load_state_dict(load_file(folder / "model.safetensors"))
        return model

    return make


def refused(tmp_path: Path, base: Path, adapter: Path, *expect: str) -> str:
    """`merge` refuses in one sentence holding every `expect`, and leaves nothing behind."""
    return fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=expect)


def merged_pair(tmp_path: Path, base: Path, factory, config: LoraConfig, seed: int = 3, edit=None):
    """(bonemerge's merged tensors, PEFT's merge_and_unload state dict, the merge report)."""
    adapter = lo.train_lora(factory, config, tmp_path / "adapter", seed=seed)
    if edit is not None:
        raw = lo.adapter_config(adapter)
        edit(raw)
        (adapter / "adapter_config.json").write_text(json.dumps(raw))
    report = merge(base, [adapter], tmp_path / "merged")
    peft = oracle.peft_merged(factory, [adapter])
    return oracle.read_folder(tmp_path / "merged"), peft, report


def assert_identical(ours: dict, peft: dict) -> None:
    assert set(ours) <= set(peft), set(ours) - set(peft)
    differ = {
        name: float((ours[name].double() - peft[name].double()).abs().max())
        for name in ours
        if ours[name].dtype != peft[name].dtype or not torch.equal(ours[name], peft[name])
    }
    assert not differ, differ


# -- PEFT 0.18.1's test models (tests/test_custom_models.py) --------------------------------------


class ModelEmbConv1D(nn.Module):
    """PEFT's `EmbConv1D`: an Embedding, a transformers Conv1D (5 -> 1) and a Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.lin0 = nn.Linear(10, 2)


class ModelConv1D(nn.Module):
    """PEFT's `Conv1d` (TC016/TC017): an nn.Conv1d(1, 1, 2) and a Linear."""

    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(1, 1, 2)
        self.lin0 = nn.Linear(9, 2)


class ModelConv1DBigger(nn.Module):
    """PEFT's `Conv1dBigger`: an nn.Conv1d(64, 16, 2) and a Linear."""

    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(64, 16, 2)
        self.lin0 = nn.Linear(144, 2)


class ModelMha(nn.Module):
    """PEFT's `MHA`: an nn.MultiheadAttention(10, 2) and a Linear."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)


class SquareMix(nn.Module):
    """A square Conv1D, a Conv1D and a Linear that only fit their own layout."""

    def __init__(self):
        super().__init__()
        self.square = Conv1D(8, 8)
        self.wide = Conv1D(5, 8)
        self.lin = nn.Linear(8, 3)


class SquareConv(nn.Module):
    """A square Conv1D beside a Conv1D whose shape says it is one."""

    def __init__(self):
        super().__init__()
        self.square = Conv1D(8, 8)
        self.wide = Conv1D(5, 8)


# -- item 1: the layout follows the layer ----------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_classifier(tmp_path_factory) -> Path:
    """A GPT-2 sequence classifier whose attn.c_proj (Conv1D) and score (Linear) are both 32 x 32."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(11)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16, num_labels=32)
    config.pad_token_id = 0
    folder = tmp_path_factory.mktemp("gpt2cls") / "base"
    GPT2ForSequenceClassification(config).save_pretrained(folder)
    return folder


def gpt2_classifier_factory(path: Path):
    from transformers import GPT2ForSequenceClassification

    return lambda: GPT2ForSequenceClassification.from_pretrained(path)


@pytest.mark.parametrize("flag", [None, True], ids=["flag-as-peft-saved-it", "flag-edited-to-true"])
def test_gpt2_classifier_conv1d_and_linear_layers_merge_as_peft(tmp_path, gpt2_classifier, flag):
    factory = gpt2_classifier_factory(gpt2_classifier)
    # the case: both layers square, so the wrong layout merged without a word
    config = LoraConfig(r=4, lora_alpha=6, target_modules=["attn.c_proj", "score"])
    edit = None if flag is None else (lambda raw: raw.update(fan_in_fan_out=flag))
    ours, peft, report = merged_pair(tmp_path, gpt2_classifier, factory, config, edit=edit)
    saved = lo.adapter_config(tmp_path / "adapter")["fan_in_fan_out"]
    assert saved is (flag if flag is not None else False)  # score, a Linear, was wrapped last
    assert ours["transformer.h.0.attn.c_proj.weight"].shape == (32, 32) == ours["score.weight"].shape
    assert report.tensors_merged == 2 + 1
    assert_identical(ours, peft)
    wrong = "score.weight" if saved else "transformer.h.0.attn.c_proj.weight"
    assert any("fan_in_fan_out" in note and wrong.removesuffix(".weight") in note for note in report.notes)
    # the history sketches the blocks as laid on the base (a Conv1D's stored columns)
    assert wrong in lo.assert_sketched(gpt2_classifier, tmp_path / "merged")


def test_gpt2_classifier_dora_merges_as_peft(tmp_path, gpt2_classifier):
    """DoRA norms a Conv1D's stored columns: bonemerge sums their squares in float64 over a
    first pass, PEFT in fp32 in one reduction torch orders its own way, so Conv1D results may
    differ in the last bits (measured: at most 4 ulp), and are never farther from a float64
    DoRA merge in total; the Linear rows (score) are bit-identical."""
    factory = gpt2_classifier_factory(gpt2_classifier)
    config = LoraConfig(r=4, lora_alpha=6, target_modules=["c_proj", "score"], use_dora=True)
    ours, peft, _ = merged_pair(tmp_path, gpt2_classifier, factory, config)
    assert torch.equal(ours["score.weight"], peft["score.weight"])
    reference = dora_reference(oracle.peft_model(factory, [tmp_path / "adapter"]))
    assert len(reference) == 2 * 2 + 1
    for name in reference:
        assert int(lo.ulps(ours[name], peft[name]).max()) <= DORA_COLUMN_ULPS, name
    assert lo.squared_error(ours, reference) <= lo.squared_error(peft, reference)


DORA_COLUMN_ULPS = 8


def test_embedding_dora_merges_as_peft(tmp_path):
    """The same for an Embedding's columns (PEFT's EmbConv1D, DoRA on all three layers)."""
    torch.manual_seed(1)
    base = save_base(ModelEmbConv1D(), tmp_path / "base")
    factory = factory_of(ModelEmbConv1D, base)
    config = LoraConfig(r=8, lora_alpha=12, target_modules=["emb", "conv1d", "lin0"], use_dora=True)
    ours, peft, _ = merged_pair(tmp_path, base, factory, config, seed=1)
    assert torch.equal(ours["lin0.weight"], peft["lin0.weight"])
    reference = dora_reference(oracle.peft_model(factory, [tmp_path / "adapter"]))
    assert set(reference) == {"emb.weight", "conv1d.weight", "lin0.weight"}
    for name in reference:
        assert int(lo.ulps(ours[name], peft[name]).max()) <= DORA_COLUMN_ULPS, name
    assert lo.squared_error(ours, reference) <= lo.squared_error(peft, reference)


def dora_reference(model) -> dict[str, torch.Tensor]:
    """Every DoRA-merged weight of the PeftModel `model` (adapter a0) in float64."""
    result = {}
    for module, layer in lo.lora_layers(model).items():
        weight = layer.get_base_layer().weight.detach().double()
        v = weight + lo.delta64(layer, "a0")
        magnitude = layer.lora_magnitude_vector["a0"].weight.detach().double()
        if getattr(layer, "fan_in_fan_out", False) or "a0" in layer.lora_embedding_A:  # norm by column
            result[module + ".weight"] = v * (magnitude / v.norm(dim=0)).unsqueeze(0)
        else:
            result[module + ".weight"] = v * (magnitude / v.norm(dim=1)).unsqueeze(1)
    return result


def test_table_of_conv1d_layers_matches_transformers():
    """`layouts` names every Conv1D of the architectures it lists, and only those; the
    architectures it calls Linear-only build no Conv1D anywhere in transformers' sources."""
    import importlib

    from transformers import AutoConfig, AutoModel

    from bonemerge.methods import layouts

    for model_type in layouts.CONV1D_LEAVES:
        config = AutoConfig.for_model(model_type)
        for key in ("n_embd", "hidden_size", "n_layer", "num_hidden_layers", "n_head", "n_positions"):
            if hasattr(config, key):
                setattr(
                    config, key, {"n_embd": 16, "hidden_size": 16, "n_head": 2, "n_positions": 8}.get(key, 1)
                )
        for sub in ("decoder_config", "text_config", "speech_config"):
            inner = getattr(config, sub, None)
            if inner is not None:
                for key in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
                    setattr(inner, key, {"hidden_size": 16, "num_attention_heads": 2}.get(key, 1))
        with torch.device("meta"):
            model = AutoModel.from_config(config)
        rule = layouts.conv1d_rule({"model_type": model_type})
        kinds = {
            name: isinstance(module, Conv1D)
            for name, module in model.named_modules()
            if isinstance(module, Conv1D | nn.Linear)
        }
        assert any(kinds.values()), model_type
        assert {name: rule(name) for name in kinds} == kinds, model_type
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    for model_type in layouts.LINEAR_ONLY:
        package = importlib.import_module(f"transformers.models.{model_type_to_module_name(model_type)}")
        sources = list(Path(package.__file__).parent.glob("modeling_*.py"))
        assert sources, model_type
        assert not any("Conv1D(" in source.read_text() for source in sources), model_type


def test_shapes_decide_where_the_architecture_is_unknown(tmp_path):
    """PEFT's EmbConv1D with LoRA on the Embedding, the Conv1D and the Linear: the saved flag
    is false (the Linear came last), the Conv1D's [5, 1] only fits in x out; bit-identical."""
    torch.manual_seed(2)
    base = save_base(ModelEmbConv1D(), tmp_path / "base")
    factory = factory_of(ModelEmbConv1D, base)
    config = LoraConfig(r=8, lora_alpha=12, target_modules=["emb", "conv1d", "lin0"])
    ours, peft, report = merged_pair(tmp_path, base, factory, config)
    assert lo.adapter_config(tmp_path / "adapter")["fan_in_fan_out"] is False
    assert_identical(ours, peft)
    assert any("conv1d" in note and "Conv1D" in note for note in report.notes)


def test_square_layer_of_an_unknown_mixed_model_is_refused(tmp_path):
    torch.manual_seed(2)
    base = save_base(SquareMix(), tmp_path / "base")
    factory = factory_of(SquareMix, base)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["square", "wide", "lin"])
    adapter = lo.train_lora(factory, config, tmp_path / "adapter", seed=1)
    refused(
        tmp_path,
        base,
        adapter,
        "square",
        "fits both an nn.Linear",
        "lin is a Linear",
        "wide a Conv1D",
        "model_type",
    )


def test_square_layer_follows_a_flag_nothing_contradicts(tmp_path):
    torch.manual_seed(2)
    base = save_base(SquareConv(), tmp_path / "base")
    factory = factory_of(SquareConv, base)
    config = LoraConfig(r=2, lora_alpha=3, target_modules=["square", "wide"])
    ours, peft, report = merged_pair(tmp_path, base, factory, config)
    assert lo.adapter_config(tmp_path / "adapter")["fan_in_fan_out"] is True
    assert_identical(ours, peft)
    assert not report.notes


# -- item 16: PEFT's operation order, bit for bit ---------------------------------------------------


@pytest.mark.filterwarnings("error:An output with one or more elements was resized")  # scratch reused
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpt2_conv1d_merges_are_bit_identical(tmp_path, dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(5)
    config = GPT2Config(n_embd=48, n_layer=2, n_head=2, vocab_size=80, n_positions=16)
    base = tmp_path / "base"
    GPT2LMHeadModel(config).to(dtype).save_pretrained(base)
    factory = lambda: GPT2LMHeadModel.from_pretrained(base, dtype=dtype)  # noqa: E731
    lora = LoraConfig(r=8, lora_alpha=12, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    ours, peft, _ = merged_pair(tmp_path, base, factory, lora)
    peft.pop("lm_head.weight")  # tied: not in the checkpoints
    assert_identical(ours, peft)


@pytest.mark.parametrize(
    ("target", "flag"), [("conv1d", True), ("emb", False)], ids=["conv1d-one-output", "embedding"]
)
def test_fp32_conv1d_and_embedding_merges_are_bit_identical(tmp_path, target, flag):
    """PEFT's EmbConv1D: a Conv1D with one output and a 100 x 5 Embedding, where `Aᵀ @ Bᵀ`
    sums in another order than PEFT's `(B @ A)ᵀ`."""
    torch.manual_seed(4)
    base = save_base(ModelEmbConv1D(), tmp_path / "base")
    factory = factory_of(ModelEmbConv1D, base)
    config = LoraConfig(r=8, lora_alpha=12, target_modules=[target], fan_in_fan_out=flag)
    ours, peft, _ = merged_pair(tmp_path, base, factory, config)
    name = f"{target}.weight"
    assert not torch.equal(ours[name], load_file(base / "model.safetensors")[name])
    assert_identical(ours, peft)


def test_fp32_dora_on_linear_rows_is_bit_identical(tmp_path):
    """fp32 weights merge in float64 by default; DoRA's v, norm and factor stay in fp32 as PEFT's."""
    torch.manual_seed(4)
    base = save_base(ModelConv1DBigger(), tmp_path / "base")
    factory = factory_of(ModelConv1DBigger, base)
    config = LoraConfig(r=8, lora_alpha=12, target_modules=["lin0"], use_dora=True)
    ours, peft, _ = merged_pair(tmp_path, base, factory, config)
    assert_identical(ours, peft)


# -- item 18: what PEFT merges ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "options"),
    [
        (ModelConv1D, {}),  # PEFT's TC016
        (ModelConv1D, {"use_dora": True}),  # TC017
        (ModelConv1DBigger, {}),
        (ModelConv1DBigger, {"use_dora": True}),
        (ModelConv1DBigger, {"lora_bias": True, "use_rslora": True}),
    ],
    ids=["tc016", "tc017-dora", "bigger", "bigger-dora", "bigger-bias-rslora"],
)
def test_nn_conv1d_lora_merges_bit_identical(tmp_path, model, options):
    torch.manual_seed(6)
    base = save_base(model(), tmp_path / "base")
    factory = factory_of(model, base)
    config = LoraConfig(r=4, lora_alpha=6, target_modules=["conv1d", "lin0"], **options)
    ours, peft, report = merged_pair(tmp_path, base, factory, config)
    assert report.tensors_merged == 2 + (1 if options.get("lora_bias") else 0) + (
        1 if options.get("lora_bias") else 0
    )
    assert not torch.equal(ours["conv1d.weight"], load_file(base / "model.safetensors")["conv1d.weight"])
    assert_identical(ours, peft)
    if not options.get("use_dora"):  # DoRA is sketched by its factors and magnitude instead
        assert "conv1d.weight" in lo.assert_sketched(base, tmp_path / "merged")


@pytest.mark.parametrize("options", [{}, {"use_dora": True}], ids=["lora", "dora"])
def test_verify_accepts_peft_bf16_nn_conv1d_merge_within_its_bound(tmp_path, options):
    """PEFT rounds a 16-bit nn.Conv1d's delta before adding it, so its merge is not bonemerge's:
    verify checks it against the bound, computed on the weight's out rows of in·k although the
    weight streams as out·in rows of k."""
    from bonemerge.api import verify

    torch.manual_seed(6)
    base = save_base(ModelConv1DBigger().to(torch.bfloat16), tmp_path / "base")
    factory = lambda: factory_of(ModelConv1DBigger, base)().to(torch.bfloat16)  # noqa: E731
    config = LoraConfig(r=4, lora_alpha=6, target_modules=["conv1d"], **options)
    adapter = lo.train_lora(factory, config, tmp_path / "adapter", seed=3)
    peft = save_base(nn.Module(), tmp_path / "peft")
    save_file(oracle.peft_merged(factory, [adapter]), peft / "model.safetensors")
    report = verify(peft, base, [adapter])
    assert report.mode == "tolerance" and report.ok, report
    tampered = load_file(peft / "model.safetensors")
    tampered["conv1d.weight"][5, 3, 1] += 0.25
    save_file(tampered, peft / "model.safetensors")
    report = verify(peft, base, [adapter])
    assert not report.ok and [(d.name, d.elements) for d in report.differing] == [("conv1d.weight", 1)]


class ModelGroupedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(8, 8, 2, groups=2)


def test_grouped_nn_conv1d_lora_is_refused_as_peft_refuses_it(tmp_path):
    torch.manual_seed(6)
    base = save_base(ModelGroupedConv(), tmp_path / "base")
    factory = factory_of(ModelGroupedConv, base)
    with pytest.warns(UserWarning, match="Merging is not supported"):
        adapter = lo.train_lora(
            factory, LoraConfig(r=4, target_modules=["conv1d"]), tmp_path / "adapter", seed=2
        )
    fails(
        tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=("nn.Conv1d with groups=2", "lora_B")
    )


@pytest.mark.parametrize("options", [{}, {"lora_bias": True}], ids=["lora", "lora-bias-ignored"])
def test_multihead_attention_lora_merges_as_peft(tmp_path, options):
    """PEFT's MHA cases: LoRA on the packed in_proj_weight and on out_proj, whose update PEFT
    0.18.1 adds twice (its forward does the same, so that is what the adapter was trained as).
    With lora_bias PEFT saves no bias for these layers, and merges the same."""
    torch.manual_seed(6)
    base = save_base(ModelMha(), tmp_path / "base")
    factory = factory_of(ModelMha, base)
    config = LoraConfig(r=4, lora_alpha=6, target_modules=["mha", "lin0"], **options)
    ours, peft, report = merged_pair(tmp_path, base, factory, config)
    assert report.tensors_merged == 3 + bool(options)  # lin0.bias with lora_bias
    assert any("nn.MultiheadAttention" in note and "twice" in note for note in report.notes)
    assert_identical(ours, peft)
    assert {"mha.in_proj_weight", "mha.out_proj.weight"} <= lo.assert_sketched(base, tmp_path / "merged")
    unmerged = merge_back(tmp_path, tmp_path / "merged", tmp_path / "adapter")
    for name, tensor in load_file(base / "model.safetensors").items():
        assert torch.allclose(unmerged[name], tensor, rtol=0, atol=1e-6), name


def merge_back(tmp_path: Path, merged: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from bonemerge import unmerge

    unmerge(merged, [adapter], tmp_path / "unmerged")
    return oracle.read_folder(tmp_path / "unmerged")


def test_multihead_attention_lora_bias_is_refused_by_name(tmp_path):
    torch.manual_seed(6)
    base = save_base(ModelMha(), tmp_path / "base")
    factory = factory_of(ModelMha, base)
    config = LoraConfig(r=4, target_modules=["mha"], lora_bias=True)
    adapter = lo.train_lora(factory, config, tmp_path / "adapter", seed=2)
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.mha.lora_B.bias"] = torch.ones(30)  # PEFT saves none; a hand-made one
    save_file(tensors, adapter / "adapter_model.safetensors")
    refused(tmp_path, base, adapter, "lora_bias on an nn.MultiheadAttention", "merge_and_unload")


@pytest.mark.parametrize(
    ("field", "value", "name"),
    [
        ("kasa_config", {"beta": 0.0001, "gemma": 0.001}, "KaSA"),
        ("velora_config", {"num_groups": 4, "init_type": "random", "scale": 1.0}, "VeLoRA"),
        ("monteclora_config", {"num_samples": 4}, "MonteCLoRA"),
        ("use_bdlora", {"target_modules_bd_a": ["lin0"], "nblocks": 2}, "BD-LoRA"),
    ],
)
def test_lora_variants_of_newer_peft_are_refused_by_name(tmp_path, field, value, name):
    torch.manual_seed(6)
    base = save_base(ModelConv1DBigger(), tmp_path / "base")
    factory = factory_of(ModelConv1DBigger, base)
    adapter = lo.train_lora(factory, LoraConfig(r=4, target_modules=["lin0"]), tmp_path / "adapter", seed=2)
    raw = lo.adapter_config(adapter)
    raw[field] = value
    (adapter / "adapter_config.json").write_text(json.dumps(raw))
    tensors = load_file(adapter / "adapter_model.safetensors")
    if name == "KaSA":
        tensors["base_model.model.lin0.lora_diag"] = torch.ones(4)
    if name == "BD-LoRA":  # lora_A block-diagonal: [r, in / nblocks]
        key = "base_model.model.lin0.lora_A.weight"
        tensors[key] = tensors[key][:, :72].contiguous()
    save_file(tensors, adapter / "adapter_model.safetensors")
    refused(tmp_path, base, adapter, name, field, "merge_and_unload")
