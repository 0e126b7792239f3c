"""Mixture-of-experts LoRA (PEFT `target_parameters`) against PEFT 0.18.1's `merge_and_unload()`.

Tiny random Qwen3-MoE, Mixtral and gpt-oss models are saved by transformers itself: Qwen3-MoE
and Mixtral as one tensor per expert (what `save_pretrained` writes; transformers fuses them
when it loads), gpt-oss fused. A second copy of Qwen3-MoE and Mixtral holds the fused tensors
as the model names them. Adapters come from PEFT (`get_peft_model`, every lora_ tensor random).

Our merged folder is loaded back with transformers (which fuses per-expert tensors by its own
rules) and compared with PEFT's merged state dict element by element: fp32 merges bit for bit;
in bf16 PEFT casts each expert ΔW to bf16 before adding it (two roundings) and bonemerge rounds
once, so there every element must be at least as close to the float64 merge as PEFT's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import save_file

from bonemerge import merge
from tests import lora_oracle as lo
from tests import oracle
from tests.cliutil import fails

HIDDEN, INTER, E = 24, 16, 4  # hidden, expert intermediate, experts: every dimension differs
ATTENTION = ["q_proj"]


def _config(kind: str):
    from transformers import GptOssConfig, MixtralConfig, Qwen3MoeConfig

    common = dict(
        vocab_size=64,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    if kind == "qwen3":
        return Qwen3MoeConfig(
            **common, intermediate_size=40, moe_intermediate_size=INTER, num_experts=E, num_experts_per_tok=2
        )
    if kind == "mixtral":
        return MixtralConfig(**common, intermediate_size=INTER, num_local_experts=E, num_experts_per_tok=2)
    return GptOssConfig(
        **common,
        intermediate_size=INTER,
        num_local_experts=E,
        num_experts_per_tok=2,
        layer_types=["full_attention", "sliding_attention"],
    )


def save_model(folder: Path, kind: str, dtype: torch.dtype) -> Path:
    from transformers import AutoModelForCausalLM

    oracle.quiet_transformers()
    torch.manual_seed(11)
    model = AutoModelForCausalLM.from_config(_config(kind)).to(dtype)
    with torch.no_grad():  # transformers leaves fused experts uninitialised (empty)
        for name, parameter in model.named_parameters():
            if ".experts." in name:
                parameter.copy_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(folder)
    return folder


def fused_copy(base: Path, folder: Path) -> Path:
    """`base` with its experts written fused, as the model names them ([E, 2I, H], [E, H, I])."""
    import shutil

    shutil.copytree(base, folder)
    model = factory(base)()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    (folder / "model.safetensors").unlink()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def factory(path: Path):
    from transformers import AutoModelForCausalLM

    def make():
        oracle.quiet_transformers()
        return AutoModelForCausalLM.from_pretrained(path, dtype="auto")

    return make


MODELS: dict[tuple[str, str, str], Path] = {}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(kind, dtype, layout) -> folder; built on first use."""

    def get(kind: str, dtype: str, layout: str) -> Path:
        key = (kind, dtype, layout)
        if key not in MODELS:
            root = tmp_path_factory.mktemp(f"{kind}-{dtype}-{layout}")
            saved = get(kind, dtype, "saved") if layout == "fused" else None
            if saved is not None:
                MODELS[key] = fused_copy(saved, root / "base")
            else:
                MODELS[key] = save_model(root / "base", kind, getattr(torch, dtype))
        return MODELS[key]

    return get


def expert_delta64(layer, adapter: str) -> torch.Tensor:
    """PEFT's ParamWrapper ΔW in float64, from its own r, scaling and tensors."""
    a = layer.lora_A[adapter].weight.detach().double()
    b = layer.lora_B[adapter].weight.detach().double()
    scaling = layer.scaling[adapter]
    if layer.num_experts == 1:
        return (b @ a) * scaling
    a = a.reshape(layer.num_experts, -1, a.shape[-1])
    b = b.reshape(b.shape[0], -1, layer.num_experts)
    return torch.einsum("o r e, e r i -> e i o", b, a) * scaling


