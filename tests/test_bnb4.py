"""bitsandbytes 4-bit bases (NF4 and FP4, the `*-bnb-4bit` repos) read into dense outputs.

The quantized checkpoints are what transformers' `save_pretrained` writes for a model loaded
with `BitsAndBytesConfig(load_in_4bit=True)`, with and without double quantization; the
oracle for the values is bitsandbytes' own `dequantize_4bit` on the same tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests import lora_oracle
from tests.cliutil import fails, run
from tests.conftest import LLAMA

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _quantized(dense: Path, folder: Path, kind: str, nested: bool) -> Path:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=kind,
        bnb_4bit_use_double_quant=nested,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        dense, quantization_config=config, device_map="cpu", dtype=torch.bfloat16
    )
    model.save_pretrained(folder)
    return folder


def _dense(folder: Path, intermediate: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    config = LlamaConfig(**(LLAMA | {"intermediate_size": intermediate}))
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return _dense(tmp_path_factory.mktemp("bnb") / "dense", 192)


@pytest.fixture(scope="module", params=[("nf4", True), ("nf4", False), ("fp4", True)], ids=str)
def quantized(request, dense) -> Path:
    kind, nested = request.param
    return _quantized(dense, dense.parent / f"{kind}-{int(nested)}", kind, nested)


@pytest.fixture(scope="module")
def lora(dense) -> Path:
    from peft import LoraConfig
    from transformers import LlamaForCausalLM

    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    factory = lambda: LlamaForCausalLM.from_pretrained(dense, dtype=torch.bfloat16)  # noqa: E731
    return lora_oracle.train_lora(factory, config, dense.parent / "lora", seed=3)


def _bnb_dequantized(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a bnb-4bit checkpoint as bitsandbytes restores it: 4-bit weights through
    `dequantize_4bit` with their saved quant state, the rest as stored."""
    import bitsandbytes.functional as bnb
    from bitsandbytes.functional import QuantState

    tensors = load_file(folder / "model.safetensors")
    out = {}
    for name, value in tensors.items():
        if ".quant_state." in name or name.rsplit(".", 1)[-1] in ("absmax", "quant_map"):
            continue
        if name.endswith(("nested_absmax", "nested_quant_map")):
            continue
        parts = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        if parts:
            state = QuantState.from_dict(parts, device=torch.device("cpu"))
            out[name] = bnb.dequantize_4bit(value, state)
        else:
            out[name] = value
    return out


