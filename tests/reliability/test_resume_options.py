"""`--resume` reuses a shard only when every option that decides its bytes or the checks it
passed is the same: a shard a `--no-safe-merge` run wrote (holding Inf) is never published
by a checked run."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from bonemerge.adapters import load_adapter
from bonemerge.checkpoint import open_checkpoint
from bonemerge.checks.dtype_names import parse_dtype
from bonemerge.output import model as writing
from bonemerge.plan.build import build_plan
from bonemerge.run.work import EngineOptions
from tests import toy
from tests.cliutil import run


def overflowing(tmp_path):
    """An fp16 base whose q_proj, merged with the adapter, leaves fp16's range (Inf)."""
    tensors = toy.base_tensors(torch.float16)
    tensors["model.layers.0.self_attn.q_proj.weight"].fill_(60000)
    base = toy.write_base(tmp_path / "base", tensors, shards=2)
    blocks = {
        "model.layers.0.self_attn.q_proj": torch.full((8, 64), 1e4),
        "model.layers.1.mlp.up_proj": torch.randn(8, 96) * 0.01,
    }
    return base, toy.write_adapter(tmp_path / "bone", blocks=blocks)


def test_resume_does_not_reuse_an_unchecked_shard(tmp_path, monkeypatch):
    base, adapter = overflowing(tmp_path)
    out = tmp_path / "out"
    staging = tmp_path / ".out.bonemerge-partial"

    def killed(*args, **kwargs):  # every shard is durable and recorded, then the run dies
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(writing, "write_manifest", killed)
        first = run("merge", base, adapter, "-o", out, "--no-safe-merge", "--resume", "-q")
    assert first.exit_code == 130, first.output
    written = [load_file(p) for p in staging.glob("*.safetensors")]
    assert any(t.isinf().any() for shard in written for t in shard.values()), "the test needs an Inf shard"

    second = run("merge", base, adapter, "-o", out, "--resume", "-q")
    assert second.exit_code == 1, second.output
    assert "NaN or Inf" in second.stderr
    assert not out.exists()


def test_every_engine_option_but_the_display_is_in_the_fingerprint(tmp_path):
    """Checked over the dataclass's fields, so an option added later is covered too."""
    base, adapter = overflowing(tmp_path)
    checkpoint, bone = open_checkpoint(base), load_adapter(adapter)
    plan = build_plan(checkpoint, [bone], operation="merge", dtype=None, max_shard_bytes=None)
    other = {"device": "cuda", "precision": "fp64", "safe_merge": False, "rounding": "stochastic", "seed": 1}
    fields = {f.name for f in dataclasses.fields(EngineOptions)} - EngineOptions.DISPLAY
    assert fields == set(other), "a new engine option: say how it changes here"
    reference = plan.fingerprint(**EngineOptions().decides_output())
    for name, value in other.items():
        changed = EngineOptions(**{name: value})
        assert plan.fingerprint(**changed.decides_output()) != reference, name
    shown = EngineOptions(progress=False)
    assert plan.fingerprint(**shown.decides_output()) == reference


@pytest.mark.parametrize(
    "settings",
    [{"dtype": parse_dtype("fp32")}, {"max_shard_bytes": 10_000}],
    ids=["dtype", "max-shard-size"],
)
def test_layout_and_dtype_are_in_the_fingerprint(tmp_path, settings):
    base, adapter = overflowing(tmp_path)
    checkpoint, bone = open_checkpoint(base), load_adapter(adapter)
    plain = {"dtype": None, "max_shard_bytes": None}
    fingerprints = [
        build_plan(checkpoint, [bone], operation="merge", **(plain | chosen)).fingerprint()
        for chosen in ({}, settings)
    ]
    assert fingerprints[0] != fingerprints[1]
