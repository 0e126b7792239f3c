"""Which layers of a transformers architecture are GPT-2's `Conv1D` (weights stored in x out).

PEFT decides a LoRA layer's layout from the module it wraps (`Conv1D`: transposed, forcing
`fan_in_fan_out` on; `nn.Linear`: not, forcing it off), so the flag saved in adapter_config.json
only says which kind PEFT wrapped last. A checkpoint has no modules, only tensors and
config.json, so this table names, per `model_type`, the module leaves transformers builds as
`Conv1D` (tests/test_lora_layout.py checks it against transformers' own models). Every other
module of a listed architecture is a Linear; for an architecture not listed, only the shapes
can tell (see `LoraMethod.fit`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

# model_type -> leaf names of its transformers.pytorch_utils.Conv1D modules
CONV1D_LEAVES: dict[str, frozenset[str]] = {
    "gpt2": frozenset({"c_attn", "q_attn", "c_proj", "c_fc"}),
    "openai-gpt": frozenset({"c_attn", "c_proj", "c_fc"}),
    "imagegpt": frozenset({"c_attn", "q_attn", "c_proj", "c_fc"}),
    "decision_transformer": frozenset({"c_attn", "q_attn", "c_proj", "c_fc"}),
    "clvp": frozenset({"c_fc", "c_proj"}),
}


def conv1d_rule(config: Mapping | None) -> Callable[[str], bool] | None:
    """For a base whose config.json names an architecture bonemerge knows, a test of whether a
    module (by its dotted name) is a Conv1D; None when the architecture is unknown."""
    model_type = (config or {}).get("model_type")
    if not isinstance(model_type, str) or model_type not in KNOWN_TYPES:
        return None
    leaves = CONV1D_LEAVES.get(model_type, frozenset())
    return lambda module: module.rsplit(".", 1)[-1] in leaves


# Architectures whose every LoRA-able 2-D layer is an nn.Linear or nn.Embedding: the common
# decoder families, so that square layers of these models are never left to the flag.
LINEAR_ONLY = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi",
        "phi3",
        "bert",
        "roberta",
        "gpt_neox",
        "gptj",
        "gpt_bigcode",
        "opt",
        "bloom",
        "falcon",
        "t5",
        "olmo",
        "olmo2",
        "granite",
        "starcoder2",
        "stablelm",
        "cohere",
        "deepseek_v3",
        "smollm3",
    }
)
KNOWN_TYPES = frozenset(CONV1D_LEAVES) | LINEAR_ONLY


def stored_transposed(
    module: str, rule: Callable[[str], bool] | None, fits_linear: bool, fits_conv1d: bool, flag: bool
) -> bool:
    """Whether the weight of `module` is stored in x out (a Conv1D), as PEFT decides it for
    the layer it wraps: from the architecture when `rule` knows it, else from the one layout
    the weight's shape fits, else (a square weight) from the config's `fan_in_fan_out`."""
    if rule is not None:
        return rule(module)
    if fits_linear != fits_conv1d:
        return fits_conv1d
    return flag
