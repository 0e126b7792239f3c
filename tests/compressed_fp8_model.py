"""compressed-tensors FP8 checkpoints for tests, quantized by a float64 reference written here.

The model is `fp8_model`'s Llama (352-row MLP weights, a 576-row q_proj, partial 128-blocks).
Every Linear weight of the layers is `F8_E4M3` codes beside `weight_scale` in the layout
llm-compressor writes (checked against the library's own output in `tests/data`): one scale
per output channel `[out, 1]`, one per tensor `[1]` (with static `input_scale`s, as the `FP8`
preset has them), or one per 128 × 128 block; scales in float32 or bfloat16; `lm_head` stays
bf16 (`ignore`). The config mirrors the library's `config.json` for one config group.

Scales are amax / 448 rounded to nearest in the scale dtype; codes are rounded to nearest even
by `fp8_model.rne` (a float64 table look-up). A *group* is the set of elements sharing a
scale: a row, the tensor, or a block.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests import fp8_model as fm

MAX = 448.0
OVERFLOW = 464.0
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16}
INPUT_SCALE = 0.0234375


def quantization(strategy: str) -> dict:
    """`quantization_config` as compressed-tensors 0.20.1 writes it for one FP8 preset."""
    weights = {
        "dynamic": False,
        "group_size": None,
        "num_bits": 8,
        "strategy": strategy,
        "symmetric": True,
        "type": "float",
    }
    activations = {"dynamic": True, "group_size": None, "num_bits": 8, "strategy": "token"}
    if strategy == "block":
        weights["block_structure"] = [128, 128]
        activations = {"dynamic": True, "group_size": 128, "num_bits": 8, "strategy": "group"}
    if strategy == "tensor":
        activations = {"dynamic": False, "group_size": None, "num_bits": 8, "strategy": "tensor"}
        activations["observer"] = "static_minmax"
    group = {
        "format": "float-quantized",
        "input_activations": activations | {"symmetric": True, "type": "float"},
        "output_activations": None,
        "targets": ["Linear"],
        "weights": weights,
    }
    return {
        "config_groups": {"group_0": group},
        "format": "float-quantized",
        "global_compression_ratio": None,
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.20.1",
    }


def block_of(strategy: str, shape: tuple[int, int]) -> tuple[int, int]:
    """The rows × columns of a group."""
    return {"channel": (1, shape[1]), "tensor": shape, "block": (128, 128)}[strategy]


def grid(scale: torch.Tensor) -> torch.Tensor:
    """A stored scale as a 2-D grid of groups (a per-tensor [1] as [1, 1])."""
    return scale.reshape(scale.shape[0] if scale.dim() == 2 else 1, -1)


def expand(scale: torch.Tensor, strategy: str, shape: tuple[int, int]) -> torch.Tensor:
    """Each element's scale, float64, from a stored scale."""
    b0, b1 = block_of(strategy, shape)
    values = grid(scale).double().repeat_interleave(b0, 0).repeat_interleave(b1, 1)
    return values[: shape[0], : shape[1]]


def groups(strategy: str, shape: tuple[int, int]):
    """(grid index, rows slice, columns slice) of every group."""
    b0, b1 = block_of(strategy, shape)
    for i in range(math.ceil(shape[0] / b0)):
        for j in range(math.ceil(shape[1] / b1)):
            yield (i, j), slice(i * b0, (i + 1) * b0), slice(j * b1, (j + 1) * b1)


def ceil_bits(value: float, bits: int) -> float:
    """The smallest float of `bits` significant bits at or above a positive `value` (no
    exponent limits: bf16's range is float32's)."""
    _, exponent = math.frexp(value)
    step = 2.0 ** (exponent - bits)
    return math.ceil(value / step) * step


def ceil_bf16(value: float) -> float:
    """The smallest bfloat16 at or above a positive `value`."""
    return ceil_bits(value, 8)


def new_scale(amax: float, dtype: str) -> float:
    """The scale an overflowing group gets: float32(amax / 448), or for bf16 the smallest
    bf16 at or above it."""
    exact = amax / MAX
    return float(torch.tensor(exact, dtype=torch.float32)) if dtype == "F32" else ceil_bf16(exact)


