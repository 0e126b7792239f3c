"""Every adapter tensor checked against its layer before any I/O, PEFT's module scope, and
messages that name what is wrong in a line of readable length (issue 17, items 3, 8 and 15).

Each refusal goes through `fails`: exit 1, one sentence, nothing written, inputs untouched.
"""

from __future__ import annotations

import json
import struct
from types import SimpleNamespace

import pytest
import torch
from peft.tuners.tuners_utils import check_target_module_exists

from bonemerge.adapters.scope import excluded_by
from bonemerge.errors import shown
from tests import lora_oracle as lo
from tests import oracle, toy
from tests.cliutil import fails, run

Q0, Q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"


def lora(folder, config: dict | None = None, **tensors: torch.Tensor):
    """A valid LoRA on both q_proj of toy's base, with `tensors` (by key) added or replaced."""
    values = lo.toy_lora_tensors(toy.SHAPES, [Q0, Q1]) | tensors
    return lo.write_lora(folder, values, config)


@pytest.fixture
def biased(tmp_path):
    """Toy's base with a bias on each q_proj, for lora_bias."""
    tensors = toy.base_tensors() | {f"{q}.bias": torch.randn(64) * 0.01 for q in (Q0, Q1)}
    return toy.write_base(tmp_path / "base", tensors)


def refused(tmp_path, base, adapter, *expect: str) -> str:
    return fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=expect)


# --- item 3: every tensor's shape, before any I/O ------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "config", "fragment"),
    [
        (f"{Q1}.lora_B.bias", torch.ones(65), {"lora_bias": True}, "[64]"),
        (f"{Q1}.lora_B.bias", torch.ones(1), {"lora_bias": True}, "[64]"),
        (f"{Q1}.lora_B.bias", torch.ones(64, 1), {"lora_bias": True}, "[64]"),
        (f"{Q1}.lora_B.bias", torch.tensor(1.0), {"lora_bias": True}, "[64]"),
        (f"{Q1}.lora_magnitude_vector", torch.ones(65), {"use_dora": True}, "[64]"),
        (f"{Q1}.lora_magnitude_vector", torch.ones(64, 1), {"use_dora": True}, "[64]"),
        (f"{Q1}.lora_A.weight", torch.ones(64), {}, "1 dimension"),
        (f"{Q1}.lora_B.weight", torch.ones(64, 4, 1), {}, "3 dimensions"),
        (f"{Q1}.lora_A.weight", torch.ones(4, 64, 1, 1), {}, "4 dimensions"),
    ],
    ids=["bias-long", "bias-1", "bias-2d", "bias-0d", "dora-long", "dora-2d", "A-1d", "B-3d", "A-4d"],
)
def test_every_lora_tensor_shape_is_checked(tmp_path, biased, key, value, config, fragment):
    extra = {}
    if "use_dora" in config:
        extra = {f"{q}.lora_magnitude_vector": torch.ones(64) for q in (Q0, Q1)}
    adapter = lora(tmp_path / "adapter", config, **(extra | {key: value}))
    message = refused(tmp_path, biased, adapter, key.rsplit(".", 1)[0], fragment)
    assert "Conv" not in message  # a damaged factor is not a convolution's LoRA


def test_a_right_bias_merges(tmp_path, biased):
    """Control: lora_bias with a [64] bias merges as `b + s·bias`."""
    bias = torch.randn(64) * 0.05
    adapter = lora(tmp_path / "adapter", {"lora_bias": True}, **{f"{Q1}.lora_B.bias": bias})
    assert run("merge", biased, adapter, "-o", tmp_path / "merged").exit_code == 0
    merged, base = oracle.read_folder(tmp_path / "merged"), oracle.read_folder(biased)
    assert torch.equal(merged[f"{Q1}.bias"], base[f"{Q1}.bias"] + bias * 2)