def reference64(model) -> dict[str, torch.Tensor]:
    """Every parameter the PeftModel's a0 changes, merged in float64 (Linear and ParamWrapper)."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    result = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or "a0" not in module.lora_A:
            continue
        plain = name.removeprefix(lo.PEFT_PREFIX).replace(".base_layer", "")
        if isinstance(module, ParamWrapper):
            key = f"{plain}.{module.parameter_name}"
            result[key] = module.get_param().detach().double() + expert_delta64(module, "a0")
        else:
            key = f"{plain}.weight"
            result[key] = module.get_base_layer().weight.detach().double() + lo.delta64(module, "a0")
    return result


def peft_and_reference(base: Path, adapter: Path):
    model = oracle.peft_model(factory(base), [adapter])
    reference = reference64(model)
    merged = model.merge_and_unload(progressbar=False, safe_merge=False, adapter_names=["a0"])
    return lo.state(merged), reference


def train(base: Path, folder: Path, seed: int = 3, **settings) -> Path:
    config = dict(r=2, lora_alpha=3, init_lora_weights=False) | settings
    return lo.train_lora(factory(base), LoraConfig(**config), folder, seed=seed)


def as_model(folder: Path) -> dict[str, torch.Tensor]:
    """A merged folder as transformers loads it (per-expert tensors fused by its own rules)."""
    return lo.state(factory(folder)())


def check_against_peft(ours, peft, reference, exact: bool) -> dict[str, int]:
    """Unchanged tensors bit-identical; changed ones bit-identical when `exact`, else never
    farther from `reference` than PEFT's, element by element. Returns differing counts."""
    assert set(ours) == set(peft)
    differing = {}
    for name, expected in peft.items():
        mine = ours[name]
        assert (mine.dtype, mine.shape) == (expected.dtype, expected.shape), name
        if name not in reference or exact:
            assert torch.equal(mine, expected), f"{name} differs from PEFT's"
            continue
        exact64 = reference[name]
        ours_error = (mine.double() - exact64).abs()
        peft_error = (expected.double() - exact64).abs()
        farther = int((ours_error > peft_error).sum())
        assert farther == 0, f"{name}: {farther} elements farther from float64 than PEFT's"
        differing[name] = int((mine != expected).sum())
    return differing


EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.mark.parametrize(
    ("kind", "dtype", "layout"),
    [
        ("qwen3", "float32", "saved"),
        ("qwen3", "bfloat16", "saved"),
        ("qwen3", "bfloat16", "fused"),
        ("mixtral", "bfloat16", "saved"),
        ("mixtral", "float32", "fused"),
        ("gptoss", "bfloat16", "saved"),
        ("gptoss", "float32", "saved"),
    ],
)
def test_expert_lora_matches_peft(tmp_path, models, kind, dtype, layout):
    """Both expert parameters of one module and attention LoRA in one adapter."""
    base = models(kind, dtype, layout)
    adapter = train(base, tmp_path / "adapter", target_modules=ATTENTION, target_parameters=EXPERTS)
    report = merge(base, [adapter], tmp_path / "merged")
    peft, reference = peft_and_reference(base, adapter)
    ours = as_model(tmp_path / "merged")
    differing = check_against_peft(ours, peft, reference, exact=dtype == "float32")
    experts = [n for n in reference if ".experts." in n]
    assert len(experts) == 4 and len(reference) == 6
    for name in experts:  # the merge changed every expert
        before = factory(base)().state_dict()[name]
        assert bool((ours[name] != before).flatten(1).any(dim=1).all()), name
    per_expert = layout == "saved" and kind != "gptoss"
    assert report.tensors_merged == 2 + (2 * E * 3 if per_expert else 4)
    if dtype == "float32":  # the history sketches each on-disk tensor's share of ΔW
        sketched = lo.assert_sketched(base, tmp_path / "merged", lambda t: t.reshape(-1, t.shape[-1]))
        assert len(sketched) == report.tensors_merged
    print(f"{kind} {dtype} {layout}: elements differing from PEFT's {differing}")


