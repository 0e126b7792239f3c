"""IA³ and VeRA against PEFT 0.18.1: every command, with PEFT itself as the oracle.

Adapters are made as a training run leaves them (`get_peft_model`, then `save_pretrained`),
their trained vectors filled with random values (fresh IA³ vectors are ones and fresh VeRA
λ_b zeros: a test on them would prove nothing). Two bases: the sharded bf16 Llama (Linear
layers, no biases, GQA so that k/v are narrower than q and VeRA's projections are sliced)
and a GPT-2 (fp32, Conv1D weights stored in x out, with biases).

Merges must equal PEFT's `merge_and_unload()` bit for bit; unmerging bonemerge's merge must
give back the base within one ulp.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import IA3Config, PeftModel, VeraConfig, get_peft_model
from safetensors.torch import load_file

from bonemerge import inspect, merge, strip, unload, unmerge, verify
from bonemerge.errors import AdapterError, BonemergeError
from bonemerge.methods import REGISTRY, method_names
from tests import oracle
from tests.conftest import llama_factory

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(7)
    config = GPT2Config(n_embd=48, n_layer=2, n_head=2, vocab_size=64, n_positions=16)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # biases start at zero: make them count
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0, 0.1)
    folder = tmp_path_factory.mktemp("gpt2") / "base"
    model.save_pretrained(folder)
    return folder


def gpt2_factory(path: Path):
    from transformers import GPT2LMHeadModel

    return lambda: GPT2LMHeadModel.from_pretrained(path)


def randomised(factory, config, seed: int = 0):
    """A PeftModel whose IA³ vectors and VeRA λ vectors hold random values (non-zero)."""
    model = get_peft_model(factory(), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "ia3_l" in name:
                parameter.copy_(1 + 0.3 * noise)
            elif "vera_lambda_" in name:
                parameter.copy_(0.5 * noise)
    return model


def train(factory, config, folder: Path, seed: int = 0) -> Path:
    randomised(factory, config, seed).save_pretrained(folder)
    return folder


def save_training_state(model, folder: Path, base: Path) -> Path:
    """The PeftModel's whole state dict as a trainer saves it: storage shared by several names
    (tied embeddings; VeRA's projections, referred to by every layer) written once."""
    from safetensors.torch import save_file

    folder.mkdir()
    seen, state = set(), {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            state[name] = tensor.detach().contiguous()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text((base / "config.json").read_text())
    return folder


def peft_merged(factory, adapter: Path) -> dict[str, torch.Tensor]:
    model = PeftModel.from_pretrained(factory(), adapter)
    merged = model.merge_and_unload(progressbar=False, safe_merge=False)
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def differing(ours: dict, expected: dict) -> list[str]:
    """Tensors of `ours` that are not bit-identical to PEFT's (tied copies PEFT lists twice
    are compared where they are stored)."""
    return [name for name, tensor in ours.items() if not torch.equal(tensor, expected[name])]


def within_one_ulp(ours: torch.Tensor, base: torch.Tensor, merged: torch.Tensor) -> bool:
    """One ulp of the larger of the base and the merged magnitude: an addition taken back
    loses what the rounding of the larger value lost (VeRA), a product taken back at most one
    rounding of each (IA³)."""
    gap = (ours.double() - base.double()).abs()
    larger = torch.maximum(base.double().abs(), merged.double().abs())
    ulp = torch.finfo(base.dtype).eps * larger.clamp(min=torch.finfo(base.dtype).tiny)
    return bool((gap <= ulp).all())


CASES = {
    "ia3-llama": (
        "llama",
        lambda: IA3Config(target_modules=LLAMA_TARGETS, feedforward_modules=["down_proj", "up_proj"]),
    ),
    "ia3-gpt2": ("gpt2", lambda: IA3Config(target_modules=GPT2_TARGETS, feedforward_modules=["c_fc"])),
    "vera-llama": ("llama", lambda: VeraConfig(r=8, target_modules=LLAMA_TARGETS)),
    "vera-gpt2": ("gpt2", lambda: VeraConfig(r=6, target_modules=GPT2_TARGETS, fan_in_fan_out=True)),
}


def setup(case: str, request, tmp_path: Path):
    which, config = CASES[case]
    base = request.getfixturevalue(which)
    factory = llama_factory(base) if which == "llama" else gpt2_factory(base)
    return base, factory, train(factory, config(), tmp_path / "adapter")


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_equals_peft_bit_for_bit_and_unmerge_gives_the_base_back(tmp_path, request, case):
    base, factory, adapter = setup(case, request, tmp_path)
    report = merge(base, [adapter], tmp_path / "merged")
    ours = oracle.read_folder(tmp_path / "merged")
    expected = peft_merged(factory, adapter)
    changed = [name for name in ours if not torch.equal(ours[name], oracle.read_folder(base)[name])]
    assert changed and report.tensors_merged == len(changed)
    assert differing(ours, expected) == []
    if case == "ia3-gpt2":  # attention and output biases scaled, the feedforward one left alone
        assert "transformer.h.0.attn.c_attn.bias" in changed and "transformer.h.0.mlp.c_proj.bias" in changed
        assert "transformer.h.0.mlp.c_fc.bias" not in changed
    unmerge(tmp_path / "merged", [adapter], tmp_path / "unmerged")
    back, original = oracle.read_folder(tmp_path / "unmerged"), oracle.read_folder(base)
    assert set(back) == set(original)
    assert [name for name in back if not within_one_ulp(back[name], original[name], ours[name])] == []


@pytest.mark.parametrize("case", ["ia3-gpt2", "vera-llama"])
def test_verify_inspect_and_history(tmp_path, request, case):
    base, factory, adapter = setup(case, request, tmp_path)
    merge(base, [adapter], tmp_path / "merged")
    report = verify(tmp_path / "merged", base, [adapter])
    assert report.ok and report.within_rounding == 0 and not report.differing
    # PEFT's own merge, without a history: verified within the method's error bound
    model = PeftModel.from_pretrained(factory(), adapter).merge_and_unload(progressbar=False)
    model.save_pretrained(tmp_path / "peft-merged")
    report = verify(tmp_path / "peft-merged", base, [adapter])
    assert report.ok and not report.differing
    # a merged model with one element changed by 5 % is caught
    edited = oracle.read_folder(tmp_path / "peft-merged")
    name = next(n for n in sorted(edited) if n.endswith(("c_attn.weight", "q_proj.weight")))
    edited[name].view(-1)[3] *= 1.05
    model.load_state_dict(edited, strict=False)
    model.save_pretrained(tmp_path / "edited")
    assert verify(tmp_path / "edited", base, [adapter]).differing
    with pytest.raises(BonemergeError, match="already"):
        merge(tmp_path / "merged", [adapter], tmp_path / "twice")
    shown = inspect(adapter).to_dict()
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert shown["parameters"] == sum(t.numel() for t in tensors.values())
    assert shown["blocks"] == sum(1 for key in tensors if key.endswith(("ia3_l", "lambda_d")))


def test_vera_projections_are_counted_once(tmp_path, llama):
    adapter = train(llama_factory(llama), VeraConfig(r=8, target_modules=LLAMA_TARGETS), tmp_path / "a")
    tensors = load_file(adapter / "adapter_model.safetensors")
    projections = tensors["base_model.vera_A"].numel() + tensors["base_model.vera_B"].numel()
    lambdas = sum(t.numel() for key, t in tensors.items() if "lambda" in key)
    assert inspect(adapter).to_dict()["parameters"] == projections + lambdas


def test_ia3_filtered_strip_loads_in_peft_with_feedforward_a_subset(tmp_path, llama):
    factory = llama_factory(llama)
    config = IA3Config(target_modules=LLAMA_TARGETS, feedforward_modules=["down_proj"])
    adapter = train(factory, config, tmp_path / "adapter")
    strip(adapter, tmp_path / "reduced", include=r"layers\.1\.(self_attn\.q_proj|mlp\.down_proj)")
    written = json.loads((tmp_path / "reduced" / "adapter_config.json").read_text())
    assert set(written["feedforward_modules"]) <= set(written["target_modules"])
    assert written["feedforward_modules"] == ["model.layers.1.mlp.down_proj"]
    expected = peft_merged(factory, tmp_path / "reduced")  # PEFT refuses a feedforward outside
    merge(llama, [tmp_path / "reduced"], tmp_path / "merged")
    ours = oracle.read_folder(tmp_path / "merged")
    assert differing(ours, expected) == []
    original = oracle.read_folder(llama)
    assert sorted(n for n in ours if not torch.equal(ours[n], original[n])) == [
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
    ]


def test_vera_filtered_strip_keeps_what_peft_draws(tmp_path, llama):
    """PEFT 0.18.1 draws VeRA's projections again on every load, sized by the widest layer the
    config targets (it drops the saved ones as unexpected keys). Keeping layer 1 keeps every
    width, so PEFT draws the same projections and the reduced adapter merges as the original
    did on layer 1; keeping only k_proj and v_proj (128 inputs, 64 outputs, where the widest
    layer has 352 and 352) would make PEFT draw others, and is refused."""
    factory = llama_factory(llama)
    adapter = train(factory, VeraConfig(r=8, target_modules=LLAMA_TARGETS), tmp_path / "adapter")
    with pytest.raises(AdapterError, match="PEFT draws VeRA's projections again"):
        strip(adapter, tmp_path / "narrow", include=r"[kv]_proj", base=llama)
    assert not (tmp_path / "narrow").exists()
    nameless = tmp_path / "nameless"
    nameless.mkdir()
    (nameless / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    (nameless / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": None}))
    with pytest.raises(BonemergeError, match=r"reducing .* needs its base model"):
        strip(nameless, tmp_path / "no-base", layers="1")
    strip(adapter, tmp_path / "reduced", layers="1")  # the base its config names
    tensors = load_file(tmp_path / "reduced" / "adapter_model.safetensors")
    original = load_file(adapter / "adapter_model.safetensors")
    assert torch.equal(tensors["base_model.vera_A"], original["base_model.vera_A"])
    loaded = PeftModel.from_pretrained(factory(), tmp_path / "reduced")
    assert torch.equal(loaded.base_model.vera_A["default"], tensors["base_model.vera_A"])
    expected = peft_merged(factory, tmp_path / "reduced")
    merge(llama, [tmp_path / "reduced"], tmp_path / "merged")
    ours = oracle.read_folder(tmp_path / "merged")
    assert differing(ours, expected) == []
    merge(llama, [adapter], tmp_path / "whole")
    whole, base = oracle.read_folder(tmp_path / "whole"), oracle.read_folder(llama)
    for name, tensor in ours.items():
        assert torch.equal(tensor, whole[name] if ".layers.1." in name else base[name]), name


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_vera_without_saved_projections_draws_them_as_peft_does(tmp_path, request, which):
    """save_projection false: nothing in the file but λ vectors; PEFT draws the projections
    from projection_prng_key, and so does bonemerge, to the bit."""
    base = request.getfixturevalue(which)
    factory = llama_factory(base) if which == "llama" else gpt2_factory(base)
    targets = LLAMA_TARGETS if which == "llama" else GPT2_TARGETS
    config = VeraConfig(r=8, target_modules=targets, save_projection=False, projection_prng_key=123)
    adapter = train(factory, config, tmp_path / "adapter")
    assert not any("vera_A" in key for key in load_file(adapter / "adapter_model.safetensors"))
    merge(base, [adapter], tmp_path / "merged")
    assert differing(oracle.read_folder(tmp_path / "merged"), peft_merged(factory, adapter)) == []
    unmerge(tmp_path / "merged", [adapter], tmp_path / "unmerged")
    if which == "llama":
        with pytest.raises(AdapterError, match="PEFT draws VeRA's projections again"):
            strip(adapter, tmp_path / "narrow", include=r"[kv]_proj", base=base)
        strip(adapter, tmp_path / "reduced", layers="1", base=base)
        assert (
            json.loads((tmp_path / "reduced" / "adapter_config.json").read_text())["save_projection"] is False
        )
        merge(base, [tmp_path / "reduced"], tmp_path / "merged-reduced")
        expected = peft_merged(factory, tmp_path / "reduced")
        assert differing(oracle.read_folder(tmp_path / "merged-reduced"), expected) == []


@pytest.mark.parametrize("method", ["ia3", "vera"])
def test_training_checkpoint_merge_unload_and_strip(tmp_path, gpt2, method):
    factory = gpt2_factory(gpt2)
    config = (
        IA3Config(target_modules=GPT2_TARGETS, feedforward_modules=["c_fc"])
        if method == "ia3"
        else VeraConfig(r=4, target_modules=GPT2_TARGETS)
    )
    model = randomised(factory, config)
    checkpoint = save_training_state(model, tmp_path / "ckpt", gpt2)
    model.peft_config["default"].save_pretrained(tmp_path / "ckpt")
    merge(checkpoint, [], tmp_path / "merged")
    expected = {
        k: v.detach().clone()
        for k, v in randomised(factory, config).merge_and_unload(progressbar=False).state_dict().items()
    }
    ours = oracle.read_folder(tmp_path / "merged")
    assert differing(ours, expected) == []
    unload(checkpoint, tmp_path / "base")
    original = oracle.read_folder(gpt2)
    assert {n: t for n, t in oracle.read_folder(tmp_path / "base").items()}.keys() == original.keys()
    strip(checkpoint, tmp_path / "adapter")
    assert (
        differing(oracle.read_folder(tmp_path / "merged"), peft_merged(factory, tmp_path / "adapter")) == []
    )


def test_every_method_list_names_the_registry():
    """README's table, the package docstring and the CLI help name every registered method."""
    import bonemerge
    from bonemerge.cli.commands import _MAIN_HELP

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("## Supported adapters", 1)[1].split("\n\n", 2)[1]
    for method in REGISTRY:
        for peft_type in method.peft_types:
            assert f"`{peft_type}`" in table, peft_type
        for variant in method.variants:
            assert variant in (bonemerge.__doc__ or "") and variant in _MAIN_HELP
            assert variant in readme.split("**bonemerge** is", 1)[1].split("\n\n", 1)[0], variant
    assert method_names() in _MAIN_HELP
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    description = next(line for line in pyproject.splitlines() if line.startswith("description"))
    assert all(variant in description for method in REGISTRY for variant in method.variants)


def test_ia3_refusals(tmp_path, gpt2):
    """A zero in a vector erased what it scaled: unmerge refuses before writing anything; a
    vector whose shape contradicts feedforward_modules is refused by name."""
    from safetensors.torch import save_file

    factory = gpt2_factory(gpt2)
    adapter = train(factory, IA3Config(target_modules=["c_attn"], feedforward_modules=[]), tmp_path / "a")
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.transformer.h.1.attn.c_attn.ia3_l"
    tensors[key][5] = 0.0
    save_file(tensors, adapter / "adapter_model.safetensors")
    merge(gpt2, [adapter], tmp_path / "merged")
    with pytest.raises(BonemergeError, match=r"c_attn\.ia3_l .*1 zero"):
        unmerge(tmp_path / "merged", [adapter], tmp_path / "unmerged")
    assert not (tmp_path / "unmerged").exists()
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"feedforward_modules": ["c_attn"]}))
    with pytest.raises(AdapterError, match=r"c_attn\.ia3_l .*\[1, in\]"):
        merge(gpt2, [adapter], tmp_path / "other")