def test_equal_conv_ranks_are_still_called_a_convolution(tmp_path, base):
    adapter = lora(
        tmp_path / "adapter",
        **{f"{Q1}.lora_A.weight": torch.ones(4, 64, 3), f"{Q1}.lora_B.weight": torch.ones(64, 4, 1)},
    )
    refused(tmp_path, base, adapter, "nn.Conv1d", "[64, 64, 3]")  # an nn.Conv1d LoRA, on a Linear


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("model.norm.weight", torch.ones(63)),
        ("model.norm.weight", torch.ones(64, 1)),
        ("model.layers.0.mlp.up_proj.weight", torch.ones(96, 63)),
        ("model.embed_tokens.weight", torch.ones(100, 65)),
    ],
    ids=["norm-short", "norm-2d", "linear-columns", "embedding-width"],
)
def test_saved_full_tensors_must_fit_the_base(tmp_path, base, name, value):
    """modules_to_save copies and saved biases replace base tensors: only an embedding's rows
    (its vocabulary) may change."""
    adapter = lora(tmp_path / "adapter", **{name: value})
    refused(tmp_path, base, adapter, name, str(list(toy.SHAPES[name])))


def test_a_bone_block_of_another_shape_is_refused(tmp_path, base):
    """Bone blocks were already checked in full; kept here so the audit covers every method."""
    adapter = toy.write_adapter(tmp_path / "adapter", {Q0: torch.ones(8, 63)})
    refused(tmp_path, base, adapter, "bone_block", "[8, 64]")


# --- item 8: what PEFT would load ----------------------------------------------------------------

SCOPE = [
    ({"target_modules": ["k_proj"]}, "target_modules"),
    ({"target_modules": r".*layers\.0\.self_attn\.q_proj"}, "target_modules"),
    ({"exclude_modules": [Q1]}, "exclude_modules"),
    ({"exclude_modules": ["self_attn.q_proj"]}, "exclude_modules"),
    ({"exclude_modules": r".*\.1\..*"}, "exclude_modules"),
    ({"layers_to_transform": [0], "layers_pattern": "layers"}, "layers_to_transform"),
    ({"layers_to_transform": 0}, "layers_to_transform"),
    ({"layers_to_transform": [0], "layers_pattern": ["h", "blocks"]}, "layers_to_transform"),
    ({"modules_to_save": ["q_proj"]}, "modules_to_save"),
]


@pytest.mark.parametrize(("config", "field"), SCOPE, ids=[f"{c}" for c, _ in SCOPE])
def test_tensors_peft_would_not_load_are_refused(tmp_path, base, config, field):
    adapter = lora(tmp_path / "adapter", config)
    refused(tmp_path, base, adapter, "self_attn.q_proj.lora_", field, "PEFT would never load it")


@pytest.mark.parametrize(
    "config",
    [
        {"target_modules": ["q_proj"], "layers_to_transform": [0, 1]},
        {"target_modules": [Q1, "q_proj"], "layers_to_transform": [0]},  # a full name skips the layers
        {"target_modules": r"model\.layers\.\d\.self_attn\.q_proj"},
        {"target_modules": "all-linear"},
        {"target_modules": None},
        {"exclude_modules": ["k_proj"], "modules_to_save": ["lm_head"]},
    ],
    ids=["layers", "full-name", "regex", "all-linear", "none", "exclude-other"],
)
def test_tensors_peft_would_load_merge(tmp_path, base, config):
    adapter = lora(tmp_path / "adapter", config)
    result = run("merge", base, adapter, "-o", tmp_path / "merged")
    assert result.exit_code == 0, result.output


