#!/usr/bin/env python
"""Benchmark Hub to Hub: `merge --stream` against download + local merge + upload.

    python scripts/bench_hub.py                       # SmolLM2-135M shapes, LoRA r=16 q/v, 2 rounds
    python scripts/bench_hub.py --size 1b --shard 200MB --cache /big/disk

Both contenders run the real `bonemerge` command against the loopback Hub of the tests
(`tests/hub_server.py`, Xet off: classic LFS), which this process serves on 127.0.0.1:

- stream: `bonemerge merge org/base org/adapter --push-to-hub me/stream --stream`
- local:  `bonemerge merge org/base org/adapter -o OUT --push-to-hub me/local` (the base is
  downloaded into the Hub cache, merged into OUT, and OUT uploaded once complete)

Each round starts from an empty Hub cache and a fresh target repo. Reported per contender:
bytes the Hub sent (downloads) and received (LFS uploads), peak disk (the Hub cache, the
output or the stream state folder, deleted-but-open files included, sampled every 2 ms),
wall time, CPU (user + system, the child only: the server's work is this process's) and peak
RSS, medians over the rounds. The loopback network is far faster than a real one, so wall time
here shows the local overheads; on a real link both contenders are bound by the same transfer
of the output, and the stream also skips the base's download-then-read.

It also prints the share of the output's bytes that are untouched tensors written
byte-identically and in the base's order: what a content-defined-chunking store (Xet) could
dedupe against the base instead of uploading.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench  # noqa: E402  (scripts/bench.py: the same generated models)

from tests.disk_use import DiskSampler  # noqa: E402
from tests.hub_server import HubServer  # noqa: E402

SCRIPT = Path(sys.executable).with_name("bonemerge")


def child_env(work: Path, hub: HubServer) -> dict[str, str]:
    env = {k: v for k, v in bench.CHILD_ENV.items() if not k.startswith(("HF_", "XDG_"))}
    return env | {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(work / "hf-home"),
        "HF_TOKEN": "hf_bench",
        "XDG_CACHE_HOME": str(work / "cache"),
    }


def measure(command: list[str], work: Path, hub: HubServer) -> dict[str, float]:
    sent, received = hub.sent, hub.received
    began = time.perf_counter()
    with open(work.parent / f"{work.name}.log", "w") as log:
        child = subprocess.Popen(command, env=child_env(work, hub), cwd=work, stdout=log, stderr=log)
        sampler = DiskSampler([work], child.pid)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - began
    peak = sampler.stop()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(command)}; see {work.parent / work.name}.log")
    return {
        "downloaded": hub.sent - sent,
        "uploaded": hub.received - received,
        "peak_disk": peak,
        "seconds": seconds,
        "cpu": usage.ru_utime + usage.ru_stime,
        "rss": usage.ru_maxrss * 1024,
    }


def untouched_share(base: Path, adapter: Path, shard: str) -> float:
    """Bytes of the output that are copies of base tensors, over all tensor bytes."""
    from bonemerge.adapters import load_adapter
    from bonemerge.checkpoint import layout, open_checkpoint
    from bonemerge.plan.build import build_plan

    plan = build_plan(
        open_checkpoint(base), [load_adapter(adapter)], max_shard_bytes=layout.parse_size(shard)
    )
    total = sum(step.nbytes for step in plan.steps.values())
    return sum(step.nbytes for step in plan.steps.values() if step.is_copy) / total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="135m", choices=sorted(bench.SIZES))
    parser.add_argument("--adapter", default="lora16qv", choices=sorted(bench.ADAPTERS))
    parser.add_argument("--shard", default="50MB", help="--max-shard-size of the output")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "bonemerge-bench")
    args = parser.parse_args()

    base = bench.make_base(args.cache, args.size)
    adapter = bench.make_adapter(args.cache, args.size, args.adapter, base)
    work_root = args.cache / "hub-bench"
    shutil.rmtree(work_root, ignore_errors=True)
    results: dict[str, list[dict[str, float]]] = {"stream": [], "local": []}
    with HubServer(work_root / "server") as hub:
        hub.add_repo("org/base", base)
        hub.add_repo("org/adapter", adapter)
        merge = [str(SCRIPT), "merge", "org/base", "org/adapter", "--max-shard-size", args.shard, "-q"]
        for round_ in range(args.repeat):
            for name in ("stream", "local"):
                work = work_root / f"{name}-{round_}"
                work.mkdir(parents=True)
                target = ["--push-to-hub", f"me/{name}-{round_}"]
                extra = ["--stream"] if name == "stream" else ["-o", "out"]
                results[name].append(measure([*merge, *target, *extra], work, hub))
                shutil.rmtree(work)
        assert not hub.errors, hub.errors
    model = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    print(
        f"{args.size} base ({model / 1e6:.0f} MB) + {args.adapter}, output shards of {args.shard}, "
        f"medians of {args.repeat} rounds over the loopback Hub:"
    )
    print(
        f"{'':8} {'downloaded':>12} {'uploaded':>10} {'peak disk':>10} {'wall s':>7} {'CPU s':>6} {'RSS':>8}"
    )
    for name, samples in results.items():
        med = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
        print(
            f"{name:8} {med['downloaded'] / 1e6:>10.1f}MB {med['uploaded'] / 1e6:>8.1f}MB "
            f"{med['peak_disk'] / 1e6:>8.1f}MB {med['seconds']:>7.1f} {med['cpu']:>6.1f} "
            f"{med['rss'] / 1e6:>6.0f}MB"
        )
    share = untouched_share(base, adapter, args.shard)
    print(
        f"untouched tensors, written byte-identically in the base's order: {share:.1%} of the output's bytes"
    )


if __name__ == "__main__":
    main()
