"""The LoRA family through every other command: unmerge, full PEFT training checkpoints (merge,
unload, strip), strip of adapters, inspect, verify, and the refusals (exit 1, one sentence,
nothing written, inputs untouched)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from bonemerge import inspect, merge, strip, unload, unmerge, verify
from tests import lora_oracle as lo
from tests import oracle, toy
from tests.cliutil import fails, run
from tests.conftest import llama_factory, minilm_factory
from tests.test_training_checkpoint import save_state

TARGETS = ["query", "value", "dense"]
TINY = 1e-3


@pytest.fixture(scope="module")
def sentences(minilm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm)
    return tokenizer(["strip what you do not need", "keep the rest"], return_tensors="pt", padding=True)


# --- unmerge ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        lambda: LoraConfig(r=16, lora_alpha=24, target_modules=TARGETS),
        lambda: LoraConfig(r=12, lora_alpha=16, use_rslora=True, target_modules=TARGETS),
    ],
    ids=["lora", "rslora"],
)
def test_unmerge_of_an_fp32_merge_returns_the_base(tmp_path, minilm, config):
    factory = minilm_factory(minilm)
    adapter = lo.train_lora(factory, config(), tmp_path / "adapter", seed=4)
    merge(minilm, [adapter], tmp_path / "merged")
    report = unmerge(tmp_path / "merged", [adapter], tmp_path / "back")
    assert report.tensors_merged == 31
    base, merged = oracle.read_folder(minilm), oracle.read_folder(tmp_path / "merged")
    back = oracle.read_folder(tmp_path / "back")
    assert set(back) == set(base)
    worst = 0.0
    for name, value in base.items():
        if not value.is_floating_point():
            assert torch.equal(back[name], value), name
            continue
        assert back[name].dtype == value.dtype
        # the merged file's rounding plus the unmerge's: one ulp of the tensor's scale
        scale = max(float(merged[name].abs().max()), float(value.abs().max()))
        error = float((back[name].double() - value.double()).abs().max())
        assert error <= 2.0**-23 * scale, (name, error, scale)
        worst = max(worst, error / (2.0**-23 * scale)) if scale else worst
    print(f"unmerge: worst error {worst:.3g} ulps of the tensor scale")
    assert sum(not torch.equal(merged[n], base[n]) for n in base) == 31


# --- full PEFT training checkpoints -------------------------------------------------------------

CHECKPOINT = dict(r=8, lora_alpha=12, target_modules=["query", "value"], modules_to_save=["classifier"])


def trained(factory):
    """The same randomised PeftModel every call (merge_and_unload and unload change it)."""
    return lo.lora_model(factory, LoraConfig(**CHECKPOINT), seed=0)


@pytest.fixture(scope="module")
def checkpoint(minilm, tmp_path_factory):
    """A trainer's checkpoint folder: the whole PeftModel state dict and adapter_config.json,
    plus the same adapter as save_pretrained writes it (for the oracle)."""
    factory = minilm_factory(minilm, head=True)
    model = trained(factory)
    root = tmp_path_factory.mktemp("lora-ckpt")
    folder = save_state(model, root / "ckpt", base=minilm)
    model.peft_config["default"].save_pretrained(folder)
    model.save_pretrained(root / "saved")
    assert any(".lora_A.default.weight" in k for k in oracle.read_folder(folder))
    return factory, folder, root / "saved"


def test_training_checkpoint_merge_equals_peft(tmp_path, checkpoint):
    factory, folder, saved = checkpoint
    report = merge(folder, [], tmp_path / "merged")
    ours = oracle.read_folder(tmp_path / "merged")
    _, scales, expected = lo.peft_view(factory, [saved])
    direct = trained(factory).merge_and_unload(progressbar=False).state_dict()
    assert all(torch.equal(direct[n], v) for n, v in expected.items())
    assert set(ours) == set(expected) | ({"bert.embeddings.position_ids"} & set(ours))
    closeness = lo.compare_with_peft(ours, expected, scales)
    print(f"training checkpoint merge: {closeness}")
    assert closeness.fraction <= TINY and closeness.worst_ulps <= 1, str(closeness)
    assert report.tensors_merged == 12
    assert torch.equal(ours["classifier.weight"], expected["classifier.weight"])


def test_training_checkpoint_unload_equals_peft(tmp_path, checkpoint):
    factory, folder, _ = checkpoint
    unload(folder, tmp_path / "unloaded")
    ours = oracle.read_folder(tmp_path / "unloaded")
    expected = lo.state(trained(factory).unload())
    assert set(ours) == set(expected) | ({"bert.embeddings.position_ids"} & set(ours))
    for name, value in expected.items():
        assert torch.equal(ours[name], value), name
    assert not any("lora" in name for name in ours)


def test_training_checkpoint_strip_loads_in_peft(tmp_path, checkpoint, sentences):
    factory, folder, saved = checkpoint
    strip(folder, tmp_path / "extracted")
    extracted = oracle.read_folder(tmp_path / "extracted")
    assert extracted.keys() == oracle.read_folder(saved).keys()
    config = lo.adapter_config(tmp_path / "extracted")
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 8, 12)
    model = PeftModel.from_pretrained(factory(), tmp_path / "extracted").eval()
    original = PeftModel.from_pretrained(factory(), saved).eval()
    assert torch.equal(lo.bert_outputs(model, sentences), lo.bert_outputs(original, sentences))


def test_training_checkpoint_without_its_config(tmp_path, checkpoint):
    """lora_alpha is not in the weights: without adapter_config.json the scale is unknown, so
    merge and strip refuse; unload never applies the blocks, so it works and equals PEFT's."""
    factory, folder, _ = checkpoint
    shutil.copytree(folder, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "adapter_config.json").unlink()
    for command in ("merge", "strip"):
        fails(tmp_path, command, tmp_path / "ckpt", "-o", tmp_path / "out", expect=("adapter_config.json",))
    unload(tmp_path / "ckpt", tmp_path / "unloaded")
    ours = oracle.read_folder(tmp_path / "unloaded")
    expected = lo.state(trained(factory).unload())
    assert set(ours) == set(expected) | ({"bert.embeddings.position_ids"} & set(ours))
    for name, value in expected.items():
        assert torch.equal(ours[name], value), name