KEYS = [
    Q0,
    Q1,
    "model.layers.12.self_attn.q_proj",
    "model.layers.1.mlp.up_proj",
    "q_proj",
    "layers.3.q_proj",
    "transformer.h.2.attn.c_attn",
    "encoder.layer.4.attention.self.query",
    "lm_head",
    "score.0.dense",
]
CONFIGS = [
    {"target_modules": ["q_proj", "c_attn"]},
    {"target_modules": ["q_proj", "query"], "layers_to_transform": [1, 2, 4]},
    {"target_modules": ["q_proj", "query", "c_attn"], "layers_to_transform": 2, "layers_pattern": "h"},
    {"target_modules": ["q_proj", "query"], "layers_to_transform": [4], "layers_pattern": ["layer", "h"]},
    {"target_modules": ["q_proj"], "layers_to_transform": [], "layers_pattern": "layers"},
    {"target_modules": [Q0, "up_proj"], "layers_to_transform": [1]},
    {
        "target_modules": ["q_proj", "c_attn"],
        "layers_to_transform": [2, 12],
        "layers_pattern": "(?:h|layer)s?",
    },
    {"target_modules": r".*(q_proj|query)"},
    {"target_modules": "q_proj"},
    {"target_modules": ["q_proj", "up_proj"], "exclude_modules": ["model.layers.1.mlp.up_proj"]},
    {"target_modules": ["q_proj", "dense", "lm_head"], "exclude_modules": r".*layers\.1\..*"},
    {"target_modules": ["q_proj", "dense"], "exclude_modules": ["self_attn.q_proj"]},
    {"target_modules": ["q_proj", "dense", "lm_head"], "modules_to_save": ["score", "lm_head"]},
    {"target_modules": ["q_proj", "dense"], "modules_to_save": ["layers"]},
]


@pytest.mark.parametrize("config", CONFIGS, ids=range(len(CONFIGS)))
def test_scope_is_pefts(config, tmp_path):
    """PEFT 0.18.1's own `check_target_module_exists` is the oracle, name by name."""
    fields = ("exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern")
    peft_config = SimpleNamespace(**(dict.fromkeys(fields) | {"target_parameters": None} | config))
    for key in KEYS:
        expected = bool(check_target_module_exists(peft_config, key))
        assert (excluded_by(config, key, tmp_path) is None) == expected, (config, key)


def test_a_pattern_re2_cannot_read_is_one_sentence(tmp_path, base):
    adapter = lora(tmp_path / "adapter", {"target_modules": r".*(?=q)q_proj"})
    refused(tmp_path, base, adapter, "target_modules", "RE2")


def test_a_layers_pattern_with_a_group_is_one_sentence(tmp_path, base):
    """PEFT reads the first group as the layer index (and fails on it); so does bonemerge."""
    config = {"layers_to_transform": [0], "layers_pattern": "(layers)"}
    refused(tmp_path, base, lora(tmp_path / "adapter", config), "layers_pattern", "parentheses")


def test_a_hostile_pattern_takes_no_time(tmp_path, base):
    """Backtracking `re` would take minutes on this pattern; RE2 answers at once."""
    adapter = lora(tmp_path / "adapter", {"target_modules": "(.|.)*Z" + "|x" * 10})
    refused(tmp_path, base, adapter, "target_modules")


def embedding_lora(module: str, rows: int, columns: int) -> dict[str, torch.Tensor]:
    return {
        f"{module}.lora_embedding_A": torch.randn(4, rows) * 0.05,
        f"{module}.lora_embedding_B": torch.randn(columns, 4) * 0.05,
    }


def test_embedding_factors_on_a_square_linear_are_refused(tmp_path, base):
    """Read as an Embedding's, they would merge transposed into q_proj; PEFT ignores them."""
    values = lo.toy_lora_tensors(toy.SHAPES, [Q0]) | embedding_lora(Q1, 64, 64)
    adapter = lo.write_lora(tmp_path / "adapter", values)
    refused(tmp_path, base, adapter, "lora_embedding_A/B", f"{Q1}.weight")


def test_embedding_factors_on_the_output_head_are_refused(tmp_path, base):
    adapter = lo.write_lora(tmp_path / "adapter", embedding_lora("lm_head", 100, 64))
    refused(tmp_path, base, adapter, "lora_embedding_A/B", "output projection")


def test_linear_factors_on_an_embedding_are_refused(tmp_path, base):
    values = lo.toy_lora_tensors(toy.SHAPES, ["model.embed_tokens"])
    adapter = lo.write_lora(tmp_path / "adapter", values)
    refused(tmp_path, base, adapter, "lora_A/lora_B", "model.embed_tokens.weight", "Embedding")


