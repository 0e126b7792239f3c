"""Block-FP8 checkpoints for tests, quantized by a float64 reference written here.

The model is Llama-shaped with the sizes that break naive block code: 352-row MLP weights
(two whole 128-row blocks and a partial one), o_proj and down_proj with partial column
blocks, and q_proj of 576 rows (DeepSeek-V3's `kv_a_proj_with_mqa` height: 4½ blocks). Every
Linear weight of the layers is stored as F8_E4M3 codes beside `weight_scale_inv` (float32,
one per 128×128 block), as DeepSeek-V3 and Qwen3-FP8 store them; embeddings, norms and
`lm_head` stay bf16 (`modules_to_not_convert`).

The reference rounds to nearest with ties to even by looking values up in the table of
every finite e4m3 value, in float64: it shares no code with bonemerge's torch casts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIG = dict(
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=1,
    num_attention_heads=4,
    head_dim=144,
    num_key_value_heads=2,
    vocab_size=256,
    tie_word_embeddings=False,
)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCK = 128
QUANTIZATION = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [BLOCK, BLOCK],
    "modules_to_not_convert": ["lm_head"],
}
MAX = 448.0
# every finite non-negative e4m3 value, indexed by its code (0x00 ... 0x7E)
VALUES = torch.arange(0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).double()


def is_quantized(name: str) -> bool:
    return name.endswith(".weight") and name.rsplit(".", 2)[-2] in LINEARS


def rne(values: torch.Tensor) -> torch.Tensor:
    """Codes (uint8) of float64 `values` (|v| ≤ 448 + 16) rounded to nearest, ties to even."""
    magnitude = values.abs().clamp(max=MAX)
    high = torch.searchsorted(VALUES, magnitude).clamp(max=0x7E)
    low = (high - 1).clamp(min=0)
    below = magnitude - VALUES[low]
    above = VALUES[high] - magnitude
    code = torch.where(below < above, low, high)
    code = torch.where((below == above) & (low != high), torch.where(low % 2 == 0, low, high), code)
    code = torch.where(VALUES[high] == magnitude, high, code)
    return (code | (torch.signbit(values).long() << 7)).to(torch.uint8)


def block_view(scale: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Each element's block scale, as float64 of `shape`."""
    return scale.double().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[: shape[0], : shape[1]]


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes as float8_e4m3fn, scale_inv float32) of a 2-D weight, from float64."""
    weight = weight.double()
    rows, cols = weight.shape
    scale = torch.empty(-(-rows // BLOCK), -(-cols // BLOCK), dtype=torch.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            block = weight[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK]
            scale[i, j] = float(block.abs().max() / MAX)
    codes = rne(weight / block_view(scale, weight.shape))
    return codes.view(torch.float8_e4m3fn), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float64 values of block-FP8 codes (exact: 4 + 24 significant bits)."""
    return codes.double() * block_view(scale, tuple(codes.shape))


def encode_reference(merged: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, set]:
    """The float64 reference of a merge kept in block FP8: codes = RNE(merged / s) on the stored
    scales, except blocks where some |merged / s| > 464, which get float32(amax / 448).
    Returns (codes uint8, scales, the set of rescaled blocks)."""
    scale = scale.clone()
    scaled = merged / block_view(scale, tuple(merged.shape))
    rescaled = set()
    for i, j in {(int(r) // BLOCK, int(c) // BLOCK) for r, c in torch.nonzero(scaled.abs() > 464)}:
        block = merged[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK]
        scale[i, j] = float(block.abs().max() / MAX)
        rescaled.add((i, j))
    scaled = merged / block_view(scale, tuple(merged.shape))
    return rne(scaled.clamp(-MAX, MAX)), scale, rescaled


def llama_weights(seed: int = 7, sizes: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """float32 weights and config of a freshly initialised Llama of `CONFIG` (| `sizes`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**(CONFIG | (sizes or {}))))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, model.config.to_dict()


def write_fp8_llama(folder: Path, seed: int = 7, shards: int = 2, sizes: dict | None = None) -> Path:
    """A block-FP8 Llama checkpoint (see the module docstring) in `shards` files; `sizes`
    overrides the config's sizes."""
    weights, config = llama_weights(seed, sizes)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in weights.items():
        if is_quantized(name):
            tensors[name], tensors[name + "_scale_inv"] = quantize(value)
        else:
            tensors[name] = value.to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for number in range(shards):
        file = f"model-{number + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: t for n, t in tensors.items() if _shard(n, shards) == number}
        save_file(part, folder / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index | {"weight_map": weight_map}))
    config |= {"quantization_config": QUANTIZATION, "torch_dtype": "bfloat16"}
    config["architectures"] = ["LlamaForCausalLM"]
    config.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _shard(name: str, shards: int) -> int:
    """Layer N in file N mod `shards` (a weight beside its scale, as real checkpoints keep
    them); everything outside the layers in the last file."""
    parts = name.split(".")
    return int(parts[2]) % shards if parts[1] == "layers" else shards - 1


def read_fp8(folder: Path) -> dict[str, torch.Tensor]:
    from tests.oracle import read_folder

    return read_folder(folder)


def dequantized(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every weight of a block-FP8 state dict in float64 (quantized ones dequantized)."""
    out = {}
    for name, value in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        scale = tensors.get(name + "_scale_inv")
        out[name] = dequantize(value, scale) if scale is not None else value.double()
    return out


def factory(folder: Path, dtype: torch.dtype = torch.float64, sizes: dict | None = None):
    """A Llama built from the dequantized checkpoint at `folder`, in `dtype` (for PEFT)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    values = dequantized(read_fp8(folder))

    def make():
        model = LlamaForCausalLM(LlamaConfig(**(CONFIG | (sizes or {})))).to(dtype)
        model.load_state_dict({k: v.to(dtype) for k, v in values.items()})
        return model.eval()

    return make


def shrunk_lora(make, path: Path, targets: list[str], shrink: float = 0.1, **settings) -> Path:
    """A PEFT LoRA (init_lora_weights=False, then random factors) on the model `make` builds, its
    B shrunk so that the update is about a code step: the regime where rounding decides what
    survives."""
    from peft import LoraConfig

    from tests import lora_oracle

    config = LoraConfig(r=16, lora_alpha=24, target_modules=targets, init_lora_weights=False, **settings)
    model = lora_oracle.lora_model(make, config, seed=3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(shrink)
    model.save_pretrained(path)
    return path


def merge_json(base: Path, adapters: list[Path], out: Path, *options: object) -> dict:
    """`bonemerge merge ... --json`, required to succeed; its report."""
    from tests.cliutil import run

    result = run("merge", base, *adapters, "-o", out, "--json", *options)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def ordinal(codes: torch.Tensor) -> torch.Tensor:
    """e4m3 codes as integers ordered like their values (code steps apart = integers apart)."""
    bits = codes.view(torch.uint8).int()
    return torch.where(bits >= 0x80, -(bits - 0x80), bits)