def test_bf16_rounds_once_where_peft_rounds_twice(tmp_path, models):
    """The bf16 expert merges differ from PEFT's somewhere (PEFT rounds ΔW first), and are
    closer to float64 in total; attention (Linear LoRA, one rounding) stays bit-identical."""
    base = models("qwen3", "bfloat16", "saved")
    adapter = train(
        base,
        tmp_path / "adapter",
        seed=5,
        r=4,
        lora_alpha=5,
        target_modules=ATTENTION,
        target_parameters=EXPERTS,
    )
    merge(base, [adapter], tmp_path / "merged")
    peft, reference = peft_and_reference(base, adapter)
    ours = as_model(tmp_path / "merged")
    differing = check_against_peft(ours, peft, reference, exact=False)
    assert all(differing[n] == 0 for n in differing if "q_proj" in n), differing
    assert sum(differing.values()) > 0
    experts = [n for n in reference if ".experts." in n]
    ours_error = sum(float(((ours[n].double() - reference[n]) ** 2).sum()) for n in experts)
    peft_error = sum(float(((peft[n].double() - reference[n]) ** 2).sum()) for n in experts)
    print(f"squared error vs float64: ours {ours_error:.4e}, PEFT {peft_error:.4e}; differing {differing}")
    assert ours_error < peft_error


def test_dora_with_target_parameters_is_refused(tmp_path, models):
    base = models("qwen3", "float32", "saved")
    adapter = train(base, tmp_path / "adapter", target_modules=ATTENTION, target_parameters=EXPERTS[:1])
    config = lo.adapter_config(adapter) | {"use_dora": True}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="use_dora"):
        from peft import get_peft_model

        get_peft_model(factory(base)(), LoraConfig(r=2, use_dora=True, target_parameters=EXPERTS[:1]))
    fails(
        tmp_path,
        "merge",
        base,
        adapter,
        "-o",
        tmp_path / "out",
        expect=("use_dora together with target_parameters", "PEFT refuses"),
    )


def test_expert_rules_are_transformers_rules():
    """Every per-expert fusion in the installed transformers' conversion mapping is one of
    `RULES` (same parts, same order, same fused name, stacked then concatenated along dim 1),
    and the module renamings of those families are in `RENAMES`."""
    import re

    from transformers import conversion_mapping as cm
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, WeightRenaming

    from bonemerge.checkpoint.experts import RENAMES, RULES

    rules = {(rule.fused, rule.parts) for rule in RULES}
    seen, renames = set(), set()
    for family, converters in cm._build_checkpoint_conversion_mapping().items():
        fusions = [
            c
            for c in converters or []
            if isinstance(c, WeightConverter) and any(isinstance(o, MergeModulelist) for o in c.operations)
        ]
        for converter in fusions:
            sources = [p.replace("\\", "") for p in converter.source_patterns]
            parts = tuple(re.fullmatch(r".*experts\.\*\.(\w+)\.weight", p)[1] for p in sources)
            (target,) = converter.target_patterns
            fused = target.rpartition(".")[2]
            operations = [(type(o), o.dim) for o in converter.operations]
            expected = [(MergeModulelist, 0)] + ([(Concatenate, 1)] if len(parts) == 2 else [])
            assert operations == expected, (family, converter)
            assert (fused, parts) in rules, (family, fused, parts)
            seen.add((fused, parts))
        for renaming in converters or [] if fusions else []:
            if isinstance(renaming, WeightRenaming) and not isinstance(renaming, WeightConverter):
                for source, target in zip(renaming.source_patterns, renaming.target_patterns, strict=True):
                    if re.fullmatch(r"\\?\.\w+\\?\.", source) and target in (".mlp.", ".feed_forward."):
                        renames.add((source.replace("\\", ""), target))
    assert seen == rules
    assert renames == set(RENAMES)


