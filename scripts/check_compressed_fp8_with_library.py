"""Load compressed-tensors FP8 checkpoints (bonemerge's merges) with the library and transformers.

For each folder given: transformers' compressed-tensors integration loads the model
dequantized (`CompressedTensorsConfig(dequantize=True)`), and every quantized weight it holds
must equal the library's own decompression of the codes and scales in the files, and that
decompression must equal code × scale rounded once to the scale's dtype; the model must run.
A folder whose config has several config groups is checked through the library's
decompression only (transformers 5.24's loader decompresses every dense weight with one group's scheme,
`get_dense_scheme`, and fails on the block weights of such a model, the library-made fixture
included).

Run it in the separate environment of `make_compressed_fp8_fixture.py`:

    /tmp/ctvenv/bin/python scripts/check_compressed_fp8_with_library.py MERGED_FOLDER...
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationScheme
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, CompressedTensorsConfig


def _matches(targets: list[str], module: str) -> bool:
    for target in targets:
        if (
            target == "Linear"
            or (target.startswith("re:") and re.match(target[3:], module))
            or target == module
        ):
            return True
    return False


def check(folder: Path) -> str:
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state |= load_file(file)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    compressor = BaseCompressor.get_value_from_registry(config["format"])
    decompressed = {}
    for group in config["config_groups"].values():
        scheme = QuantizationScheme.model_validate(group)
        for name in state:
            module = name.removesuffix(".weight")
            if (
                name.endswith(".weight")
                and f"{module}.weight_scale" in state
                and _matches(group["targets"], module)
            ):
                if name in decompressed:
                    continue
                local = {"weight": state[name], "weight_scale": state[f"{module}.weight_scale"]}
                value = compressor.decompress(local, scheme)["weight"]
                codes, scale = state[name], state[f"{module}.weight_scale"]
                b0, b1 = scheme.weights.block_structure or (1, codes.shape[1])
                if scheme.weights.strategy == "tensor":
                    b0, b1 = codes.shape
                wide = scale.reshape(-1, scale.shape[-1] if scale.dim() == 2 else 1).float()
                wide = wide.repeat_interleave(b0, 0).repeat_interleave(b1, 1)[
                    : codes.shape[0], : codes.shape[1]
                ]
                simple = (codes.float() * wide).to(scale.dtype)
                assert torch.equal(value, simple), f"{name}: the library's decompression is not code × scale"
                decompressed[name] = value
    quantized = sum(1 for n in state if n.endswith(".weight_scale"))
    assert len(decompressed) == quantized, (len(decompressed), quantized)
    if len(config["config_groups"]) > 1:
        return f"{folder}: {quantized} weights decompressed to code × scale (several groups: loader not run)"
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    loaded = model.state_dict()
    for name, value in decompressed.items():
        expected = value.to(
            loaded[name].dtype
        )  # float32 scales: decompressed in fp32, then the model's dtype
        assert torch.equal(loaded[name], expected), f"{name}: transformers loaded other values"
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()
    return f"{folder}: {quantized} weights loaded by transformers as the library decompresses them; runs"


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        print(check(Path(argument)))
