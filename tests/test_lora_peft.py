"""`bonemerge merge` of LoRA, rsLoRA and DoRA adapters against PEFT 0.18.1's `merge_and_unload()`.

Plain LoRA merges must equal PEFT's default merge (`safe_merge=False`, one rounding) bit for
bit, or differ by one ulp (of the larger of base and merged magnitude) only in a tiny fraction
of elements, where a GEMM summed in another order; they are never farther than PEFT's from a
float64 computation of the same maths. Embedding merges round once where PEFT rounds twice.
DoRA merges are judged by what the merged model computes next to the unmerged PeftModel.

Scalings are chosen so they are not powers of two (1.5, 16/sqrt(12), ...): multiplying by
them rounds, so a merge that scales A or B instead of B @ A shows up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, MissConfig, PeftModel

from bonemerge import merge
from tests import lora_oracle as lo
from tests import oracle
from tests.conftest import llama_factory, minilm_factory, tree_digest

BERT_TARGETS = ["query", "value", "dense"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = 1e-3  # the largest fraction of merged elements allowed to be one ulp off PEFT's
IDS = torch.tensor([[1, 5, 9, 200, 17, 3, 44, 120]])

BERT_CASES = [
    ("lora", lambda: LoraConfig(r=16, lora_alpha=24, target_modules=BERT_TARGETS)),
    # a scale of 2^k takes the one-pass path (the scaling rides on the addition)
    ("lora-scale-2", lambda: LoraConfig(r=8, lora_alpha=16, target_modules=BERT_TARGETS)),
    ("rslora", lambda: LoraConfig(r=12, lora_alpha=16, use_rslora=True, target_modules=BERT_TARGETS)),
    (
        "patterns",
        lambda: LoraConfig(
            r=8,
            lora_alpha=12,
            target_modules=BERT_TARGETS,
            rank_pattern={"query": 4, "layer.1.output.dense": 12},
            alpha_pattern={"value": 40, r"layer\.[23]\.attention\.self\.query": 6},
        ),
    ),
]
LLAMA_CASES = [
    ("lora", lambda: LoraConfig(r=16, lora_alpha=24, target_modules=LLAMA_TARGETS)),
    ("lora-scale-1", lambda: LoraConfig(r=16, lora_alpha=16, target_modules=LLAMA_TARGETS)),
    ("lora-scale-2", lambda: LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS)),
    ("rslora", lambda: LoraConfig(r=12, lora_alpha=16, use_rslora=True, target_modules=LLAMA_TARGETS)),
    (
        "patterns",
        lambda: LoraConfig(
            r=16,
            lora_alpha=24,
            target_modules=LLAMA_TARGETS,
            rank_pattern={"q_proj": 8, "layers.1.mlp.down_proj": 4},
            alpha_pattern={"v_proj": 32, r"layers\.1\.mlp\.(up|gate)_proj": 5},
        ),
    ),
    (
        # PEFT's get_pattern_key: the first key that matches a whole trailing run of dotted
        # segments wins, in the order of the saved config, which save_pretrained sorts: here
        # "mlp.down_proj" shadows the more specific "model.layers.1.mlp.down_proj", and "proj"
        # matches no module ("q_proj" is one segment).
        "pattern-rules",
        lambda: LoraConfig(
            r=8,
            lora_alpha=12,
            target_modules=LLAMA_TARGETS,
            rank_pattern={"proj": 2, "k_proj": 4},
            alpha_pattern={"proj": 999, "v_proj": 20, "model.layers.1.mlp.down_proj": 3, "mlp.down_proj": 10},
        ),
    ),
]


@dataclass
class Case:
    adapter: Path
    report: object
    ours: dict[str, torch.Tensor]
    peft: dict[str, torch.Tensor]
    reference: dict[str, torch.Tensor] | None  # float64, by the PeftModel's module names
    scales: dict[str, torch.Tensor]


def run_case(tmp_path: Path, base: Path, factory, config, seed: int = 7, **options) -> Case:
    adapter = lo.train_lora(factory, config(), tmp_path / "adapter", seed=seed)
    before = tree_digest(base)
    report = merge(base, [adapter], tmp_path / "merged", **options)
    assert tree_digest(base) == before, "the base was modified"
    reference, scales, peft = lo.peft_view(factory, [adapter])
    return Case(adapter, report, oracle.read_folder(tmp_path / "merged"), peft, reference, scales)


def check_fidelity(case: Case, prefix: str = "", label: str = "") -> lo.Closeness:
    """Bit-identical to PEFT but for a tiny fraction of 1-ulp differences; error vs float64 ≤ PEFT's."""
    reference = {n.removeprefix(prefix): v for n, v in case.reference.items()}
    scales = {n.removeprefix(prefix): v for n, v in case.scales.items()}
    assert set(scales) == set(reference)
    closeness = lo.compare_with_peft(case.ours, case.peft, scales, prefix=prefix)
    print(f"{label or case.adapter.parent.name}: {closeness}")
    assert closeness.fraction <= TINY and closeness.worst_ulps <= 1, str(closeness)
    ours_error = lo.squared_error(case.ours, reference)
    peft_error = lo.squared_error(case.peft, reference, prefix=prefix)
    assert ours_error <= peft_error, (ours_error, peft_error)
    return closeness