def test_one_expert_parameter_is_plain_lora(tmp_path, models):
    """A 2-D target parameter (one expert): PEFT's Linear maths, B @ A laid as it is, ΔW
    rounded to the weight dtype first; in fp32 the bits equal target_modules LoRA's too."""
    base = models("qwen3", "float32", "saved")
    adapter = train(base, tmp_path / "adapter", target_parameters=["self_attn.q_proj.weight"])
    merge(base, [adapter], tmp_path / "merged")
    peft, reference = peft_and_reference(base, adapter)
    ours = as_model(tmp_path / "merged")
    assert sorted(reference) == [f"model.layers.{n}.self_attn.q_proj.weight" for n in (0, 1)]
    check_against_peft(ours, peft, reference, exact=True)
    linear = lo.write_lora(
        tmp_path / "linear",
        {k.removeprefix(lo.PEFT_PREFIX): v for k, v in oracle.read_folder(adapter).items()},
        {"r": 2, "lora_alpha": 3, "target_modules": ["q_proj"]},
    )
    merge(base, [linear], tmp_path / "merged-linear")
    assert as_model(tmp_path / "merged-linear").keys() == ours.keys()
    assert all(torch.equal(v, ours[k]) for k, v in as_model(tmp_path / "merged-linear").items())

    bf16 = models("qwen3", "bfloat16", "saved")
    adapter = train(bf16, tmp_path / "adapter16", target_parameters=["self_attn.q_proj.weight"])
    merge(bf16, [adapter], tmp_path / "merged16")
    peft, reference = peft_and_reference(bf16, adapter)
    check_against_peft(as_model(tmp_path / "merged16"), peft, reference, exact=False)


class _V4Experts(torch.nn.Module):
    """Mixtral's MoE block as transformers v4 built it: one nn.Linear per expert and projection,
    named as the per-expert checkpoint names them (`block_sparse_moe.experts.{e}.w1`...)."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = torch.nn.ModuleList(
            torch.nn.ModuleDict(
                {
                    "w1": torch.nn.Linear(HIDDEN, INTER, bias=False),
                    "w2": torch.nn.Linear(INTER, HIDDEN, bias=False),
                    "w3": torch.nn.Linear(HIDDEN, INTER, bias=False),
                }
            )
            for _ in range(E)
        )


def v4_mixtral(base: Path) -> torch.nn.Module:
    """A v4-style per-expert Mixtral MoE stack holding the experts of `base` (the rest left out)."""
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList(torch.nn.Module() for _ in range(2))
    for layer in model.model.layers:
        layer.block_sparse_moe = _V4Experts()
    weights = {k: v for k, v in oracle.read_folder(base).items() if ".experts." in k}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not missing and not unexpected
    return model.to(next(iter(weights.values())).dtype)


def test_v4_per_expert_target_modules_lora_is_plain_lora(tmp_path, models):
    """An adapter trained under transformers v4 on Mixtral's nn.Linear experts
    (target_modules w1/w2/w3) merges into the per-expert checkpoint as plain LoRA, bit for bit
    with PEFT's merge, and transformers v5 loads the result."""
    base = models("mixtral", "bfloat16", "saved")
    config = LoraConfig(r=2, lora_alpha=3, target_modules=["w1", "w2", "w3"], init_lora_weights=False)
    adapter = lo.train_lora(lambda: v4_mixtral(base), config, tmp_path / "adapter", seed=9)
    report = merge(base, [adapter], tmp_path / "merged")
    assert report.tensors_merged == 2 * E * 3
    peft = oracle.peft_merged(lambda: v4_mixtral(base), [adapter])
    ours = oracle.read_folder(tmp_path / "merged")
    original = oracle.read_folder(base)
    for name, expected in peft.items():
        assert torch.equal(ours[name], expected), name
        assert not torch.equal(ours[name], original[name]), name
    assert set(as_model(tmp_path / "merged")) == set(as_model(base))


def _fused_base(folder: Path, tensors: dict[str, tuple[int, ...]]) -> Path:
    folder.mkdir(parents=True)
    save_file({k: torch.randn(s) for k, s in tensors.items()}, folder / "model.safetensors")
    return folder


