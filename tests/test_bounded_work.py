"""Bounded work for any adapter: module-name regexes run in linear time with PEFT's matching,
and hostile config values are one sentence, never a traceback or a hang."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
from peft.utils.other import get_pattern_key

from bonemerge.adapters.patterns import pattern_key
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
        ({"revision": 5}, "revision=5"),
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


# Bat -> LoRA: one decomposition of the small Gram matrix, bounded memory, honest sizes.

BAT_TARGETS = {
    "model.layers.0.self_attn.q_proj": (64, 64),
    "model.layers.0.mlp.up_proj": (96, 64),  # tall: G = ΔWᵀΔW
    "model.layers.0.mlp.down_proj": (64, 96),  # wide: G = ΔWΔWᵀ
}


def to_lora(bat, base) -> tuple:
    return ("strip", bat, "--to", "lora", "--base", base)


def bat_pair(tmp_path, base_tensors=None, r: int = 8):
    base = toy.write_base(tmp_path / "base", base_tensors)
    generator = torch.Generator().manual_seed(3)
    blocks = {m: torch.randn(s[0] // r, r, r, generator=generator) * 0.05 for m, s in BAT_TARGETS.items()}
    return base, toy.write_adapter(tmp_path / "bat", blocks, variant="bat", r=r)


@pytest.mark.parametrize("band", [64 * 8 * 8, 2**24])
def test_bat_factors_are_the_truncated_svd(monkeypatch, band):
    """The Gram route gives the truncated SVD's product and error, in any band size."""
    from bonemerge.methods import RankRequest, lowrank

    monkeypatch.setattr(lowrank, "_BAND_BYTES", band)
    generator = torch.Generator().manual_seed(0)
    for out_features, in_features in [(96, 64), (64, 96), (64, 64)]:
        weight = torch.randn(out_features, in_features, generator=generator) * 0.05
        block = torch.randn(out_features // 8, 8, 8, generator=generator) * 0.05
        update = lowrank.BatUpdate(weight, block)
        delta = lowrank.bat_delta(weight, block)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        spectrum = lowrank.Spectrum.of(update, "block", "weight")
        torch.testing.assert_close(spectrum.squares, s.square(), rtol=1e-9, atol=1e-12 * float(s[0]) ** 2)
        for k in (1, 10, 64):
            a, b = update.factors(k)
            best = (u[:, :k] * s[:k]) @ vh[:k]
            torch.testing.assert_close(b.double() @ a.double(), best, rtol=0, atol=1e-6)
            measured = float((delta - best).norm() / delta.norm())
            assert spectrum.error(k) == pytest.approx(measured, rel=1e-6, abs=1e-7)
            assert spectrum.rank(RankRequest(rank=k)) == k
        auto = spectrum.rank(RankRequest(max_error=0.3))
        assert spectrum.error(auto) <= 0.3 < spectrum.error(auto - 1)


def test_bat_conversion_over_the_memory_budget_is_refused(tmp_path, monkeypatch):
    from bonemerge.methods import lowrank

    base, bat = bat_pair(tmp_path)
    monkeypatch.setattr(lowrank, "MEMORY_BUDGET", 300_000)
    fails(
        tmp_path,
        *to_lora(bat, base),
        "--rank",
        "4",
        "-o",
        tmp_path / "out",
        expect=("needs about", "of memory, over the 300 kB one module may use", "--rank"),
    )


@pytest.mark.parametrize(
    ("value", "rank"), [(float("nan"), ["--rank", "4"]), (float("inf"), ["--rank", "auto"])]
)
def test_bat_conversion_on_a_broken_base_is_one_sentence(tmp_path, value, rank):
    """LinAlgError (NaN) and StopIteration (Inf with --rank auto) before."""
    tensors = toy.base_tensors()
    tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = value
    base, bat = bat_pair(tmp_path, tensors)
    extra = ["--max-error", "0.1"] if "auto" in rank else []
    fails(
        tmp_path,
        *to_lora(bat, base),
        *rank,
        *extra,
        "-o",
        tmp_path / "out",
        expect=("model.layers.0.mlp.up_proj.weight holds NaN or Inf", "intact base"),
    )


def test_bat_conversion_warns_when_lora_outgrows_the_weights(tmp_path):
    base, bat = bat_pair(tmp_path)
    result = run(
        *to_lora(bat, base),
        "--rank",
        "auto",
        "--max-error",
        "1e-4",
        "-o",
        tmp_path / "big",
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    warnings = report["conversion"]["warnings"]
    assert len(warnings) == 2 and all(w in report["notes"] for w in warnings)
    assert "3 of 3 modules reached a rank whose factors hold more values than the weight" in warnings[0]
    assert "outgrow the weights they adapt" in warnings[1]
    advised = re.search(r"--max-error (\S+) keeps", warnings[0])[1]
    result = run(
        *to_lora(bat, base),
        "--rank",
        "auto",
        "--max-error",
        advised,
        "-o",
        tmp_path / "small",
        "--json",
    )
    report = json.loads(result.stdout)
    assert report["conversion"]["warnings"] == []
    for module, k in report["conversion"]["ranks"].items():
        out_features, in_features = BAT_TARGETS[module]
        assert k * (out_features + in_features) <= out_features * in_features / 2


@pytest.fixture
def shown_progress(monkeypatch):
    """Progress as on a terminal (the CLI shows it only when stderr is one)."""
    import bonemerge.cli.commands

    monkeypatch.setattr(bonemerge.cli.commands, "progress_shown", lambda quiet: not quiet)


def test_bat_strip_shows_progress(tmp_path, shown_progress):
    base, bat = bat_pair(tmp_path)
    result = run(*to_lora(bat, base), "--rank", "4", "-o", tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert "converting" in result.stderr and "writing" in result.stderr
    for flag in ("-q", "--json"):
        result = run(*to_lora(bat, base), "--rank", "4", "-o", tmp_path / flag, flag)
        assert result.exit_code == 0 and result.stderr == "", result.stderr


def test_bat_unmerge_shows_progress_while_checking_inverses(tmp_path, shown_progress):
    base, bat = bat_pair(tmp_path)
    assert run("merge", base, bat, "-o", tmp_path / "merged", "-q").exit_code == 0
    result = run("unmerge", tmp_path / "merged", bat, "-o", tmp_path / "back")
    assert result.exit_code == 0, result.output
    assert "checking inverses" in result.stderr
    for flag in ("-q", "--json"):
        result = run("unmerge", tmp_path / "merged", bat, "-o", tmp_path / flag, flag)
        assert result.exit_code == 0 and result.stderr == "", result.stderr