@pytest.mark.parametrize(("case", "config"), BERT_CASES, ids=[c[0] for c in BERT_CASES])
def test_minilm_matches_peft(tmp_path, minilm, case, config):
    factory = minilm_factory(minilm)
    result = run_case(tmp_path, minilm, factory, config)
    base = oracle.read_folder(minilm)
    assert set(result.ours) == set(base)
    assert result.report.tensors_merged == 6 * 5 + 1  # query, value, 3 dense per layer + pooler.dense
    check_fidelity(result, label=f"MiniLM {case}")
    changed = [n for n in base if not torch.equal(base[n], result.ours[n])]
    assert len(changed) == 31, changed


@pytest.mark.parametrize(("case", "config"), LLAMA_CASES, ids=[c[0] for c in LLAMA_CASES])
def test_sharded_bf16_llama_matches_peft(tmp_path, llama, case, config):
    factory = llama_factory(llama)
    result = run_case(tmp_path, llama, factory, config)
    assert sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors")) == sorted(
        p.name for p in llama.glob("*.safetensors")
    )
    assert result.report.tensors_merged == 2 * 7
    assert all(t.dtype == torch.bfloat16 for t in result.ours.values())
    check_fidelity(result, label=f"bf16 Llama {case}")
    if case == "pattern-rules":
        # the ranks PEFT chose are what was saved; the scalings are PEFT's, checked above
        model = oracle.peft_model(factory, [result.adapter])
        layers = lo.lora_layers(model)
        scaling = {m: layer.scaling["a0"] for m, layer in layers.items()}
        assert scaling["model.layers.1.mlp.down_proj"] == scaling["model.layers.0.mlp.down_proj"] == 10 / 8
        assert (scaling["model.layers.0.self_attn.v_proj"], scaling["model.layers.1.self_attn.q_proj"]) == (
            20 / 8,
            12 / 8,
        )
        assert (
            layers["model.layers.1.self_attn.k_proj"].r["a0"],
            scaling["model.layers.1.self_attn.k_proj"],
        ) == (
            4,
            3,
        )