def scale_shape(strategy: str, shape: tuple[int, int]) -> tuple[int, ...]:
    if strategy == "tensor":
        return (1,)
    b0, b1 = block_of(strategy, shape)
    return (math.ceil(shape[0] / b0), math.ceil(shape[1] / b1))


def quantize(weight: torch.Tensor, strategy: str, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes as float8_e4m3fn, stored scale) of a 2-D weight, from float64."""
    weight = weight.double()
    shape = tuple(weight.shape)
    scale = torch.empty(scale_shape(strategy, shape), dtype=torch.float64)
    flat = grid(scale)
    for (i, j), rows, cols in groups(strategy, shape):
        flat[i, j] = float(weight[rows, cols].abs().max() / MAX)
    scale = scale.to(DTYPES[dtype])
    codes = fm.rne(weight / expand(scale, strategy, shape))
    return codes.view(torch.float8_e4m3fn), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, strategy: str) -> torch.Tensor:
    """float64 values (exact: code × scale)."""
    return codes.double() * expand(scale, strategy, tuple(codes.shape))


def encode_reference(
    merged: torch.Tensor, scale: torch.Tensor, strategy: str
) -> tuple[torch.Tensor, torch.Tensor, set]:
    """The float64 reference of a merge kept in the format: codes = RNE(merged / s) on the
    stored scale, except groups where some |merged / s| > 464, which get `new_scale`.
    Returns (codes uint8, scale in its dtype, the set of rescaled groups)."""
    dtype = "F32" if scale.dtype == torch.float32 else "BF16"
    shape = tuple(merged.shape)
    scale = scale.clone()
    flat = grid(scale)
    scaled = merged / expand(scale, strategy, shape)
    rescaled = set()
    for index, rows, cols in groups(strategy, shape):
        if bool((scaled[rows, cols].abs() > OVERFLOW).any()):
            flat[index] = new_scale(float(merged[rows, cols].abs().max()), dtype)
            rescaled.add(index)
    scaled = merged / expand(scale, strategy, shape)
    return fm.rne(scaled.clamp(-MAX, MAX)), scale, rescaled


def write_llama(
    folder: Path, strategy: str, dtype: str = "F32", seed: int = 7, sizes: dict | None = None
) -> Path:
    """A compressed-tensors FP8 Llama (see the module docstring), in two files."""
    weights, config = fm.llama_weights(seed, sizes)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in weights.items():
        if fm.is_quantized(name):
            tensors[name], tensors[name + "_scale"] = quantize(value, strategy, dtype)
            if strategy == "tensor":
                module = name.removesuffix("weight")
                tensors[module + "input_scale"] = torch.full((1,), INPUT_SCALE, dtype=DTYPES[dtype])
        else:
            tensors[name] = value.to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for number in range(2):
        file = f"model-{number + 1:05d}-of-00002.safetensors"
        part = {n: t for n, t in tensors.items() if (n.startswith("model.layers.")) == (number == 0)}
        save_file(part, folder / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index | {"weight_map": weight_map}))
    config |= {"quantization_config": quantization(strategy), "torch_dtype": "bfloat16"}
    config["architectures"] = ["LlamaForCausalLM"]
    config.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def dequantized(tensors: dict[str, torch.Tensor], strategy: str) -> dict[str, torch.Tensor]:
    """Every weight of the state dict in float64 (quantized ones dequantized), scales left out."""
    out = {}
    for name, value in tensors.items():
        if name.endswith(("_scale", "input_scale")):
            continue
        scale = tensors.get(name + "_scale")
        out[name] = dequantize(value, scale, strategy) if scale is not None else value.double()
    return out


def factory(values: dict[str, torch.Tensor], dtype: torch.dtype = torch.float64, sizes: dict | None = None):
    """A Llama holding `values` (float64 weights), in `dtype` (for PEFT)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make():
        model = LlamaForCausalLM(LlamaConfig(**(fm.CONFIG | (sizes or {})))).to(dtype)
        model.load_state_dict({k: v.to(dtype) for k, v in values.items()})
        return model.eval()

    return make
