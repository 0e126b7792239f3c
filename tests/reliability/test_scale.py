"""Work that must stay linear or bounded however large a hostile adapter is: key matching of
100,000 blocks against 100,000 weights, and the NaN/Inf check of blocks read in pieces."""

from __future__ import annotations

import random
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from bonemerge.adapters.matching import PrefixRule, closest, infer_rule
from bonemerge.checkpoint import RangeReader, open_checkpoint, tensors
from bonemerge.checkpoint import reader as reader_module
from bonemerge.errors import AdapterError
from tests import toy
from tests.cliutil import fails, run

N = 100_000


def weights(n: int) -> list[str]:
    return [f"model.layers.{i}.mlp.up_proj.weight" for i in range(n)]


@pytest.mark.parametrize(
    ("modules", "rule"),
    [
        ([f"other.block.{i}.ffn.w1" for i in range(N)], PrefixRule()),
        ([f"layers.{i}.mlp.up_proj" for i in range(N)], PrefixRule("", "model.")),
        ([f"base.model.layers.{i}.mlp.up_proj" for i in range(N)], PrefixRule("base.", "")),
    ],
    ids=["none-match", "prefix-added", "prefix-removed"],
)
def test_matching_100k_blocks_against_100k_weights_is_fast(modules, rule):
    names = weights(N)
    began = time.perf_counter()
    assert infer_rule(modules, names, "adapter") == rule
    closest(modules[0] + ".weight", names)
    assert time.perf_counter() - began < 10


def old_infer_rule(modules, names, what):
    """The quadratic implementation this replaced, kept as the behaviour to match."""

    def candidates(module, weights):
        rules = set()
        for tensor in weights:
            base_module = tensor[: -len(".weight")]
            if base_module.endswith("." + module):
                rules.add(PrefixRule("", base_module[: -len(module)]))
            elif module.endswith("." + base_module):
                rules.add(PrefixRule(module[: -len(base_module)], ""))
        return rules

    weights = [n for n in names if n.endswith(".weight")]
    weight_set = set(weights)

    def placed(rule):
        return sum(rule.apply(m) + ".weight" in weight_set for m in modules)

    identity = PrefixRule()
    if placed(identity) == len(modules):
        return identity
    rules = {identity}
    for module in modules:
        if module + ".weight" not in weight_set:
            found = candidates(module, weights)
            if found:
                rules |= found
                break
    scores = {rule: placed(rule) for rule in rules}
    best = max(scores.values())
    winners = [rule for rule, score in scores.items() if score == best]
    if len(winners) > 1 and identity in winners:
        return identity
    if len(winners) > 1:
        raise AdapterError("ambiguous")
    return winners[0]


segment = st.sampled_from(["model", "bert", "encoder", "layers", "0", "1", "q", "k", "x", "base"])
path = st.lists(segment, min_size=1, max_size=5).map(".".join)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(path, min_size=1, max_size=8, unique=True),
    st.lists(path, min_size=1, max_size=12, unique=True),
    st.booleans(),
)
def test_matching_behaves_as_before(modules, bases, with_suffixes):
    names = [b + ".weight" for b in bases] + (["model.norm.bias"] if with_suffixes else [])
    random.Random(0).shuffle(names)
    try:
        expected = old_infer_rule(modules, names, "a")
    except AdapterError:
        with pytest.raises(AdapterError, match="more than one way"):
            infer_rule(modules, names, "a")
        return
    assert infer_rule(modules, names, "a") == expected


def test_block_is_checked_in_bounded_pieces(tmp_path, base, monkeypatch):
    """A NaN in the last piece is found, and no read is larger than one piece."""
    block = torch.zeros(8, 64)
    block[-1, -1] = float("nan")
    adapter = toy.write_adapter(tmp_path / "big-adapter", blocks={"model.layers.0.self_attn.q_proj": block})
    monkeypatch.setattr(reader_module, "PIECE_BYTES", 256)
    largest = []
    real_readinto = RangeReader.readinto

    def readinto(self, path, offset, view):
        largest.append(len(view))
        return real_readinto(self, path, offset, view)

    def read(self, path, offset, size):
        raise AssertionError(f"a block was read whole ({size} bytes)")

    monkeypatch.setattr(RangeReader, "readinto", readinto)
    monkeypatch.setattr(RangeReader, "read", read)
    fails(
        tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=("NaN or Inf", "q_proj.bone_block")
    )
    assert largest and max(largest) <= 256 and len(largest) >= 8


def test_pieces_cover_every_value(tmp_path):
    values = torch.arange(1000, dtype=torch.float32).reshape(10, 100)
    save_file({"t": values}, tmp_path / "t.safetensors")
    ref = open_checkpoint(tmp_path / "t.safetensors").tensors["t"]
    with RangeReader() as reader:
        seen = torch.cat([piece.clone() for piece in tensors.pieces(reader, ref, limit=28)])
        assert torch.equal(seen, values.reshape(-1))
        assert torch.equal(tensors.read_whole(reader, ref), values)
        assert torch.equal(tensors.read_rows(reader, ref, 3, 5), values[3:5])
    assert run("inspect", tmp_path / "t.safetensors").exit_code == 0