def test_embedding_factors_on_an_embedding_merge(tmp_path, base):
    """Control: the same factors on the embedding, where PEFT reads them."""
    values = embedding_lora("model.embed_tokens", 100, 64)
    adapter = lo.write_lora(tmp_path / "adapter", values, {"target_modules": ["embed_tokens"]})
    assert run("merge", base, adapter, "-o", tmp_path / "merged").exit_code == 0


def resized(rows: int, columns: int = 64) -> torch.Tensor:
    return torch.randn(rows, columns) * 0.05


def test_a_resized_embedding_without_its_head_is_refused(tmp_path, base):
    adapter = lora(tmp_path / "adapter", **{"model.embed_tokens.weight": resized(120)})
    refused(tmp_path, base, adapter, "model.embed_tokens.weight", "120", "lm_head.weight", "100")


def test_a_resized_head_without_its_embedding_is_refused(tmp_path, base):
    adapter = lora(tmp_path / "adapter", **{"lm_head.weight": resized(120)})
    refused(tmp_path, base, adapter, "lm_head.weight", "model.embed_tokens.weight")


def test_a_resized_vocabulary_with_both_embeddings_merges(tmp_path, base):
    tensors = {"model.embed_tokens.weight": resized(120), "lm_head.weight": resized(120)}
    adapter = lora(tmp_path / "adapter", **tensors)
    assert run("merge", base, adapter, "-o", tmp_path / "merged").exit_code == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    merged = oracle.read_folder(tmp_path / "merged")
    assert config["vocab_size"] == merged["lm_head.weight"].shape[0] == 120


# --- item 15: messages ---------------------------------------------------------------------------

HUGE = "x" * 5000


@pytest.mark.parametrize(
    "config",
    [
        {"r": HUGE},
        {"lora_alpha": HUGE},
        {"use_dora": HUGE},
        {"init_lora_weights": "pissa" + HUGE},
        {"peft_type": HUGE},
        {"target_modules": {HUGE: 1}},
        {"exclude_modules": [1, HUGE]},
        {"layers_to_transform": HUGE},
        {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": {HUGE: 1}},
        {"target_modules": "(?=" + HUGE + ")"},
        {"peft_type": "BONE", "init_weights": HUGE},
        {"peft_type": "MISS", "init_weights": "mini", "mini_r": HUGE},
    ],
    ids=lambda c: "+".join(k for k in c if k != "peft_type" or len(c) == 1),
)
def test_hostile_config_values_are_cut_short(tmp_path, base, config):
    adapter = lora(tmp_path / "adapter", config)
    message = refused(tmp_path, base, adapter, "adapter_config.json")
    assert len(message) < 600, len(message)
    assert "…" in message


@pytest.mark.parametrize("name", [HUGE, "org/" + HUGE], ids=["path", "hub-id"])
def test_a_hostile_base_name_is_cut_short(tmp_path, name):
    """`merge ADAPTER` looks up the base its config names: a name too long for any file system
    was an OSError traceback."""
    adapter = lora(tmp_path / "adapter", {"base_model_name_or_path": name})
    message = fails(tmp_path, "merge", adapter, "-o", tmp_path / "out", expect=("not a usable path", "…"))
    assert len(message) < 300


def test_a_hostile_tensor_name_is_cut_short(tmp_path):
    base = toy.write_base(tmp_path / "base")
    header = json.dumps({"n" * 5000: {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (base / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    message = fails(tmp_path, "inspect", base, expect=("'Q9'", "nnn…nnn"))
    assert len(message) < 600, len(message)


def test_a_hostile_adapter_key_is_cut_short(tmp_path, base):
    """Messages name tensors as they are; the CLI cuts any word longer than 300 characters."""
    adapter = lora(tmp_path / "adapter", **{HUGE + ".lora_A.weight": torch.ones(4, 64)})
    message = refused(tmp_path, base, adapter, "lora_B", "xxx…xxx")
    assert len(message) < 800, len(message)


def test_shown_cuts_long_values_only():
    assert shown("q_proj") == "'q_proj'"
    assert shown("IA3", quote=False) == "IA3"
    cut = shown("'head" + HUGE + "tail'", quote=False)
    assert len(cut) == 80 and cut.startswith("'headxx") and cut.endswith("xxtail'") and "…" in cut