# --- strip of LoRA adapters ---------------------------------------------------------------------


def load_quietly(factory, adapter: Path):
    """PeftModel.from_pretrained, returning the warnings about missing or unexpected keys."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(factory(), adapter).eval()
    return model, [str(w.message) for w in caught if "keys" in str(w.message).lower()]


@pytest.mark.parametrize(
    ("options", "keep", "dora"),
    [
        ({"layers": "0-2,5"}, lambda n: any(f"layer.{i}." in n for i in (0, 1, 2, 5)), False),
        ({"include": r"attention", "exclude": r"output\.dense"}, lambda n: "attention.self" in n, False),
        ({"dtype": "bfloat16"}, lambda n: True, False),
        ({"include": r"attention", "exclude": r"output\.dense"}, lambda n: "attention.self" in n, True),
        ({"dtype": "bfloat16"}, lambda n: True, True),
    ],
    ids=["layers", "include-exclude", "bfloat16", "dora-include-exclude", "dora-bfloat16"],
)
def test_stripped_lora_loads_and_matches_restricted_original(
    tmp_path, minilm, sentences, options, keep, dora
):
    factory = minilm_factory(minilm)
    config = LoraConfig(r=8, lora_alpha=12, use_dora=dora, target_modules=TARGETS)
    adapter = lo.train_lora(factory, config, tmp_path / "adapter", seed=1)
    strip(adapter, tmp_path / "stripped", **options)
    model, caught = load_quietly(factory, tmp_path / "stripped")
    assert caught == []
    written = oracle.read_folder(tmp_path / "stripped")
    # exactly the keys PEFT expects for the config strip wrote: none missing, none unexpected
    expected_keys = get_peft_model_state_dict(
        get_peft_model(factory(), LoraConfig.from_pretrained(tmp_path / "stripped"))
    ).keys()
    assert set(written) == set(expected_keys)
    modules = {k.rsplit(".lora_", 1)[0] for k in oracle.read_folder(adapter)}
    assert {k.rsplit(".lora_", 1)[0] for k in written} == {m for m in modules if keep(m)}
    if options.get("dtype") == "bfloat16":
        assert all(t.dtype == torch.bfloat16 for t in written.values())

    # the original, restricted the same way: B = 0 outside `keep` (and, for DoRA, the magnitude
    # set to PEFT's own norm of W, so the module computes W x exactly), rounded like strip did
    original = PeftModel.from_pretrained(factory(), adapter).eval()
    with torch.no_grad():
        for name, parameter in original.named_parameters():
            if "lora_" in name and options.get("dtype") == "bfloat16":
                parameter.copy_(parameter.to(torch.bfloat16).float())
        for name, layer in lo.lora_layers(original).items():
            if keep(name):
                continue
            layer.lora_B["default"].weight.zero_()
            if dora:
                weight = layer.get_base_layer().weight
                norm = layer.lora_magnitude_vector["default"].get_weight_norm(
                    weight, torch.zeros_like(weight), 1
                )
                layer.lora_magnitude_vector["default"].weight.copy_(norm)
    assert torch.equal(lo.bert_outputs(model, sentences), lo.bert_outputs(original, sentences))


# --- inspect --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "name"),
    [({}, "LoRA"), ({"use_rslora": True}, "rsLoRA"), ({"use_dora": True}, "DoRA")],
    ids=["lora", "rslora", "dora"],
)
def test_inspect_describes_lora(tmp_path, minilm, settings, name):
    factory = minilm_factory(minilm)
    config = LoraConfig(r=8, lora_alpha=12, target_modules=["query", "value"], **settings)
    adapter = lo.train_lora(factory, config, tmp_path / "adapter", seed=2)
    result = run("inspect", adapter, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["kind"], info["method"], info["r"], info["blocks"]) == ("adapter", "LORA", 8, 12)
    assert name in info["adapter"], info["adapter"]
    for other in {"rsLoRA", "DoRA"} - {name}:
        assert other not in info["adapter"], info["adapter"]
    assert info["parameters"] == sum(t.numel() for t in oracle.read_folder(adapter).values())
    assert inspect(adapter, base=minilm)["against_base"]["ok"]
    text = run("inspect", adapter).stdout
    assert name in text


# --- verify -------------------------------------------------------------------------------------

VERIFY_TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def verified(tmp_path_factory, llama):
    root = tmp_path_factory.mktemp("verify-lora")
    factory = llama_factory(llama)
    config = LoraConfig(r=8, lora_alpha=12, target_modules=VERIFY_TARGETS)
    adapter = lo.train_lora(factory, config, root / "lora", seed=1)
    merge(llama, [adapter], root / "merged")
    oracle.peft_model(factory, [adapter]).merge_and_unload(progressbar=False).save_pretrained(root / "peft")
    return root, llama, adapter


def test_verify_accepts_its_own_and_peft_merge(verified):
    root, base, adapter = verified
    for merged in (root / "merged", root / "peft"):
        report = verify(merged, base, [adapter])
        assert report.ok and not report.differing, merged
        result = run("verify", merged, adapter, "--base", base)
        assert result.exit_code == 0 and "0 differing" in result.stdout, result.output


def test_verify_catches_one_element_off_by_64_ulps(verified, tmp_path):
    root, base, adapter = verified
    shutil.copytree(root / "merged", tmp_path / "edited")
    index = json.loads((tmp_path / "edited" / "model.safetensors.index.json").read_text())
    name = "model.layers.1.self_attn.v_proj.weight"
    file = tmp_path / "edited" / index["weight_map"][name]
    tensors = load_file(file)
    bits = tensors[name].view(torch.int16)
    bits[3, 5] += 64
    save_file(tensors, file, metadata={"format": "pt"})
    report = verify(tmp_path / "edited", base, [adapter])
    assert not report.ok
    assert {d.name: d.elements for d in report.differing} == {name: 1}
    result = run("verify", tmp_path / "edited", adapter, "--base", base)
    assert result.exit_code == 1, result.output


def test_verify_catches_a_double_merge(verified, tmp_path):
    root, base, adapter = verified
    refused = run("merge", root / "merged", adapter, "-o", tmp_path / "refused")
    assert refused.exit_code == 1 and "already" in refused.stderr, refused.output
    merge(root / "merged", [adapter], tmp_path / "twice", allow_remerge=True)
    report = verify(tmp_path / "twice", base, [adapter])
    assert not report.ok and len(report.differing) == 2 * len(VERIFY_TARGETS)
    result = run("verify", tmp_path / "twice", adapter, "--base", base, "--json")
    assert result.exit_code == 1 and json.loads(result.stdout)["tensors"]["ok"] is False


# --- refusals -----------------------------------------------------------------------------------


class ConvNet(torch.nn.Module):
    def __init__(self, dims: int):
        super().__init__()
        conv = torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d
        self.conv = conv(3, 8, 3)
        self.head = torch.nn.Linear(8, 4)


@pytest.mark.parametrize("dims", [2, 3], ids=["conv2d", "conv3d"])
def test_conv_lora_is_refused(tmp_path, dims):
    torch.manual_seed(0)
    net = ConvNet(dims)
    base = toy.write_base(tmp_path / "base", {k: v.detach().clone() for k, v in net.state_dict().items()})
    model = lo.randomise(
        get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["conv", "head"])), 1
    )
    model.save_pretrained(tmp_path / "adapter")
    assert oracle.read_folder(tmp_path / "adapter")["base_model.model.conv.lora_A.weight"].dim() == 2 + dims
    fails(tmp_path, "merge", base, tmp_path / "adapter", "-o", tmp_path / "out", expect=("Conv",))


def toy_lora(folder: Path, config: dict | None = None, extra: dict | None = None, **tensors) -> Path:
    """A valid LoRA adapter for toy's base (q_proj of both layers), then `config`/`extra` on top."""
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    values = lo.toy_lora_tensors(toy.SHAPES, modules) | tensors | (extra or {})
    return lo.write_lora(folder, values, config)