def _expert_adapter(folder: Path, module: str, a: tuple[int, int], b: tuple[int, int], targets) -> Path:
    return lo.write_lora(
        folder,
        {f"{module}.lora_A.weight": torch.randn(a), f"{module}.lora_B.weight": torch.randn(b)},
        {"r": 2, "lora_alpha": 2, "target_modules": [], "target_parameters": targets},
    )


def test_a_block_that_fits_two_parameters_is_refused(tmp_path):
    """PEFT names the block by its module: two same-shaped targeted parameters cannot be told apart."""
    base = _fused_base(tmp_path / "base", {"m.experts.a": (3, 8, 8), "m.experts.b": (3, 8, 8)})
    adapter = _expert_adapter(tmp_path / "adapter", "m.experts", (6, 8), (8, 6), ["experts.a", "experts.b"])
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=("fits the parameters a, b",))


@pytest.mark.parametrize(
    ("experts", "fragment"),
    [(3, "lacks m.experts.3.gate_proj.weight"), (5, "holds m.experts.4.gate_proj.weight")],
    ids=["missing-expert", "extra-expert"],
)
def test_per_expert_checkpoints_must_hold_every_expert(tmp_path, experts, fragment):
    shapes = {}
    for e in range(experts):
        shapes |= {f"m.experts.{e}.gate_proj.weight": (4, 6), f"m.experts.{e}.up_proj.weight": (4, 6)}
    base = _fused_base(tmp_path / "base", shapes)
    adapter = _expert_adapter(tmp_path / "adapter", "m.experts", (8, 8), (6, 8), ["experts.gate_up_proj"])
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=(fragment,))


def test_an_expert_block_of_the_wrong_shape_is_refused(tmp_path):
    base = _fused_base(tmp_path / "base", {"m.experts.gate_up_proj": (4, 8, 6)})
    adapter = _expert_adapter(tmp_path / "adapter", "m.experts", (8, 8), (5, 8), ["experts.gate_up_proj"])
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=("fit none of the parameters",))


def _expert_adapter_of(base: Path, folder: Path) -> Path:
    return train(base, folder, target_modules=ATTENTION, target_parameters=EXPERTS)


def test_peft_merge_verifies_and_unmerge_restores(tmp_path, models):
    """verify (tolerance mode) accepts PEFT's bf16 merge, saved per expert by save_pretrained,
    within each element's rounding bound; unmerge takes the experts back out."""
    from bonemerge.api import unmerge, verify

    base = models("qwen3", "bfloat16", "saved")
    adapter = _expert_adapter_of(base, tmp_path / "adapter")
    model = oracle.peft_model(factory(base), [adapter])
    model.merge_and_unload(progressbar=False, adapter_names=["a0"]).save_pretrained(tmp_path / "peft")
    report = verify(tmp_path / "peft", base, [adapter])
    assert report.ok and report.mode == "tolerance", report.to_dict()
    assert report.within_rounding > 0 and report.identical > 0
    # a wrong expert (another adapter seed) is caught
    other = train(base, tmp_path / "other", seed=4, target_modules=ATTENTION, target_parameters=EXPERTS)
    assert not verify(tmp_path / "peft", base, [other]).ok

    fp32 = models("qwen3", "float32", "saved")
    adapter = _expert_adapter_of(fp32, tmp_path / "adapter32")
    merge(fp32, [adapter], tmp_path / "merged")
    unmerge(tmp_path / "merged", [adapter], tmp_path / "unmerged")
    original, merged = oracle.read_folder(fp32), oracle.read_folder(tmp_path / "merged")
    restored = oracle.read_folder(tmp_path / "unmerged")
    changed = [n for n in original if not torch.equal(original[n], merged[n])]
    assert len(changed) == 2 * (1 + 3 * E)
    for name in changed:
        assert torch.allclose(restored[name], original[name], rtol=0, atol=1e-6), name