def test_embedding_lora_rounds_once(tmp_path, llama):
    """PEFT casts an embedding's ΔW to bf16 before adding it (two roundings); bonemerge rounds once,
    so it is at least as close to float64 and at most one rounding step from PEFT."""
    factory = llama_factory(llama)
    config = lambda: LoraConfig(r=8, lora_alpha=12, target_modules=["embed_tokens", "q_proj", "lm_head"])  # noqa: E731
    result = run_case(tmp_path, llama, factory, config)
    ours, peft, reference, scales = result.ours, result.peft, result.reference, result.scales
    assert result.report.tensors_merged == 2 + 2
    base = oracle.read_folder(llama)
    embed = "model.embed_tokens.weight"
    linear = lo.compare_with_peft(ours, {n: v for n, v in peft.items() if n != embed}, scales)
    print(f"embedding case, Linear weights: {linear}")
    assert linear.fraction <= TINY and linear.worst_ulps <= 1, str(linear)
    # one rounding against two: the difference is the rounding of PEFT's bf16 ΔW (at most one
    # ulp of the larger operand) plus the two final roundings
    embedding = lo.compare_with_peft({embed: ours[embed]}, {embed: peft[embed]}, scales)
    ours_error = lo.squared_error(ours, {embed: reference[embed]})
    peft_error = lo.squared_error(peft, {embed: reference[embed]})
    distance = lo.ulps(ours[embed], peft[embed])
    print(
        f"embedding: squared error vs float64 ours {ours_error:.4e}, PEFT {peft_error:.4e}; {embedding}; "
        f"{float((distance > 1).float().mean()):.2e} of elements more than 1 ulp of the result apart"
    )
    assert ours_error < peft_error
    assert embedding.worst_ulps <= 2, str(embedding)
    assert lo.squared_error(ours, reference) <= lo.squared_error(peft, reference)
    assert not torch.equal(ours[embed], base[embed])
    assert all(torch.equal(ours[n], base[n]) for n in set(base) - set(reference))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(5)
    folder = tmp_path_factory.mktemp("gpt2") / "base"
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def gpt2_factory(path: Path):
    from transformers import GPT2LMHeadModel

    return lambda: GPT2LMHeadModel.from_pretrained(path)


