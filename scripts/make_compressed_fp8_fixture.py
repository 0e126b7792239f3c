"""Make tests/data/compressed_fp8: a tiny Llama quantized and saved by compressed-tensors itself.

The checked-in fixture is outside truth for bonemerge's compressed-tensors FP8 codec: the
layout (tensor names, shapes, dtypes, `quantization_config`) is what the library writes, and
`compressed_fp8_dequantized.safetensors` beside it is what the library decompresses from it
(its float-quantized compressor's `decompress`, per weight), so bonemerge's decoding can be
checked against the library's own.

Run it in a separate environment, never bonemerge's (compressed-tensors pins torch and
transformers versions):

    python -m venv /tmp/ctvenv
    /tmp/ctvenv/bin/pip install torch==2.13.0 compressed-tensors==0.20.1 transformers==5.24.0
    /tmp/ctvenv/bin/python scripts/make_compressed_fp8_fixture.py tests/data/compressed_fp8

The model is bf16, so the library makes bf16 scales. Its weights use all three FP8 weight
strategies, one config group each, as llm-compressor's presets define them: attention
projections `FP8` (one scale per tensor, static per-tensor input scales, set here by hand as
a calibration would), gate and up `FP8_BLOCK` (128 × 128 blocks; 160 rows: one whole block
row and a partial one), down `FP8_DYNAMIC` (one scale per output channel).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import (
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    apply_quantization_config,
)
from compressed_tensors.quantization.quant_scheme import FP8, FP8_BLOCK, FP8_DYNAMIC
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

SIZES = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=1,
    num_attention_heads=2,
    head_dim=32,
    num_key_value_heads=1,
    vocab_size=32,
    tie_word_embeddings=False,
)
GROUPS = {
    "group_0": (FP8, [r"re:.*self_attn\.(q|k|v|o)_proj$"]),
    "group_1": (FP8_BLOCK, [r"re:.*mlp\.(gate|up)_proj$"]),
    "group_2": (FP8_DYNAMIC, [r"re:.*mlp\.down_proj$"]),
}


def _weight_scale(weight: torch.Tensor, scheme: QuantizationScheme) -> torch.Tensor:
    """The library's own scale (`calculate_qparams`) from the min and max its strategy sees."""
    args = scheme.weights
    if args.strategy == "tensor":
        low, high = torch.aminmax(weight)
        low, high = low.reshape(1), high.reshape(1)
    elif args.strategy == "channel":
        low, high = weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True)
    else:
        b0, b1 = args.block_structure
        rows, cols = weight.shape
        low = torch.empty(-(-rows // b0), -(-cols // b1), dtype=weight.dtype)
        high = torch.empty_like(low)
        for i in range(low.shape[0]):
            for j in range(low.shape[1]):
                block = weight[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1]
                low[i, j], high[i, j] = block.min(), block.max()
    scale, _ = calculate_qparams(low, high, args)
    return scale


def _decompressed(folder: Path, config: QuantizationConfig) -> dict[str, torch.Tensor]:
    """Each quantized weight of the saved checkpoint as the library decompresses it: the
    compressor its config names (`float-quantized`), with the weight's config group's scheme
    (what transformers' loader calls per weight; transformers 5.24's loader decompresses every dense
    weight with one group's scheme, `get_dense_scheme`, and fails on this model's block weights)."""
    from compressed_tensors.compressors import BaseCompressor

    state = load_file(folder / "model.safetensors")
    saved = json.loads((folder / "config.json").read_text())["quantization_config"]
    compressor = BaseCompressor.get_value_from_registry(saved["format"])
    values = {}
    for group in config.config_groups.values():
        pattern = re.compile(group.targets[0].removeprefix("re:"))
        for name in state:
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and pattern.match(module):
                local = {leaf: state[f"{module}.{leaf}"] for leaf in ("weight", "weight_scale")}
                values[name] = compressor.decompress(local, group)["weight"].contiguous()
    return values


def main(out: Path) -> None:
    torch.manual_seed(11)
    model = LlamaForCausalLM(LlamaConfig(**SIZES)).to(torch.bfloat16)
    with torch.no_grad():  # an outlier, so that one per-tensor scale differs from the others' amax
        model.model.layers[0].self_attn.q_proj.weight[3, 5] = 0.5
    config = QuantizationConfig(
        config_groups={
            name: QuantizationScheme(targets=targets, **preset) for name, (preset, targets) in GROUPS.items()
        },
        ignore=["lm_head"],
    )
    apply_quantization_config(model, config)
    with torch.no_grad():
        for name, module in model.named_modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None:
                continue
            module.weight_scale.copy_(_weight_scale(module.weight, scheme))
            if hasattr(module, "input_scale"):
                module.input_scale.fill_(0.0234375 if "q_proj" in name else 0.015625)
            module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    values = _decompressed(out, config)
    save_file(values, out.parent / f"{out.name}_dequantized.safetensors")
    (out / "generation_config.json").unlink()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