def test_training_checkpoint_merges_and_unloads(tmp_path, models):
    """A full PeftModel state dict with expert parameters (wrapped twice: `experts.base_layer.
    base_layer.gate_up_proj`): merge equals PEFT's merge, unload gives the fused base back."""
    import shutil

    from bonemerge.api import unload

    base = models("qwen3", "float32", "saved")
    config = LoraConfig(
        r=2, lora_alpha=3, init_lora_weights=False, target_modules=ATTENTION, target_parameters=EXPERTS
    )
    model = lo.lora_model(factory(base), config, seed=3)
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, checkpoint / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(base / "config.json", checkpoint)
    model.peft_config["default"].save_pretrained(checkpoint)
    expected = lo.state(model.merge_and_unload(progressbar=False))
    merge(checkpoint, [], tmp_path / "merged")
    assert all(torch.equal(v, expected[k]) for k, v in as_model(tmp_path / "merged").items())
    unload(checkpoint, tmp_path / "unloaded")
    unloaded = oracle.read_folder(tmp_path / "unloaded")
    assert "model.layers.0.mlp.experts.gate_up_proj" in unloaded
    assert all(torch.equal(v, unloaded[k]) for k, v in lo.state(factory(base)()).items() if k in unloaded)


def test_strip_layers_and_include_on_expert_adapters(tmp_path, models):
    """strip keeps PEFT's nested key names, so the stripped adapter merges the kept experts as before."""
    from bonemerge import strip

    base = models("qwen3", "float32", "saved")
    adapter = _expert_adapter_of(base, tmp_path / "adapter")
    strip(adapter, tmp_path / "layer1", layers="1")
    strip(adapter, tmp_path / "experts", include="experts")
    kept = oracle.read_folder(tmp_path / "layer1")
    assert sorted(kept) == sorted(k for k in oracle.read_folder(adapter) if ".layers.1." in k)
    assert sum(".experts.base_layer.lora_" in k for k in oracle.read_folder(tmp_path / "experts")) == 4
    merge(base, [adapter], tmp_path / "all")
    merge(base, [tmp_path / "experts"], tmp_path / "only-experts")
    everything, experts = oracle.read_folder(tmp_path / "all"), oracle.read_folder(tmp_path / "only-experts")
    original = oracle.read_folder(base)
    for name, tensor in experts.items():
        assert torch.equal(tensor, original[name] if "q_proj" in name else everything[name]), name


def test_inspect_lists_experts_as_ranges(tmp_path, models):
    from bonemerge.report.inspect_text import render_inspection

    base = models("qwen3", "bfloat16", "saved")
    adapter = _expert_adapter_of(base, tmp_path / "adapter")
    from bonemerge.api import inspect

    text = "\n".join(render_inspection(inspect(base)))
    assert "model.layers.{0-1}.mlp.experts.{0-3}.gate_proj.weight" in text, text
    described = inspect(adapter, base)
    assert described["modules"] == {
        "experts": {"count": 4, "layers": "0-1"},
        "q_proj": {"count": 2, "layers": "0-1"},
    }
    assert described["target_parameters"] == EXPERTS
    text = "\n".join(render_inspection(described))
    assert "parameters mlp.experts.gate_up_proj, mlp.experts.down_proj" in text
    assert "model.layers.{0-1}.mlp.experts.{0-3}.up_proj.weight" in text, text