def test_toy_lora_is_valid(tmp_path, base):
    """The hand-written adapter the refusals start from merges (so each refusal is its change's)."""
    adapter = toy_lora(tmp_path / "adapter")
    report = merge(base, [adapter], tmp_path / "merged")
    assert report.tensors_merged == 2
    merged, original = oracle.read_folder(tmp_path / "merged"), oracle.read_folder(base)
    values = oracle.read_folder(adapter)
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    delta = (values[key + ".lora_B.weight"].double() @ values[key + ".lora_A.weight"].double()) * 2
    expected = (original["model.layers.0.self_attn.q_proj.weight"].double() + delta).float()
    assert torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"], expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"target_parameters": ["mlp.experts.gate_up_proj"], "use_dora": True}, "target_parameters"),
        ({"init_lora_weights": "pissa"}, "pissa"),
        ({"init_lora_weights": "pissa_niter_16"}, "pissa_niter_16"),
        ({"init_lora_weights": "olora"}, "olora"),
        ({"init_lora_weights": "corda"}, "corda"),
        ({"init_lora_weights": "eva"}, "eva"),
        ({"init_lora_weights": "loftq"}, "loftq"),
        ({"alora_invocation_tokens": [5, 6, 7]}, "aLoRA"),
        ({"peft_type": "IA3"}, "IA3"),
        ({"peft_type": "OFT"}, "OFT"),
    ],
    ids=[
        "target_parameters-dora",
        "pissa",
        "pissa-niter",
        "olora",
        "corda",
        "eva",
        "loftq",
        "alora",
        "ia3",
        "oft",
    ],
)
def test_unmergeable_configs_are_refused(tmp_path, base, config, fragment):
    adapter = toy_lora(tmp_path / "adapter", config)
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=(fragment,))


