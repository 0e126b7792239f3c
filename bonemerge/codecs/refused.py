"""Quantized formats bonemerge cannot decode yet, refused by name before anything is read.

Their tensors (packed integers, code books, per-group scales) would be garbage if merged as if
they were dense weights, so a checkpoint that shows one, by its config's
`quantization_config.quant_method` or by its tensor names, is refused with what to do instead.
Each of these is meant to become one more codec (see `base.py`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from bonemerge.checkpoint import Checkpoint
from bonemerge.codecs.compressed_fp8 import QUANT_METHOD, refusal
from bonemerge.errors import CheckpointError

_DEQUANTIZE = (
    "merge into the unquantized original model instead, or dequantize this one first (load it "
    "with transformers and save_pretrained it in bfloat16), and quantize the merged model again"
)
# quant_method (transformers' name) -> how messages name the format
_METHODS = {
    "bitsandbytes": "bitsandbytes",
    "gptq": "GPTQ",
    "awq": "AWQ",
    "modelopt": "ModelOpt (NVFP4/FP8)",
    "fbgemm_fp8": "FBGEMM FP8 (per-channel)",
    "fp_quant": "FP-Quant (MXFP4/NVFP4)",
    "hqq": "HQQ",
    "quanto": "Quanto",
    "eetq": "EETQ",
    "aqlm": "AQLM",
    "vptq": "VPTQ",
    "higgs": "HIGGS",
    "spqr": "SpQR",
    "bitnet": "BitNet",
    "torchao": "torchao",
    "auto-round": "AutoRound",
    "exl2": "ExLlamaV2",
}
# tensor names that give a format away even without a config
_BNB_PARTS = re.compile(
    r"^(?P<weight>.+)\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\.[\w.]+)$"
)
_BNB_4BIT = re.compile(r"\.quant_state\.bitsandbytes__(nf4|fp4)$")
_TENSORS = (
    (_BNB_PARTS, "bitsandbytes"),
    (re.compile(r"\.SCB$"), "bitsandbytes 8-bit (LLM.int8)"),
    (re.compile(r"\.(qweight|qzeros|g_idx)$"), "GPTQ/AWQ"),
    (re.compile(r"\.weight_(packed|zero_point|global_scale)$"), "compressed-tensors"),
    (re.compile(r"\.weight_scale_2$"), "NVFP4"),
)
_STORED = (
    "bonemerge reads dense, block-FP8 (quant_method fp8, weight_scale_inv), compressed-tensors "
    "FP8 (float-quantized, weight_scale), MXFP4 (gpt-oss experts, _blocks and _scales) and "
    "bitsandbytes 4-bit (NF4/FP4, read into a dense output) weights only"
)


def refuse_unsupported(checkpoint: Checkpoint, config: Mapping) -> None:
    """Refuse a checkpoint stored in a quantized format no codec decodes, naming it."""
    quantization = config.get("quantization_config") or {}
    method = quantization.get("quant_method") if isinstance(quantization, Mapping) else None
    where = str(checkpoint.root)
    # 4-bit bitsandbytes weights, each with its quant state, are read by a codec (`bnb4.py`)
    four_bit = {name.split(".quant_state.")[0] for name in checkpoint.tensors if _BNB_4BIT.search(name)}
    if isinstance(method, str) and method.lower() == "bitsandbytes" and four_bit:
        method = None
    compressed = isinstance(method, str) and method.lower() == QUANT_METHOD
    reason = refusal(quantization) if compressed else None
    if reason is not None:
        raise CheckpointError(
            f"{where} is quantized with {reason} (config.json quantization_config); {_STORED}, and "
            f"will not merge these as if they were dense: {_DEQUANTIZE}."
        )
    if isinstance(method, str) and method.lower() in _METHODS:
        raise CheckpointError(
            f"{where} is quantized with {_METHODS[method.lower()]} (config.json quantization_config."
            f"quant_method {method!r}); {_STORED}, and will not merge these as if they were dense: "
            f"{_DEQUANTIZE}."
        )
    for name, ref in checkpoint.tensors.items():
        for pattern, what in _TENSORS:
            match = pattern.search(name)
            if match and not (pattern is _BNB_PARTS and match.group("weight") in four_bit):
                _refuse_tensor(where, name, what)
        weight = checkpoint.tensors.get(name.removesuffix("_scale"), ref)
        # compressed-tensors FP8 is read by a codec (`compressed_fp8.py`) when the config says so
        fp8 = compressed and weight.dtype == "F8_E4M3"
        if name.endswith(".weight_scale") and weight.dtype in ("F8_E4M3", "U8") and not fp8:
            _refuse_tensor(where, name, "per-channel or per-tensor FP8/FP4 (compressed-tensors or ModelOpt)")


def _refuse_tensor(where: str, name: str, what: str) -> None:
    raise CheckpointError(
        f"{where} holds {name}, a tensor of {what} quantization; {_STORED}, and will not merge "
        f"these as if they were dense: {_DEQUANTIZE}."
    )