def test_gpt2_conv1d_fan_in_fan_out(tmp_path, gpt2):
    factory = gpt2_factory(gpt2)
    config = lambda: LoraConfig(  # noqa: E731
        r=4, lora_alpha=6, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True
    )
    result = run_case(tmp_path, gpt2, factory, config)
    ours, peft = result.ours, result.peft
    assert lo.adapter_config(result.adapter)["fan_in_fan_out"] is True
    assert result.report.tensors_merged == 2 * 3  # attn.c_attn, attn.c_proj, mlp.c_proj per layer
    base = oracle.read_folder(gpt2)
    assert set(ours) == set(base)
    # tied lm_head: PEFT's state dict shows it, the checkpoint (base and merged) does not
    assert torch.equal(peft.pop("lm_head.weight"), peft["transformer.wte.weight"])
    check_fidelity(result, label="GPT-2 Conv1D")
    assert ours["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)


def test_lora_bias_merges_the_bias(tmp_path, minilm):
    factory = minilm_factory(minilm)
    config = lambda: LoraConfig(r=8, lora_alpha=12, target_modules=["query", "value"], lora_bias=True)  # noqa: E731
    result = run_case(tmp_path, minilm, factory, config)
    ours = result.ours
    assert any(k.endswith("lora_B.bias") for k in oracle.read_folder(result.adapter))
    biases = [n for n in result.reference if n.endswith(".bias")]
    assert len(biases) == 12
    check_fidelity(result, label="lora_bias")
    base = oracle.read_folder(minilm)
    for name in biases:
        assert not torch.equal(ours[name], base[name]), name


def test_modules_to_save_and_prefix_difference(tmp_path, minilm):
    """Trained on BertForSequenceClassification (`bert.` names, a new classifier head), merged
    into the BertModel checkpoint: the head copies land in the output as PEFT has them."""
    factory = minilm_factory(minilm, head=True)
    config = lambda: LoraConfig(  # noqa: E731
        r=8, lora_alpha=12, target_modules=["query", "value"], task_type="SEQ_CLS"
    )
    result = run_case(tmp_path, minilm, factory, config)
    ours, peft = result.ours, result.peft
    assert "classifier" in (lo.adapter_config(result.adapter)["modules_to_save"] or [])
    check_fidelity(result, prefix="bert.", label="modules_to_save")
    assert {"classifier.weight", "classifier.bias"} <= set(ours)
    assert torch.equal(ours["classifier.weight"], peft["classifier.weight"])
    fresh = factory().state_dict()["classifier.weight"]
    assert not torch.equal(ours["classifier.weight"], fresh)


def test_layers_to_transform_merges_only_that_layer(tmp_path, llama):
    factory = llama_factory(llama)
    config = lambda: LoraConfig(  # noqa: E731
        r=8, lora_alpha=12, target_modules=LLAMA_TARGETS, layers_to_transform=[1], layers_pattern="layers"
    )
    result = run_case(tmp_path, llama, factory, config)
    assert result.report.tensors_merged == 7
    check_fidelity(result, label="layers_to_transform")
    base = oracle.read_folder(llama)
    changed = {n for n in base if not torch.equal(result.ours[n], base[n])}
    assert changed == {f"model.layers.1.{p}.weight" for p in _projections()}


def _projections():
    return [f"self_attn.{p}" for p in LLAMA_TARGETS[:4]] + [f"mlp.{p}" for p in LLAMA_TARGETS[4:]]


def test_bin_adapter_gives_the_same_bytes(tmp_path, minilm):
    factory = minilm_factory(minilm)
    model = lo.lora_model(factory, LoraConfig(r=8, lora_alpha=12, target_modules=BERT_TARGETS), seed=3)
    model.save_pretrained(tmp_path / "st")
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    assert not (tmp_path / "bin" / "adapter_model.safetensors").exists()
    merge(minilm, [tmp_path / "st"], tmp_path / "from-st")
    merge(minilm, [tmp_path / "bin"], tmp_path / "from-bin")
    files = sorted(p.name for p in (tmp_path / "from-st").glob("*.safetensors"))
    assert files == sorted(p.name for p in (tmp_path / "from-bin").glob("*.safetensors")) and files
    for name in files:
        assert (tmp_path / "from-st" / name).read_bytes() == (tmp_path / "from-bin" / name).read_bytes()
    ours = oracle.read_folder(tmp_path / "from-bin")
    assert not torch.equal(ours["pooler.dense.weight"], oracle.read_folder(minilm)["pooler.dense.weight"])


# --- DoRA ---------------------------------------------------------------------------------------


def dora_distances(tmp_path: Path, factory, outputs, load_merged, adapter: Path):
    """(max |ours - unmerged|, max |PEFT merged - unmerged|, max |unmerged|) of the model outputs."""
    unmerged = outputs(oracle.peft_model(factory, [adapter]))
    theirs = outputs(oracle.peft_model(factory, [adapter]).merge_and_unload(progressbar=False))
    ours = outputs(load_merged(tmp_path / "merged"))
    return lo.max_abs(ours, unmerged), lo.max_abs(theirs, unmerged), float(unmerged.abs().max())


@pytest.mark.parametrize(
    "targets", [LLAMA_TARGETS, ["embed_tokens", "q_proj", "v_proj"]], ids=["linear", "embedding"]
)
def test_dora_llama_logits_equal_unmerged_peft(tmp_path, llama, targets):
    from transformers import AutoModelForCausalLM

    factory = llama_factory(llama)
    config = lambda: LoraConfig(r=8, lora_alpha=12, use_dora=True, target_modules=targets)  # noqa: E731
    result = run_case(tmp_path, llama, factory, config)
    adapter, report, ours, peft = result.adapter, result.report, result.ours, result.peft
    assert any(k.endswith("lora_magnitude_vector") for k in oracle.read_folder(adapter))
    assert report.tensors_merged == 2 * len(targets) - ("embed_tokens" in targets)
    ours_gap, peft_gap, scale = dora_distances(
        tmp_path,
        factory,
        lambda m: lo.llama_outputs(m, IDS),
        lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.bfloat16).eval(),
        adapter,
    )
    print(
        f"DoRA llama {targets[0]}: logits max|Δ| ours {ours_gap:.4g}, PEFT {peft_gap:.4g} "
        f"(max|logit| {scale:.3g})"
    )
    assert ours_gap <= 1.5 * peft_gap + 2**-8 * scale, (ours_gap, peft_gap)
    assert ours_gap <= 0.02 * scale
    # the weights themselves: one rounding each from nearly the same fp32 value
    base = oracle.read_folder(llama)
    changed = {n for n in base if not torch.equal(peft[n], base[n])}
    assert len(changed) == report.tensors_merged
    worst, fraction = 0, 0.0
    for name in changed:
        distance = lo.ulps(ours[name], peft[name])
        worst = max(worst, int(distance.max()))
        fraction = max(fraction, float((distance > 0).float().mean()))
    print(
        f"DoRA llama {targets[0]}: weights differ from PEFT's in {fraction:.2e} of elements, max {worst} ulp"
    )
    assert worst <= 1
    assert all(torch.equal(ours[n], base[n]) for n in set(base) - changed)


