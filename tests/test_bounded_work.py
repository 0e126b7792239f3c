"""Bounded work for any adapter: module-name regexes run in linear time with PEFT's matching,
and hostile config values are one sentence, never a traceback or a hang."""

from __future__ import annotations

import json
import re
import time

import pytest
from peft.utils.other import get_pattern_key

from bonemerge.adapters.patterns import fullmatch, pattern_key
from tests import toy
from tests.cliutil import fails, run
from tests.lora_oracle import toy_lora_tensors, write_lora

MODULES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.11.self_attn.k_proj",
    "model.layers.1.mlp.down_proj",
    "model.layers.2.mlp.up_proj",
    "model.layers.2.mlp.gate_proj",
    "bert.encoder.layer.3.attention.self.query",
    "bert.encoder.layer.3.attention.output.dense",
    "lm_head",
    "transformer.h.0.attn.c_attn",
]
PATTERNS = [
    "q_proj",
    "proj",
    "self_attn.q_proj",
    "layers.1.mlp.down_proj",
    r"layers\.1\.mlp\.(up|gate)_proj",
    r"layer\.[23]\.attention\.self\.query",
    r".*\.(q|k)_proj",
    r"model\.layers\.\d+\.mlp\..*",
    "(?i:LM_HEAD)",
    "dense|query",
    "a)|(lm_head",  # PEFT wraps the key in groups, so unbalanced keys can still compile
    "h.0.attn.c_att.",
    r"layers\.1\d?\..*",
    "^model.*",
    "k_proj$",
    "[a-z_]+",
    "",
]


def test_pattern_keys_match_as_peft():
    for module in MODULES:
        for i in range(len(PATTERNS)):
            keys = PATTERNS[i:] + PATTERNS[:i]
            found = get_pattern_key(keys, module)
            assert pattern_key(keys, module) == (found if found in keys else None), (module, keys)


def test_fullmatch_as_peft_target_modules():
    for module in MODULES:
        for pattern in [p for p in PATTERNS if "(l" not in p]:
            expected = re.fullmatch(pattern, module) is not None
            assert fullmatch(pattern, module) == expected, (pattern, module)


def lora_adapter(tmp_path, config: dict):
    base = toy.write_base(tmp_path / "base")
    tensors = toy_lora_tensors(toy.SHAPES, ["model.layers.0.self_attn.q_proj"])
    return base, write_lora(tmp_path / "adapter", tensors, config)


def test_redos_key_is_quick(tmp_path):
    """`(.|.)*Z` backtracks for minutes in Python's re against a long module name."""
    module = "model.layers.0.self_attn." + "q" * 40 + "_proj"
    made = toy_lora_tensors(toy.SHAPES, ["model.layers.0.self_attn.q_proj"])
    tensors = {key.replace("q_proj", module.rsplit(".", 1)[1]): value for key, value in made.items()}
    adapter = write_lora(tmp_path / "adapter", tensors, {"rank_pattern": {"(.|.)*Z": 2}})
    began = time.perf_counter()
    result = run("inspect", adapter)
    assert time.perf_counter() - began < 1.0
    assert result.exit_code == 0, result.output
    assert "q" * 40 in result.output


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        (r"(q)_proj\1", "backreferences"),
        (r"(?<=self_attn\.)q_proj", "lookarounds"),
        ("q_pro(", "not a valid"),
    ],
)
def test_pattern_keys_that_cannot_run_linearly_are_refused(tmp_path, key, fragment):
    base, adapter = lora_adapter(tmp_path, {"alpha_pattern": {key: 4}})
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=("alpha_pattern key", fragment))


BIG = 10**400


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"lora_alpha": BIG}, "lora_alpha=1000"),
        ({"alpha_pattern": {"q_proj": BIG}}, "alpha_pattern"),
        ({"rank_pattern": {"q_proj": 4.5}}, "rank_pattern"),
        ({"modules_to_save": [None]}, "modules_to_save=[None]"),
        ({"modules_to_save": "lm_head"}, "modules_to_save"),
        ({"target_modules": [1, 2]}, "target_modules"),
        ({"layers_to_transform": [0.5]}, "layers_to_transform"),
    ],
)
def test_hostile_config_values_are_one_sentence(tmp_path, config, fragment):
    base, adapter = lora_adapter(tmp_path, config)
    message = fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=(fragment,))
    assert len(message) < 400
    fails(tmp_path, "inspect", adapter, expect=(fragment,))


def test_bone_modules_to_save_null_is_one_sentence(tmp_path):
    """The case the hypothesis test over adapter configs found: `inspect` raised TypeError."""
    adapter = toy.write_adapter(tmp_path / "adapter", config={"modules_to_save": [None]})
    fails(tmp_path, "inspect", adapter, expect=("modules_to_save=[None]",))
    assert json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"] == [None]
