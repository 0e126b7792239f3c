#!/usr/bin/env python
"""Benchmark `bonemerge merge` against `cp -r && sync` and PEFT's own merge route.

    python scripts/bench.py --size 1b                # 1.1B (TinyLlama shapes), 3 rounds
    python scripts/bench.py --size 135m --size 1b --size 7b --repeat 3 --cache /big/disk

Checkpoints are Llama-shaped bf16 with random weights, real tensor names, shapes and 1 GB
shards; adapters are made with PEFT (on a meta-device model, so no weights are built) for
Bone r=64, Bat r=64, MiSS mini, LoRA r=16 and r=128 and DoRA r=16 on all seven projections,
and LoRA r=16 on q_proj and v_proj only (PEFT's default for Llama). `--size moe --variants
experts16` is the mixture-of-experts row: a Qwen3-MoE with 64 experts stored one tensor per
expert, and LoRA r=16 on its fused expert parameters (target_parameters) and q/v.
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
ADAPTERS = {
    "bone": {"peft_type": "BONE", "r": 64, "init_weights": True},
    "bat": {"peft_type": "BONE", "r": 64, "init_weights": "bat"},
    "mini": {"peft_type": "MISS", "r": 64, "init_weights": "mini", "mini_r": 64},
    "lora16": {"peft_type": "LORA", "r": 16, "lora_alpha": 32},
    "lora128": {"peft_type": "LORA", "r": 128, "lora_alpha": 256},
    "dora16": {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "use_dora": True},
    # PEFT's default targets for Llama: most of the checkpoint is copied untouched.
    "lora16qv": {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]},
    # MoE sizes only: LoRA on the fused expert parameters (PEFT target_parameters) and attention
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


def tensor_shapes(size: str) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes in the order transformers writes a LlamaForCausalLM (or a Qwen3-MoE)."""
    if size in MOE_SIZES:
        return moe_shapes(size)
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
    settings_of = {k: v for k, v in described.items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(described["model_type"], **settings_of))
    settings.setdefault("target_modules", TARGETS)
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
        choices=sorted(SIZES | MOE_SIZES),
        help="model size (repeatable; default 1b); moe: a Qwen3-MoE, 64 experts (--variants experts16)",
    )
    parser.add_argument(
        "--cache", type=Path, default=Path("bench-cache"), help="where checkpoints are generated"
    )
    parser.add_argument("--repeat", type=int, default=3, help="rounds of A/B alternation")
    parser.add_argument(
        "--variants",
        default="bone,bat,mini,lora16,lora128,dora16,lora16qv",
        help=f"comma-separated, of: {', '.join(ADAPTERS)}",
    )
    parser.add_argument("--no-peft", action="store_true", help="skip PEFT's own route")
    parser.add_argument("--extra", default="", help="extra options passed to every bonemerge merge")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="also run each merge with the bonemerge source tree in this folder (a git worktree of "
        "an earlier commit, say), alternating with this one",
    )
    parser.add_argument("--prepare", choices=sorted(SIZES | MOE_SIZES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare:
        # Generation runs in its own process: a child forked from a large parent inherits
        # the parent's resident size as its starting peak, which would inflate every figure.
        base = make_base(args.cache.resolve(), args.prepare)
        for kind in [v for v in args.variants.split(",") if v]:
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
        adapters = {kind: cache / f"adapter-{size}-{kind}" for kind in variants}
        total = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        contenders = {"cp -r && sync": ["bash", "-c", f"cp -r '{base}' \"$1\" && sync", "cp", OUT]}
        for kind in variants:
            merge = [bonemerge, "merge", str(base), str(adapters[kind]), "-o", OUT, "-q", *args.extra.split()]
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