def _dense_folder(tensors: dict[str, torch.Tensor], like: Path, folder: Path) -> Path:
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((like / "config.json").read_text())
    config.pop("quantization_config")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_merge_into_a_4bit_base_equals_merging_into_bitsandbytes_dequantization(tmp_path, quantized, lora):
    """A LoRA merged into a bnb-4bit base gives, byte for byte, what merging it into the dense
    model bitsandbytes dequantizes gives; every untouched 4-bit weight is bitsandbytes'."""
    reference = _bnb_dequantized(quantized)
    dequantized = _dense_folder(reference, quantized, tmp_path / "dequantized")
    result = run("merge", quantized, lora, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    assert run("merge", dequantized, lora, "-o", tmp_path / "expected").exit_code == 0
    got = load_file(tmp_path / "out" / "model.safetensors")
    expected = load_file(tmp_path / "expected" / "model.safetensors")
    assert got.keys() == expected.keys() == reference.keys()
    merged = 0
    for name, value in got.items():
        assert value.dtype == expected[name].dtype and torch.equal(
            value.view(torch.uint8), expected[name].view(torch.uint8)
        ), name
        if any(f"{t}.weight" in name for t in TARGETS):
            merged += 1
            assert not torch.equal(value, reference[name]), f"{name} was not merged"
        else:
            assert torch.equal(value.view(torch.uint8), reference[name].view(torch.uint8)), name
    assert merged == 3 * LLAMA["num_hidden_layers"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    report = json.loads(result.stdout)
    assert any("bitsandbytes" in note and "to BF16" in note for note in report["notes"]), report["notes"]


def test_the_merged_output_loads_in_transformers_and_verifies(tmp_path, dense, lora):
    from transformers import LlamaForCausalLM

    quantized = _quantized(dense, tmp_path / "nf4", "nf4", True)
    assert run("merge", quantized, lora, "-o", tmp_path / "out").exit_code == 0
    model = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert not hasattr(model.config, "quantization_config")
    ids = torch.arange(12).view(1, -1)
    assert torch.isfinite(model(ids).logits).all()
    result = run("verify", tmp_path / "out", lora, "--base", quantized)
    assert result.exit_code == 0, result.output


def test_dtype_widens_bitsandbytes_values_exactly(tmp_path, dense, lora):
    quantized = _quantized(dense, tmp_path / "nf4", "nf4", False)
    reference = _bnb_dequantized(quantized)
    assert run("merge", quantized, lora, "-o", tmp_path / "out", "--dtype", "fp32").exit_code == 0
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        name = "model.layers.1.mlp.up_proj.weight"
        value = f.get_tensor(name)
    assert value.dtype == torch.float32
    assert torch.equal(value, reference[name].float())


def test_inspect_names_the_format(tmp_path, dense):
    quantized = _quantized(dense, tmp_path / "nf4", "nf4", True)
    result = run("inspect", quantized, "--json")
    assert result.exit_code == 0, result.output
    storage = json.loads(result.stdout)["quantization"]
    assert storage["formats"] == {"bitsandbytes NF4 (64-value blocks, double-quantized scales)": 14}
    assert storage["companion_tensors"] == 14 * 5
    # dequantized, the model is as large as the bf16 model it was quantized from
    dense_bytes = sum(t.nbytes for t in load_file(dense / "model.safetensors").values())
    assert storage["dequantized_bf16_bytes"] == dense_bytes


def test_blocks_that_straddle_rows_decode_as_bitsandbytes_quantized_them(tmp_path):
    """With 176 input columns, 64-value blocks run across rows. Decoding follows the flat block
    layout bitsandbytes' quantizer writes and its reference (pure torch) dequantization reads;
    its CPU kernel, which assumes blocks start each row, disagrees with both there."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code
    from bitsandbytes.functional import QuantState, dequantize_blockwise
    from peft import LoraConfig
    from transformers import LlamaForCausalLM

    dense = _dense(tmp_path / "dense", 176)
    quantized = _quantized(dense, tmp_path / "nf4", "nf4", True)
    factory = lambda: LlamaForCausalLM.from_pretrained(dense, dtype=torch.bfloat16)  # noqa: E731
    config = LoraConfig(r=2, target_modules=["q_proj"])
    lora = lora_oracle.train_lora(factory, config, tmp_path / "lora", seed=1)
    result = run("merge", quantized, lora, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    tensors = load_file(quantized / "model.safetensors")
    got = load_file(tmp_path / "out" / "model.safetensors")
    for layer in range(LLAMA["num_hidden_layers"]):
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        parts = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        state = QuantState.from_dict(parts, device=torch.device("cpu"))
        absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset
        code = _get_4bit_code("nf4", torch.device("cpu"))
        packed = tensors[name].view(-1)
        expected = _dequantize_4bit_compute(packed, absmax, code, 64, state.shape, torch.bfloat16)
        assert got[name].shape == (LLAMA["hidden_size"], 176)
        assert torch.equal(got[name].view(torch.int16), expected.view(torch.int16)), name


def _damaged(quantized: Path, folder: Path, change) -> Path:
    folder.mkdir()
    tensors = load_file(quantized / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text((quantized / "config.json").read_text())
    return folder


STATE = "model.layers.0.self_attn.q_proj.weight"


def _state_json(tensors, **changes):
    key = f"{STATE}.quant_state.bitsandbytes__nf4"
    fields = json.loads(bytes(tensors[key].tolist())) | changes
    tensors[key] = torch.tensor(list(json.dumps(fields).encode()), dtype=torch.uint8)


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        (lambda t: t.pop(f"{STATE}.absmax"), (f"{STATE}.absmax is missing",)),
        (lambda t: t[f"{STATE}.quant_map"].mul_(2), ("not bitsandbytes' nf4 code table",)),
        (lambda t: _state_json(t, shape=[128, 64]), (f"{STATE} is U8", "uint8 holding 4096 bytes")),
        (lambda t: _state_json(t, blocksize=48), ("blocksize 48",)),
        (lambda t: _state_json(t, quant_type="fp4"), ("quant_type 'fp4', not 'nf4'",)),
        (
            lambda t: t.update({f"{STATE}.quant_state.bitsandbytes__nf4": torch.tensor([1, 2]).byte()}),
            ("does not hold JSON",),
        ),
    ],
    ids=["no-absmax", "quant-map", "shape", "blocksize", "type", "not-json"],
)
def test_a_damaged_4bit_weight_is_refused_by_name(tmp_path, dense, lora, change, expect):
    quantized = _quantized(dense, tmp_path / "nf4", "nf4", False)
    broken = _damaged(quantized, tmp_path / "broken", change)
    fails(tmp_path, "merge", broken, lora, "-o", tmp_path / "out", expect=expect)


def test_bitsandbytes_8bit_stays_refused(tmp_path, dense, lora):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        dense, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    )
    try:
        model.save_pretrained(tmp_path / "int8")
    except Exception as exc:  # some bitsandbytes builds cannot save int8 on CPU
        pytest.fail(f"could not build the 8-bit checkpoint: {exc}")
    fails(tmp_path, "merge", tmp_path / "int8", lora, "-o", tmp_path / "out", expect=("bitsandbytes",))


def test_a_4bit_config_without_quant_states_is_refused(tmp_path, dense, lora):
    quantized = _quantized(dense, tmp_path / "nf4", "nf4", False)
    plain = _dense_folder(_bnb_dequantized(quantized), quantized, tmp_path / "plain")
    config = json.loads((quantized / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps(config))
    fails(tmp_path, "merge", plain, lora, "-o", tmp_path / "out", expect=("bitsandbytes", "quant_method"))
