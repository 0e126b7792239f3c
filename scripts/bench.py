#!/usr/bin/env python
"""Benchmark `bonemerge merge` against `cp -r && sync` and PEFT's own merge route.

    python scripts/bench.py --size 1b                # 1.1B (TinyLlama shapes), 3 rounds
    python scripts/bench.py --size 135m --size 1b --size 7b --repeat 3 --cache /big/disk

Checkpoints are Llama-shaped bf16 with random weights, real tensor names, shapes and 1 GB
shards; adapters are made with PEFT (on a meta-device model, so no weights are built) for
Bone r=64, Bat r=64, MiSS mini, LoRA r=16 and r=128 and DoRA r=16 on all seven projections,
and LoRA r=16 on q_proj and v_proj only (PEFT's default for Llama). `--size moe --variants
experts16` is the mixture-of-experts row: a Qwen3-MoE with 64 experts stored one tensor per
expert, and LoRA r=16 on its fused expert parameters (target_parameters) and q/v. `--size fp8
--variants lora16 --no-peft` is the block-FP8 row: DeepSeek-V3's dense layers (MLA attention,
the 576-row `kv_a_proj_with_mqa` with its half block) as F8_E4M3 codes beside float32
`weight_scale_inv`, and LoRA r=16 on all eight projections. `--size mxfp4 --variants
experts16,experts16:bf16 --no-peft` is the MXFP4 row: gpt-oss-20b's layers with their experts
as MXFP4 blocks and scales, the expert LoRA merged kept MXFP4 and with `--dtype bf16`.
Everything is generated once into `--cache`. Each round runs every contender once, in turn
(A/B alternation), after reading the base once to warm the page cache; the table reports
medians. Wall time and peak RSS are whole process figures (interpreter start and imports
included), from `wait4` on each child.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SIZES = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab, tied)
    "135m": (576, 1536, 30, 9, 3, 49152, True),  # SmolLM2-135M
    "1b": (2048, 5632, 22, 32, 4, 32000, False),  # TinyLlama-1.1B
    "7b": (4096, 11008, 32, 32, 32, 32000, False),  # Llama-2-7B
}
MOE_SIZES = {
    # name: (hidden, expert intermediate, layers, heads, kv_heads, vocab, experts)
    # Qwen3-30B-A3B's layer shapes, 64 of its 128 experts, 4 of its 48 layers, one tensor per
    # expert and projection as save_pretrained writes them
    "moe": (2048, 768, 4, 32, 4, 32000, 64),
}
FP8_SIZES = {
    # name: (hidden, intermediate, layers, heads, q_lora_rank, kv_lora_rank, vocab)
    # DeepSeek-V3's dense layers (its first three; all 61 have this attention), 11 of them for
    # 7.3 GB; the vocabulary cut from 129,280 to 32,000 so that, as in the real 690 GB model,
    # the FP8 weights are most of the bytes (87 %) and the bf16 copies few
    "fp8": (7168, 18432, 11, 128, 1536, 512, 32000),
}
MXFP4_SIZES = {
    # name: (hidden, expert intermediate, layers, heads, kv_heads, vocab, experts)
    # gpt-oss-20b's layer shapes (32 experts, 2880 wide), 4 of its 24 layers, experts as MXFP4
    # `_blocks` and `_scales` as the released files store them; the vocabulary cut from 201,088
    # to 32,000 so that, as in the real model, the expert blocks are most of the bytes
    "mxfp4": (2880, 2880, 4, 64, 8, 32000, 32),
}
FP8_TARGETS = [
    *("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
    *("gate_proj", "up_proj", "down_proj"),
]
FP8_BLOCK = 128
FP8_SHARD_BYTES = 2 * 10**9
ADAPTERS = {
    "bone": {"peft_type": "BONE", "r": 64, "init_weights": True},
    "bat": {"peft_type": "BONE", "r": 64, "init_weights": "bat"},
    "mini": {"peft_type": "MISS", "r": 64, "init_weights": "mini", "mini_r": 64},
    "lora16": {"peft_type": "LORA", "r": 16, "lora_alpha": 32},
    "lora128": {"peft_type": "LORA", "r": 128, "lora_alpha": 256},
    "dora16": {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "use_dora": True},
    # PEFT's default targets for Llama: most of the checkpoint is copied untouched.
    "lora16qv": {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]},
    # MoE and MXFP4 sizes only: LoRA on the fused expert parameters (PEFT target_parameters)
    # and attention; `experts16:bf16` merges the same adapter with --dtype bf16
    "experts16": {
        "peft_type": "LORA",
        "r": 16,
        "lora_alpha": 32,
        "target_modules": ["q_proj", "v_proj"],
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    },
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHARD_BYTES = 10**9
OUT = "<output folder>"


def attention(p: str, hidden: int, heads: int, kv: int) -> list[tuple[str, tuple[int, ...]]]:
    head = hidden // heads
    return [
        (p + "self_attn.q_proj.weight", (heads * head, hidden)),
        (p + "self_attn.k_proj.weight", (kv * head, hidden)),
        (p + "self_attn.v_proj.weight", (kv * head, hidden)),
        (p + "self_attn.o_proj.weight", (hidden, heads * head)),
    ]


def moe_shapes(size: str) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a Qwen3MoeForCausalLM as save_pretrained writes it (per expert)."""
    hidden, inter, layers, heads, kv, vocab, experts = MOE_SIZES[size]
    head = hidden // heads
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            *attention(p, hidden, heads, kv),
            (p + "self_attn.q_norm.weight", (head,)),
            (p + "self_attn.k_norm.weight", (head,)),
            (p + "mlp.gate.weight", (experts, hidden)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
        for e in range(experts):
            shapes += [
                (p + f"mlp.experts.{e}.gate_proj.weight", (inter, hidden)),
                (p + f"mlp.experts.{e}.up_proj.weight", (inter, hidden)),
                (p + f"mlp.experts.{e}.down_proj.weight", (hidden, inter)),
            ]
    return [*shapes, ("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def fp8_shapes(size: str) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a dense DeepseekV3ForCausalLM (MLA attention with q and kv low-rank
    projections, rope 64 and nope 128 per head, values 128 per head)."""
    hidden, inter, layers, heads, q_rank, kv_rank, vocab = FP8_SIZES[size]
    rope, nope, value = 64, 128, 128
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_a_proj.weight", (q_rank, hidden)),
            (p + "self_attn.q_a_layernorm.weight", (q_rank,)),
            (p + "self_attn.q_b_proj.weight", (heads * (nope + rope), q_rank)),
            (p + "self_attn.kv_a_proj_with_mqa.weight", (kv_rank + rope, hidden)),
            (p + "self_attn.kv_a_layernorm.weight", (kv_rank,)),
            (p + "self_attn.kv_b_proj.weight", (heads * (nope + value), kv_rank)),
            (p + "self_attn.o_proj.weight", (hidden, heads * value)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    return [*shapes, ("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def mxfp4_tensors(size: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of a GptOssForCausalLM as its released files store it: each
    expert parameter as `_blocks` [E, out, in/32, 16] beside `_scales` [E, out, in/32], biases
    and everything else bf16."""
    hidden, inter, layers, heads, kv, vocab, experts = MXFP4_SIZES[size]
    head = 64
    found = [("model.embed_tokens.weight", "BF16", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, (out, inp) in {
            "q_proj": (heads * head, hidden),
            "k_proj": (kv * head, hidden),
            "v_proj": (kv * head, hidden),
            "o_proj": (hidden, heads * head),
        }.items():
            found += [
                (p + f"self_attn.{name}.weight", "BF16", (out, inp)),
                (p + f"self_attn.{name}.bias", "BF16", (out,)),
            ]
        found += [
            (p + "self_attn.sinks", "BF16", (heads,)),
            (p + "mlp.router.weight", "BF16", (experts, hidden)),
            (p + "mlp.router.bias", "BF16", (experts,)),
            (p + "input_layernorm.weight", "BF16", (hidden,)),
            (p + "post_attention_layernorm.weight", "BF16", (hidden,)),
        ]
        for name, out, inp in (("gate_up_proj", 2 * inter, hidden), ("down_proj", hidden, inter)):
            stem = p + f"mlp.experts.{name}"
            found += [
                (stem + "_bias", "BF16", (experts, out)),
                (stem + "_blocks", "U8", (experts, out, inp // 32, 16)),
                (stem + "_scales", "U8", (experts, out, inp // 32)),
            ]
    return [*found, ("model.norm.weight", "BF16", (hidden,)), ("lm_head.weight", "BF16", (vocab, hidden))]


def tensor_shapes(size: str) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes in the order transformers writes a LlamaForCausalLM (or a Qwen3-MoE,
    or a DeepSeek-V3)."""
    if size in MOE_SIZES:
        return moe_shapes(size)
    if size in FP8_SIZES:
        return fp8_shapes(size)
    hidden, inter, layers, heads, kv, vocab, tied = SIZES[size]
    hidden // heads
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            *attention(p, hidden, heads, kv),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    shapes.append(("model.norm.weight", (hidden,)))
    if not tied:
        shapes.append(("lm_head.weight", (vocab, hidden)))
    return shapes


def config(size: str) -> dict:
    if size in MXFP4_SIZES:
        hidden, inter, layers, heads, kv, vocab, experts = MXFP4_SIZES[size]
        return {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "head_dim": 64,
            "num_local_experts": experts,
            "num_experts_per_tok": 4,
            "layer_types": ["sliding_attention", "full_attention"] * (layers // 2),
            "sliding_window": 128,
            "vocab_size": vocab,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "quantization_config": {
                "quant_method": "mxfp4",
                "modules_to_not_convert": [
                    "model.layers.*.self_attn",
                    "model.layers.*.mlp.router",
                    "model.embed_tokens",
                    "lm_head",
                ],
            },
        }
    if size in FP8_SIZES:
        hidden, inter, layers, heads, q_rank, kv_rank, vocab = FP8_SIZES[size]
        return {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "hidden_size": hidden,
            "intermediate_size": inter,
            "moe_intermediate_size": 2048,
            "num_hidden_layers": layers,
            "first_k_dense_replace": layers,
            "n_routed_experts": 256,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "q_lora_rank": q_rank,
            "kv_lora_rank": kv_rank,
            "qk_rope_head_dim": 64,
            "qk_nope_head_dim": 128,
            "v_head_dim": 128,
            "vocab_size": vocab,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "quantization_config": {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
            },
        }
    if size in MOE_SIZES:
        hidden, inter, layers, heads, kv, vocab, experts = MOE_SIZES[size]
        return {
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "hidden_size": hidden,
            "intermediate_size": 6144,
            "moe_intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "head_dim": hidden // heads,
            "num_experts": experts,
            "num_experts_per_tok": 8,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "vocab_size": vocab,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }
    hidden, inter, layers, heads, kv, vocab, tied = SIZES[size]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
    }


def make_base(cache: Path, size: str) -> Path:
    """Random bf16 weights in 1 GB shards with an index, written once."""
    import torch
    from safetensors.torch import save_file

    if size in FP8_SIZES:
        return make_fp8_base(cache, size)
    if size in MXFP4_SIZES:
        return make_mxfp4_base(cache, size)
    folder = cache / f"base-{size}"
    if (folder / "done").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    filled = 0
    for name, shape in tensor_shapes(size):
        nbytes = 2 * int(torch.tensor(shape).prod()) if shape else 2
        if groups[-1] and filled + nbytes > SHARD_BYTES:
            groups.append([])
            filled = 0
        groups[-1].append((name, shape))
        filled += nbytes
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for number, group in enumerate(groups, start=1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        shard = {n: (torch.randn(s, generator=generator) * 0.02).to(torch.bfloat16) for n, s in group}
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, file)
        total += sum(t.numel() * 2 for t in shard.values())
        del shard
        print(f"  wrote {folder / file}", file=sys.stderr)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config(size), indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (folder / "done").write_text("")
    return folder


# safetensors lays out a file's data by dtype (widest first), then by name: the scales of a
# real checkpoint's weights come before the weights, as they do here
DTYPE_ORDER = {"F32": 0, "BF16": 1, "F8_E4M3": 2, "U8": 3}
WIDTH = {"F32": 4, "BF16": 2, "F8_E4M3": 1, "U8": 1}


def _fp8_tensors(size: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor of the block-FP8 base: each projection's codes
    beside its scales (edge blocks partial), everything else bf16."""
    found = []
    for name, shape in fp8_shapes(size):
        if name.rsplit(".", 2)[-2] in FP8_TARGETS:
            grid = tuple(-(-n // FP8_BLOCK) for n in shape)
            found += [(name, "F8_E4M3", shape), (name + "_scale_inv", "F32", grid)]
        else:
            found.append((name, "BF16", shape))
    return found


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    count = 1
    for n in shape:
        count *= n
    return WIDTH[dtype] * count


def _write_safetensors(path: Path, tensors: list[tuple[str, str, tuple[int, ...]]], data) -> int:
    """One safetensors file, tensor by tensor (`data(name, dtype, shape, nbytes)` yields each
    one's bytes in pieces): nothing is held whole. Returns the data bytes written."""
    import struct

    ordered = sorted(tensors, key=lambda t: (DTYPE_ORDER[t[1]], t[0]))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in ordered:
        nbytes = _nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, dtype, shape in ordered:
            for piece in data(name, dtype, shape, _nbytes(dtype, shape)):
                f.write(piece)
    return offset


def _write_quantized(
    folder: Path, size: str, tensors: list[tuple[str, str, tuple[int, ...]]], data, scales: str
) -> Path:
    """Write `tensors` in shards of about FP8_SHARD_BYTES with an index and config; a tensor
    named `...scales` stays in the file of the weight before it, as in the released checkpoints."""
    groups: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    filled = 0
    for tensor in tensors:
        nbytes = _nbytes(tensor[1], tensor[2])
        if groups[-1] and filled + nbytes > FP8_SHARD_BYTES and not tensor[0].endswith(scales):
            groups.append([])
            filled = 0
        groups[-1].append(tensor)
        filled += nbytes
    weight_map, total = {}, 0
    for number, group in enumerate(groups, start=1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        total += _write_safetensors(folder / file, group, data)
        weight_map |= {name: file for name, _, _ in group}
        print(f"  wrote {folder / file}", file=sys.stderr)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config(size), indent=2))
    (folder / "done").write_text("")
    return folder


def make_fp8_base(cache: Path, size: str) -> Path:
    """The block-FP8 checkpoint (see FP8_SIZES): codes cut from a pool of normal codes, scales
    drawn per block around 2e-4 (values of std ≈ 0.02), in ~2 GB shards with an index."""
    import numpy as np

    folder = cache / f"base-{size}"
    if (folder / "done").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    codes, values = _fp8_pools(0)
    rng = np.random.default_rng(1)

    def data(name: str, dtype: str, shape: tuple[int, ...], nbytes: int):
        if dtype == "F32":
            yield (rng.uniform(0.5, 1.5, size=shape).astype(np.float32) * 2e-4).tobytes()
            return
        pool = memoryview(codes if dtype == "F8_E4M3" else values)
        start = int(rng.integers(0, len(pool) // 2)) & ~1
        while nbytes:
            piece = pool[start : start + nbytes]
            yield piece
            nbytes -= len(piece)
            start = 0

    return _write_quantized(folder, size, _fp8_tensors(size), data, "_scale_inv")


def make_mxfp4_base(cache: Path, size: str) -> Path:
    """The MXFP4 checkpoint (see MXFP4_SIZES): blocks cut from a pool of e2m1 codes of
    normal values quantized as the released files are (a block's largest about 3-6 times its
    scale), scales 2^-8 to 2^-6 (values of std ≈ 0.02), in ~2 GB shards with an index."""
    import numpy as np

    folder = cache / f"base-{size}"
    if (folder / "done").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    _, values = _fp8_pools(0)
    rng = np.random.default_rng(1)
    # e2m1 codes of N(0, 2) (|x| < 7 mostly; beyond, the largest code), two a byte
    normal = rng.standard_normal(1 << 26, dtype=np.float32) * 2
    middles = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=np.float32)
    codes = np.searchsorted(middles, np.abs(normal)).astype(np.uint8) | (
        np.signbit(normal).astype(np.uint8) << 3
    )
    packed = (codes[0::2] | (codes[1::2] << 4)).tobytes()
    del normal, codes

    def data(name: str, dtype: str, shape: tuple[int, ...], nbytes: int):
        if name.endswith("_scales"):
            yield rng.integers(119, 122, size=shape, dtype=np.uint8).tobytes()
            return
        pool = memoryview(packed if dtype == "U8" else values)
        start = int(rng.integers(0, len(pool) // 2)) & ~1
        while nbytes:
            piece = pool[start : start + nbytes]
            yield piece
            nbytes -= len(piece)
            start = 0

    return _write_quantized(folder, size, mxfp4_tensors(size), data, "_scales")


def _fp8_pools(seed: int) -> tuple[bytes, bytes]:
    """64 Mi e4m3 codes and 16 Mi bf16 values of a normal distribution, from which the base's
    tensors are cut at random offsets: drawing 6 G random numbers would take minutes on two
    cores. Codes come from a table of 65,536 quantiles of N(0, σ) with the largest at 440, so
    a block's values span the format as quantized weights do."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    quantiles = torch.special.ndtri((torch.arange(65536, dtype=torch.float64) + 0.5) / 65536)
    table = (quantiles * (440 / float(quantiles.max()))).float().to(torch.float8_e4m3fn).view(torch.uint8)
    codes = table.numpy()[rng.integers(0, 65536, size=1 << 26, dtype=np.uint16)]
    values = torch.from_numpy(rng.standard_normal(1 << 24, dtype=np.float32) * 0.02)
    return codes.tobytes(), values.to(torch.bfloat16).view(torch.uint8).numpy().tobytes()


def make_adapter(cache: Path, size: str, kind: str, base: Path) -> Path:
    """An adapter with PEFT's names and config, built on a meta-device model (no weights)."""
    import torch
    from peft import BoneConfig, LoraConfig, MissConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = cache / f"adapter-{size}-{kind}"
    if (folder / "adapter_model.safetensors").is_file():
        return folder
    settings = dict(ADAPTERS[kind])
    method = settings.pop("peft_type")
    cls = {"BONE": BoneConfig, "MISS": MissConfig, "LORA": LoraConfig}[method]
    described = config(size)
    # the meta model is built unquantized: only the module names and shapes matter
    settings_of = {
        k: v for k, v in described.items() if k not in ("architectures", "model_type", "quantization_config")
    }
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(described["model_type"], **settings_of))
    settings.setdefault("target_modules", FP8_TARGETS if size in FP8_SIZES else TARGETS)
    peft_config = cls(base_model_name_or_path=str(base), **settings)
    model = get_peft_model(model, peft_config, low_cpu_mem_usage=True)
    generator = torch.Generator().manual_seed(1)
    state = {
        key: torch.randn(value.shape, generator=generator) * 0.01
        for key, value in get_peft_model_state_dict(model).items()
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    model.peft_config["default"].save_pretrained(folder)
    return folder


@dataclass
class Sample:
    seconds: float
    peak_rss: int
    cpu: float
    first_byte: float | None


def _first_byte(out: Path, began: float, found: list[float], stop: threading.Event) -> None:
    """Poll for the first weight bytes in the output (or its staging folder) every 2 ms."""
    staging = out.parent / f".{out.name}.bonemerge-partial"
    while not stop.is_set():
        for folder in (staging, out):
            try:
                if any(f.stat().st_size for f in folder.glob("*.safetensors")):
                    found.append(time.perf_counter() - began)
                    return
            except OSError:
                pass
        time.sleep(0.002)


# Children run as they would for a user, whose installed packages carry compiled bytecode:
# with PYTHONDONTWRITEBYTECODE (set on some CI machines) every run would recompile bonemerge.
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def run(command: list[str], out: Path, cwd: Path | None = None) -> Sample:
    """Wall time, CPU time (user + system), peak RSS (bytes) and time to the first written
    weight byte of one child process, from `wait4` and a polling thread."""
    began = time.perf_counter()
    found: list[float] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_first_byte, args=(out, began, found, stop), daemon=True)
    watcher.start()
    child = subprocess.Popen(command, env=CHILD_ENV, cwd=cwd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - began
    stop.set()
    watcher.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(command)}")
    cpu = usage.ru_utime + usage.ru_stime
    return Sample(seconds, usage.ru_maxrss * 1024, cpu, found[0] if found else None)


PEFT_ROUTE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""


def warm(folder: Path) -> None:
    for file in folder.glob("*.safetensors"):
        with open(file, "rb") as f:
            while f.read(64 << 20):
                pass


def machine(cache: Path) -> str:
    memory = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    disk = (
        subprocess.run(["df", "-hT", str(cache)], capture_output=True, text=True)
        .stdout.splitlines()[-1]
        .split()
    )
    return (
        f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"{memory / 2**30:.0f} GiB RAM, "
        f"disk {disk[0]} ({disk[1]}, {disk[2]}), Python {platform.python_version()}, "
        f"{datetime.date.today().isoformat()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size",
        action="append",
        choices=sorted(SIZES | MOE_SIZES | FP8_SIZES | MXFP4_SIZES),
        help="model size (repeatable; default 1b); moe: a Qwen3-MoE, 64 experts (--variants experts16); "
        "fp8: DeepSeek-V3's dense layers in block FP8 (--variants lora16 --no-peft); mxfp4: gpt-oss-20b's "
        "layers, experts in MXFP4 (--variants experts16,experts16:bf16 --no-peft)",
    )
    parser.add_argument(
        "--cache", type=Path, default=Path("bench-cache"), help="where checkpoints are generated"
    )
    parser.add_argument("--repeat", type=int, default=3, help="rounds of A/B alternation")
    parser.add_argument(
        "--variants",
        default="bone,bat,mini,lora16,lora128,dora16,lora16qv",
        help=f"comma-separated, of: {', '.join(ADAPTERS)}; KIND:DTYPE merges KIND with --dtype DTYPE",
    )
    parser.add_argument("--no-peft", action="store_true", help="skip PEFT's own route")
    parser.add_argument("--extra", default="", help="extra options passed to every bonemerge merge")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="also run each merge with the bonemerge source tree in this folder (a git worktree of "
        "an earlier commit, say), alternating with this one",
    )
    parser.add_argument(
        "--prepare", choices=sorted(SIZES | MOE_SIZES | FP8_SIZES | MXFP4_SIZES), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.prepare:
        # Generation runs in its own process: a child forked from a large parent inherits
        # the parent's resident size as its starting peak, which would inflate every figure.
        base = make_base(args.cache.resolve(), args.prepare)
        for kind in {v.partition(":")[0] for v in args.variants.split(",") if v}:
            make_adapter(args.cache.resolve(), args.prepare, kind, base)
        return
    sizes = args.size or ["1b"]
    variants = [v for v in args.variants.split(",") if v]
    cache = args.cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    bonemerge = shutil.which("bonemerge") or str(Path(sys.executable).with_name("bonemerge"))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    rows = []
    for size in sizes:
        print(f"preparing {size} ...", file=sys.stderr)
        subprocess.run(
            [sys.executable, __file__, "--prepare", size, "--cache", str(cache), "--variants", args.variants],
            check=True,
        )
        base = cache / f"base-{size}"
        adapters = {kind: cache / f"adapter-{size}-{kind.partition(':')[0]}" for kind in variants}
        total = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        contenders = {"cp -r && sync": ["bash", "-c", f"cp -r '{base}' \"$1\" && sync", "cp", OUT]}
        for kind in variants:
            dtype = kind.partition(":")[2]
            merge = [bonemerge, "merge", str(base), str(adapters[kind]), "-o", OUT, "-q", *args.extra.split()]
            merge += ["--dtype", dtype] if dtype else []
            contenders[f"bonemerge {kind}"] = merge
            if args.baseline:
                main = "from bonemerge.cli import main; main()"
                contenders[f"baseline {kind}"] = [sys.executable, "-c", main, *merge[1:]]
        if not args.no_peft and 2.2 * total < 0.8 * memory:
            for kind in [k for k in ("bone", "bat", "lora16", "dora16") if k in variants]:
                route = [sys.executable, "-c", PEFT_ROUTE, str(base), str(adapters[kind]), OUT]
                contenders[f"PEFT {kind}"] = route
        samples: dict[str, list[Sample]] = {name: [] for name in contenders}
        for round_number in range(args.repeat):
            for name, command in contenders.items():
                out = cache / "out"
                shutil.rmtree(out, ignore_errors=True)
                subprocess.run(["sync"])
                warm(base)
                cwd = args.baseline if name.startswith("baseline") else None
                samples[name].append(run([str(out) if part is OUT else part for part in command], out, cwd))
                print(
                    f"  {size} round {round_number + 1} {name}: {samples[name][-1].seconds:.2f} s",
                    file=sys.stderr,
                )
                shutil.rmtree(out, ignore_errors=True)
        floor = statistics.median(s.seconds for s in samples["cp -r && sync"])
        cores = os.cpu_count() or 1
        for name, found in samples.items():
            seconds = statistics.median(s.seconds for s in found)
            cpu = statistics.median(s.cpu for s in found)
            rss = max(s.peak_rss for s in found)
            firsts = [s.first_byte for s in found if s.first_byte is not None]
            first = statistics.median(firsts) if firsts else None
            overlap = seconds / max(floor, cpu / cores)
            rows.append((size, total, name, seconds, rss, seconds / floor, cpu, overlap, first))

    print(f"\nMachine: {machine(cache)}\n")
    print("| model | checkpoint | command | wall | peak RSS | vs cp | CPU | CPU/GB | overlap | first byte |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size, total, name, seconds, rss, ratio, cpu, overlap, first in rows:
        first_text = f"{first:.2f} s" if first is not None else "-"
        print(
            f"| {size} | {total / 1e9:.2f} GB | {name} | {seconds:.2f} s | {rss / 2**20:.0f} MiB | "
            f"{ratio:.2f}x | {cpu:.2f} s | {cpu / (total / 1e9):.2f} s/GB | {overlap:.2f} | {first_text} |"
        )
    print(
        "\nwall and CPU: medians; peak RSS: the largest; overlap = wall / max(cp's wall, CPU / "
        f"{cores} cores) (1.00 = the CPU work hides entirely behind the disk); first byte: time "
        "until the first weight bytes appear in the output (or its staging folder)."
    )


if __name__ == "__main__":
    main()
