"""`bonemerge demo`: the whole merge path on a small model made on the spot, checked end to end.

It writes a sharded bf16 Llama-shaped base and a Bone adapter (fixed seeds, plain safetensors
files, as transformers and PEFT would lay them out), merges them with the real command path,
then recomputes every merged tensor in memory with `reference_merge` and requires the
streamed result to match bit for bit. No network, no PEFT, no transformers needed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from bonemerge.errors import BonemergeError

MARKER = ".bonemerge-demo"
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB = 256, 688, 4, 8, 2, 1024
RANK = 32
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


def _shapes() -> dict[str, tuple[int, ...]]:
    head = HIDDEN // HEADS
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * head, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * head, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        }
    shapes |= {"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    return shapes


def _config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def write_base(folder: Path) -> dict:
    """A three-shard bf16 checkpoint with index, config, generation config and chat template."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    names = list(_shapes().items())
    thirds = [
        names[: len(names) // 3],
        names[len(names) // 3 : 2 * len(names) // 3],
        names[2 * len(names) // 3 :],
    ]
    weight_map, total, tensors = {}, 0, {}
    for number, group in enumerate(thirds, start=1):
        file = f"model-{number:05d}-of-00003.safetensors"
        shard = {
            name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16) for name, shape in group
        }
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, file)
        total += sum(t.numel() * t.element_size() for t in shard.values())
        tensors |= shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(_config(), indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (folder / "README.md").write_text("# demo base model\n")
    return tensors


def write_adapter(folder: Path, base: Path) -> dict:
    """A Bone adapter (r=32) on all seven projections, saved as PEFT saves one."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(1)
    blocks = {}
    for name, shape in _shapes().items():
        if name.split(".")[-2] in TARGETS:
            module = name.removesuffix(".weight")
            blocks[f"base_model.model.{module}.bone_block"] = (
                torch.randn(RANK, shape[0], generator=generator) * 0.01
            )
    save_file(blocks, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "BONE",
        "r": RANK,
        "init_weights": True,
        "target_modules": list(TARGETS),
        "base_model_name_or_path": str(base),
        "task_type": "CAUSAL_LM",
        "bias": "none",
        "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return blocks


def _prepare_folder(root: Path) -> None:
    if root.exists():
        if not (root / MARKER).is_file():
            raise BonemergeError(f"{root} exists and is not an earlier demo folder; pass --output elsewhere.")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / MARKER).write_text("made by bonemerge demo; safe to delete\n")


def run_demo(output: str | Path, echo: Callable[[str], None] = print) -> None:
    """Build, merge, verify and describe; raises if the streamed merge differs in any bit."""
    import torch
    from safetensors import safe_open

    from bonemerge.api import merge
    from bonemerge.methods.bone import reference_merge

    root = Path(output).resolve()
    _prepare_folder(root)
    base_dir, adapter_dir, merged_dir = root / "base", root / "adapter", root / "merged"
    base = write_base(base_dir)
    blocks = write_adapter(adapter_dir, base_dir)
    size = sum(t.numel() * t.element_size() for t in base.values())
    echo(f"base:    {base_dir} (Llama-shaped, {len(base)} bf16 tensors, {size / 1e6:.1f} MB, 3 shards)")
    echo(
        f"adapter: {adapter_dir} (Bone r={RANK} on {len(blocks)} projections; "
        f"down_proj has {INTERMEDIATE} inputs, {INTERMEDIATE % RANK} left over after blocks of {RANK})"
    )

    command = f"bonemerge merge {base_dir} {adapter_dir} --output {merged_dir}"
    report = merge(base_dir, [adapter_dir], merged_dir, command=command)
    echo(
        f"merged:  {merged_dir} ({report.tensors_merged} tensors merged, "
        f"{report.tensors_copied} copied, {report.seconds:.2f} s)"
    )

    mismatched = []
    for file in sorted(merged_dir.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                got = f.get_tensor(name)
                block = blocks.get(f"base_model.model.{name.removesuffix('.weight')}.bone_block")
                want = (
                    base[name]
                    if block is None
                    else reference_merge(base[name].float(), block, "default").to(torch.bfloat16)
                )
                if not torch.equal(got, want):
                    mismatched.append(name)
    if mismatched:
        raise BonemergeError(
            f"the demo merge differs from the in-memory reference in {', '.join(mismatched)}."
        )
    echo(f"check:   all {len(base)} tensors equal an in-memory merge bit for bit")
    echo(f"files:   {', '.join(report.files)}")
    echo(f"next:    {command} --overwrite   (the same merge from the command line)")