def test_unmerge_of_dora_is_refused(tmp_path, base):
    """DoRA's merge rescales each row to norm m: the scale it divided by is not in the files."""
    magnitude = {
        f"model.layers.{i}.self_attn.q_proj.lora_magnitude_vector": torch.rand(64) + 0.5 for i in range(2)
    }
    adapter = toy_lora(tmp_path / "adapter", {"use_dora": True}, magnitude)
    merge(base, [adapter], tmp_path / "merged")
    merged = oracle.read_folder(tmp_path / "merged")["model.layers.0.self_attn.q_proj.weight"]
    norms = merged.double().norm(dim=1)
    assert torch.allclose(norms, magnitude["model.layers.0.self_attn.q_proj.lora_magnitude_vector"].double())
    fails(tmp_path, "unmerge", tmp_path / "merged", adapter, "-o", tmp_path / "out", expect=("DoRA",))


@pytest.mark.parametrize(
    ("part", "shape", "fragment"),
    [
        ("lora_B", (64, 5), "lora_"),  # r of B (5) is not r of A (4)
        ("lora_B", (65, 4), "lora_B"),  # q_proj has 64 outputs
        ("lora_A", (4, 63), "lora_A"),  # and 64 inputs
    ],
    ids=["rank", "out-features", "in-features"],
)
def test_shapes_that_do_not_fit_are_refused(tmp_path, base, part, shape, fragment):
    wrong = {f"model.layers.1.self_attn.q_proj.{part}.weight": torch.randn(shape) * 0.05}
    adapter = toy_lora(tmp_path / "adapter", extra=wrong)
    fails(
        tmp_path,
        "merge",
        base,
        adapter,
        "-o",
        tmp_path / "out",
        expect=("layers.1.self_attn.q_proj", fragment),
    )