@pytest.mark.parametrize("band", [1, 5, 7, 64])
def test_fused_experts_stream_in_row_bands_of_any_size(band):
    """A fused [E, d1, d2] tensor streams as E·d1 rows of d2; bands that start and end inside
    experts give the bits of the whole tensor at once, and the float64 maths is PEFT's einsum."""
    from bonemerge.checkpoint.dtypes import rows_cols
    from bonemerge.methods.lora_params import ParamTarget, expert_rows
    from bonemerge.plan.build import Step
    from bonemerge.run.compute import CHUNK_ELEMENTS, chunk_rows

    experts, d1, d2, r = 5, 12, 9, 3
    generator = torch.Generator().manual_seed(2)
    a = torch.randn(experts * r, d1, generator=generator)
    b = torch.randn(d2, r * experts, generator=generator)
    weight = torch.randn(experts, d1, d2, generator=generator)
    target = ParamTarget("gate_up_proj", "weight", "m.experts.gate_up_proj", experts, None, 0, d1, d1, r, 0.7)
    rows = weight.reshape(-1, d2)
    whole = rows.clone()
    expert_rows(target, a, b, 0.7, torch.float32, "cpu").merge(whole, 0)
    banded = rows.clone()
    maths = expert_rows(target, a, b, 0.7, torch.float32, "cpu")
    for start in range(0, rows.shape[0], band):
        maths.merge(banded[start : start + band], start)
    assert torch.equal(banded, whole)
    exact = rows.double().clone()
    expert_rows(target, a.double(), b.double(), 0.7, torch.float64, "cpu").merge(exact, 0)
    einsum = torch.einsum(
        "o r e, e r i -> e i o", b.double().reshape(d2, r, experts), a.double().reshape(experts, r, d1)
    )
    assert torch.allclose(exact, (weight.double() + 0.7 * einsum).reshape(-1, d2), rtol=0, atol=1e-12)
    # the engine's chunks of a large fused tensor are bands inside one expert, not whole experts
    big = Step("m.experts.gate_up_proj", "BF16", (128, 5760, 2880), None)
    assert chunk_rows(big) * rows_cols(big.shape)[1] <= CHUNK_ELEMENTS


def test_targets_without_a_module_part_leave_linear_lora_alone(tmp_path, models):
    """target_parameters ["gate_up_proj", "down_proj"] name no module: PEFT wraps only modules
    that have such a parameter, so q_proj stays a Linear LoRA (and qwen3's experts are found)."""
    base = models("qwen3", "float32", "saved")
    adapter = train(
        base, tmp_path / "adapter", target_modules=ATTENTION, target_parameters=["gate_up_proj", "down_proj"]
    )
    merge(base, [adapter], tmp_path / "merged")
    peft, reference = peft_and_reference(base, adapter)
    assert len(reference) == 6
    check_against_peft(as_model(tmp_path / "merged"), peft, reference, exact=True)


def test_fused_experts_merge_in_bounded_memory(tmp_path):
    """128 experts fused in one tensor: the merge holds one band of rows and one product buffer
    per thread, not one per expert (which alone would take 512 MB here)."""
    from tests.test_memory import LIMIT, peak_rss

    experts, rows, cols = 128, 512, 1024
    generator = torch.Generator().manual_seed(0)
    base = tmp_path / "base"
    base.mkdir()
    weight = (torch.randn(experts, rows, cols, generator=generator) * 0.02).to(torch.bfloat16)
    save_file({"model.layers.0.mlp.experts.gate_up_proj": weight}, base / "model.safetensors")
    del weight
    adapter = _expert_adapter(
        tmp_path / "adapter",
        "model.layers.0.mlp.experts",
        (experts * 2, rows),
        (cols, experts * 2),
        EXPERTS[:1],
    )
    peak = peak_rss("merge", base, adapter, "-o", tmp_path / "out", "-q")
    print(
        f"peak RSS merging 128 fused experts ({128 * 512 * 1024 * 2 / 2**20:.0f} MiB): {peak / 2**20:.0f} MiB"
    )
    assert peak < LIMIT


def test_an_expert_adapter_merged_already_is_refused(tmp_path, models):
    """The double-merge guard knows expert adapters."""
    base = models("qwen3", "float32", "saved")
    adapter = _expert_adapter_of(base, tmp_path / "adapter")
    merge(base, [adapter], tmp_path / "merged")
    renamed = tmp_path / "renamed"
    shutil.copytree(adapter, renamed)
    fails(
        tmp_path,
        "merge", tmp_path / "merged", renamed, "-o", tmp_path / "out",
        expect=(f"{renamed} is already merged into {tmp_path / 'merged'}", "--allow-remerge"),
    )  # fmt: skip