def test_dora_minilm_matches_peft(tmp_path, minilm):
    from transformers import AutoModel, AutoTokenizer

    factory = minilm_factory(minilm)
    config = lambda: LoraConfig(r=8, lora_alpha=12, use_dora=True, target_modules=["query", "value"])  # noqa: E731
    result = run_case(tmp_path, minilm, factory, config)
    assert result.report.tensors_merged == 2 * 6
    closeness = lo.compare_with_peft(result.ours, result.peft, result.scales)
    print(f"DoRA MiniLM: {closeness}")
    assert closeness.worst_ulps <= 4, str(closeness)
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    batch = tokenizer(["dora rescales rows", "a second sentence"], return_tensors="pt", padding=True)
    ours_gap, peft_gap, scale = dora_distances(
        tmp_path,
        factory,
        lambda m: lo.bert_outputs(m, batch),
        lambda p: AutoModel.from_pretrained(p).eval(),
        result.adapter,
    )
    print(f"DoRA MiniLM: hidden states max|Δ| ours {ours_gap:.3g}, PEFT {peft_gap:.3g} (max {scale:.3g})")
    assert ours_gap <= 1.5 * peft_gap + 1e-5 * scale, (ours_gap, peft_gap)


# --- a MiSS adapter, then a LoRA adapter --------------------------------------------------------


def test_miss_then_lora_equals_peft_in_that_order(tmp_path, minilm):
    """PEFT cannot hold a MiSS and a LoRA adapter in one model (PeftMixedModel takes neither
    Bone nor MiSS), so the oracle is PEFT twice: merge_and_unload the MiSS adapter, load the
    LoRA adapter on that result and merge_and_unload again. With fp32 maths bonemerge rounds
    after each adapter too and must give the same values; with auto (fp64 for an fp32 model,
    one rounding) it must be at least as close to float64."""
    factory = minilm_factory(minilm)
    miss = oracle.train_adapter(
        factory, MissConfig(r=64, target_modules=["query", "dense"]), tmp_path / "miss", seed=1
    )
    lora = lo.train_lora(
        factory, LoraConfig(r=8, lora_alpha=12, target_modules=["query", "value"]), tmp_path / "lora", seed=2
    )
    first = PeftModel.from_pretrained(factory(), miss).merge_and_unload(progressbar=False)
    peft = lo.state(PeftModel.from_pretrained(first, lora).eval().merge_and_unload(progressbar=False))

    base = oracle.read_folder(minilm)
    reference = {n: v.double() for n, v in base.items() if v.is_floating_point()}
    for module, block in oracle.adapter_blocks(miss).items():
        w = reference[module + ".weight"]
        reference[module + ".weight"] = w + block.double()[torch.arange(w.shape[1]) % block.shape[0], :].t()
    lora_reference, lora_scales, _ = lo.peft_view(factory, [lora])
    for name, value in lora_reference.items():
        reference[name] = reference[name] + (value - base[name].double())
    touched = {n for n in reference if not torch.equal(reference[n], base[n].double())}
    reference = {n: reference[n] for n in touched}
    assert any("query" in n for n in touched) and any("value" in n for n in touched)

    report = merge(minilm, [miss, lora], tmp_path / "exact", precision="fp32")
    assert report.tensors_merged == len(touched)
    exact = oracle.read_folder(tmp_path / "exact")
    scales = {
        n: torch.maximum(base[n].double().abs(), (reference[n] - base[n].double()).abs()) for n in touched
    }
    for name, scale in lora_scales.items():
        scales[name] = torch.maximum(scales[name], scale)
    closeness = lo.compare_with_peft(exact, peft, scales)
    print(f"MiSS then LoRA (precision fp32): {closeness}")
    assert closeness.fraction <= TINY and closeness.worst_ulps <= 1, str(closeness)

    merge(minilm, [miss, lora], tmp_path / "auto")
    auto = oracle.read_folder(tmp_path / "auto")
    assert lo.squared_error(auto, reference) <= lo.squared_error(peft, reference)
